"""Compare the numbers behind the committed docs figures (docs/figures/*.csv) with a fresh regeneration.

    python docs/check_figure_data.py runs/analysis docs/figures

Every committed CSV is matched with the regenerated one under the analysis folder (`source`: the command folder
its name starts with, or the two renamed ones); numbers must agree to 1e-6 (relative) and text exactly. A
committed CSV that no command is known to make is an error too, so that no figure's data goes unchecked. Exit
status 1, with the differing cells, when they do not: the docs would otherwise show figures their own commands
no longer make (a changed statistic, another OpenCV drawing the synthetic images differently, ...).

When they differ, the inputs recorded in each command's run.json (docs/figures/<command>_run.json against the
fresh one) say why, where they can: another annotation file, other image bytes (the synthetic set generated
with another OpenCV) or another checkpoint make other numbers without any code change.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

# The command folder (under the analysis folder) that writes a docs/figures CSV, by the CSV's name: its first
# word, or the whole name where docs/make_figures.sh renames the file when copying it.
COMMANDS = {"compare": "compare", "evolution": "evolution", "figure3": "figure3", "fusion": "scale-stats",
            "gradflow": "gradflow"}
RENAMED = {"figure3_example.csv": "figure3/figure3_000002.csv",  # the first of make_figures.sh's IMAGES
           "gradflow_threshold_sweep.csv": "gradflow_sweep/gradflow_threshold_sweep.csv"}


def source(name: str) -> str | None:
    """The regenerated file (relative to the analysis folder) that the committed CSV `name` was copied from."""
    if name in RENAMED:
        return RENAMED[name]
    command = COMMANDS.get(name.split("_")[0])
    return f"{command}/{name}" if command else None


def _cells_differ(first: str, second: str) -> bool:
    try:
        a, b = float(first), float(second)
    except ValueError:
        return first != second
    if math.isnan(a) and math.isnan(b):
        return False
    return not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def compare(committed: Path, fresh: Path) -> list[str]:
    with open(committed, newline="") as handle:
        old = list(csv.DictReader(handle))
    with open(fresh, newline="") as handle:
        new = list(csv.DictReader(handle))
    if len(old) != len(new):
        return [f"{committed.name}: {len(old)} rows committed, {len(new)} regenerated"]
    problems = []
    for index, (a, b) in enumerate(zip(old, new, strict=True)):
        for column in a:
            if column in ("images", "resamples"):
                continue
            if _cells_differ(a[column], b.get(column, "")):
                problems.append(f"{committed.name} row {index + 2} {column}: committed {a[column]}, "
                                f"regenerated {b.get(column)}")
    return problems


def input_differences(committed: Path, fresh: Path) -> list[str]:
    """What differs between the inputs two run.json files record: annotation file, image bytes, checkpoints."""
    if not committed.is_file() or not fresh.is_file():
        return []
    old, new = (json.loads(path.read_text()) for path in (committed, fresh))
    notes = []
    # A command run on images named one by one (figure3) records "dataset": null.
    old_sha, new_sha = ((run.get("dataset") or {}).get("annotations_sha256") for run in (old, new))
    if old_sha != new_sha:
        notes.append(f"the annotation file differs (sha256 {str(old_sha)[:12]}... committed, {str(new_sha)[:12]}... "
                     "here)")
    old_images, new_images = ({image["file"]: image["sha256"] for image in run.get("images") or []}
                              for run in (old, new))
    differing = sorted(name for name in old_images.keys() & new_images.keys()
                       if old_images[name] != new_images[name])
    if differing:
        examples = ", ".join(differing[:3])
        notes.append(f"{len(differing)} of {len(old_images)} images have other bytes (first {examples})")
    if old_images.keys() != new_images.keys():
        notes.append(f"other images: {len(old_images)} committed, {len(new_images)} here")
    old_models, new_models = ({model.get("label"): model.get("sha256") for model in run.get("checkpoints") or []}
                              for run in (old, new))
    notes += [f"checkpoint {label} differs (sha256 {str(old_models[label])[:12]}... committed, "
              f"{str(new_models.get(label))[:12]}... here)"
              for label in old_models if old_models[label] != new_models.get(label)]
    return notes


def main(argv: list[str]) -> int:
    analysis, figures = Path(argv[0]), Path(argv[1])
    problems, checked, commands = [], 0, {}
    committed_files = sorted(figures.glob("*.csv"))
    if not committed_files:
        problems.append(f"{figures}: no CSV to check")
    for committed in committed_files:
        made_by = source(committed.name)
        if made_by is None:
            problems.append(f"{committed.name}: no command is known to make it (docs/check_figure_data.py, source)")
            continue
        fresh = analysis / made_by
        commands[made_by.split("/")[0]] = None
        if not fresh.is_file():
            problems.append(f"{committed.name}: not regenerated ({fresh} is missing)")
            continue
        problems += compare(committed, fresh)
        checked += 1
    for problem in problems[:40]:
        print(problem, file=sys.stderr)
    if problems:
        for command in commands:
            committed_run = figures / f"{command.replace('-', '_')}_run.json"
            notes = input_differences(committed_run, analysis / command / "run.json")
            if notes:
                print(f"{command} did not run on the committed inputs: {'; '.join(notes)}. The synthetic images depend "
                      "on the OpenCV build that drew them (docs/analysis.md, Reproducing the numbers "
                      "exactly).", file=sys.stderr)
        print(f"{len(problems)} differences between docs/figures and this regeneration", file=sys.stderr)
        return 1
    print(f"docs/figures data: {checked} tables regenerated identically")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
