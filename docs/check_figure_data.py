"""Compare the numbers behind the committed docs figures (docs/figures/*.csv) with a fresh regeneration.

    python docs/check_figure_data.py runs/analysis docs/figures

Each committed CSV is matched with the regenerated one of the same name under the analysis folder; numbers must
agree to 1e-6 (relative) and text exactly. Exit status 1, with the differing cells, when they do not: the docs
would otherwise show figures their own commands no longer make (a changed statistic, another OpenCV drawing the
synthetic images differently, ...).
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

# docs/figures CSV -> the command folder that writes it
SOURCES = {"fusion_contrasts.csv": "scale-stats", "gradflow_conflict_controls.csv": "gradflow",
           "gradflow_conflict_paired.csv": "gradflow", "compare_ap_paired.csv": "compare"}


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


def main(argv: list[str]) -> int:
    analysis, figures = Path(argv[0]), Path(argv[1])
    problems, checked = [], 0
    for name, command in SOURCES.items():
        committed, fresh = figures / name, analysis / command / name
        if not committed.is_file() or not fresh.is_file():
            problems.append(f"{name}: missing ({committed if not committed.is_file() else fresh})")
            continue
        problems += compare(committed, fresh)
        checked += 1
    for problem in problems[:40]:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} differences between docs/figures and this regeneration", file=sys.stderr)
        return 1
    print(f"docs/figures data: {checked} tables regenerated identically")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
