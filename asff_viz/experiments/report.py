"""The ablation's report: one row per fusion mode (metrics, paired AP against ASFF, cost, conflict rates with
intervals), the Markdown table and the figures."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .ablation import Preset

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def run_name(mode: str, seed: int) -> str:
    return f"{mode}_s{seed}"


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


LEVEL_SHORT = ("s32", "s16", "s8")


REGIONS_SHOWN = ((0, "positive"), (2, "background"))


def conflict_intervals(flows, names: Sequence[str], samples: int = 1000) -> dict[str, tuple]:
    """{run name: (conflict rate, 95 % bootstrap lower, upper, images)} of every run the gradient flow analysed
    (rates and bounds (3 source levels, regions)); computed once for the table and the figure."""
    intervals = {}
    for name in names:
        if flows is not None and name in flows.modes and flows.images.get(name):
            lower, upper = flows.bootstrap_interval(name, samples=samples, seed=0)
            intervals[name] = (flows.conflict_rates(name)[0], lower, upper, int(flows.images[name]))
    return intervals


def table_rows(evaluations: dict[str, dict], latency: dict[str, float], conflicts: dict[str, tuple],
               modes: Sequence[str], seeds: Sequence[int], skipped_steps: dict[str, int] | None = None) -> list[dict]:
    """One row per mode: metrics (mean and sample standard deviation over seeds), cost, the training steps its
    runs skipped (non-finite loss or gradients; summed over seeds), and the conflict rate of each source level at
    positives and at background with its 95 % image-bootstrap interval (first seed; `conflict_intervals`)."""
    rows = []
    for mode in modes:
        names = [run_name(mode, seed) for seed in seeds]
        row: dict = {"mode": mode, "seeds": len(names),
                     "skipped_steps": sum((skipped_steps or {}).get(name, 0) for name in names)}
        for metric in METRICS:
            mean, spread = _mean_spread([evaluations[n]["metrics"].get(metric) for n in names])
            row[metric], row[f"{metric}_sd"] = round(mean, 4), round(spread, 4)
        row["parameters_M"] = round(evaluations[names[0]]["parameters"] / 1e6, 3)
        row["gflop_416"] = round(evaluations[names[0]]["gflop_416"], 2)
        row["latency_ms_416"] = round(float(np.mean([latency[n] for n in names])), 1)
        conflict = conflicts.get(names[0])
        for region, label in REGIONS_SHOWN:
            for level, short in enumerate(LEVEL_SHORT):
                key = f"conflict_{label}_{short}"
                if conflict is not None:
                    rate, lower, upper, _ = conflict
                    row[key] = round(float(rate[level, region]), 4)
                    row[f"{key}_low"] = round(float(lower[level, region]), 4)
                    row[f"{key}_high"] = round(float(upper[level, region]), 4)
                else:
                    row[key] = row[f"{key}_low"] = row[f"{key}_high"] = None
        row["gradflow_images"] = conflict[3] if conflict is not None else 0
        rows.append(row)
    return rows


def add_paired_ap(rows: list[dict], runs: dict[str, Path], modes: Sequence[str], preset: Preset, annotations: Path,
                  images: Path, out: Path, cache: Path) -> None:
    """AP of asff minus each other mode on the same images, with its 95 % paired image-bootstrap interval
    (`analyze compare --bootstrap`, first seed): the interval a one-seed comparison can have."""
    from ..analyze.cli import main as analyze_main

    for row in rows:
        row["asff_minus_AP"] = row["asff_minus_AP_low"] = row["asff_minus_AP_high"] = None
    others = [mode for mode in modes if mode != "asff"]
    if "asff" not in modes or not others:
        return
    seed = preset.seeds[0]
    order = ["asff", *others]
    analyze_main(["compare", "--weights", *(str(runs[run_name(mode, seed)]) for mode in order), "--labels", *order,
                  "--annotations", str(annotations), "--images", str(images), "--size", str(preset.eval_size),
                  "--bootstrap", "1000", "--out", str(out / "compare"), "--cache", str(cache), "--no-progress"])
    with open(out / "compare" / "compare_ap_paired.csv") as handle:
        paired = {line["minus"]: line for line in csv.DictReader(handle) if line["metric"] == "AP"}
    for row in rows:
        if row["mode"] in paired:
            line = paired[row["mode"]]
            row["asff_minus_AP"] = round(float(line["difference"]), 4)
            row["asff_minus_AP_low"] = round(float(line["ci95_low"]), 4)
            row["asff_minus_AP_high"] = round(float(line["ci95_high"]), 4)


def markdown_table(rows: list[dict], seeds: Sequence[int]) -> str:
    def metric(row, name):
        value, spread = row[name], row[f"{name}_sd"]
        return f"{value:.3f}" + (f" ± {spread:.3f}" if len(seeds) > 1 and np.isfinite(spread) else "")

    def conflict(row, key):
        if row[key] is None:
            return "n/a"
        return f"{row[key]:.3f} [{row[key + '_low']:.3f}, {row[key + '_high']:.3f}]"

    head = ["mode", *METRICS, "AP: asff minus this [95 % CI]", "params (M)", "GFLOP 416", "CPU ms 416",
            *(f"conflict {label} {short}" for _, label in REGIONS_SHOWN for short in LEVEL_SHORT)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        paired = ("n/a" if row.get("asff_minus_AP") is None else
                  f"{row['asff_minus_AP']:+.3f} [{row['asff_minus_AP_low']:+.3f}, {row['asff_minus_AP_high']:+.3f}]")
        cells = [row["mode"], *(metric(row, name) for name in METRICS), paired, f"{row['parameters_M']:.2f}",
                 f"{row['gflop_416']:.2f}", f"{row['latency_ms_416']:.1f}",
                 *(conflict(row, f"conflict_{label}_{short}") for _, label in REGIONS_SHOWN for short in LEVEL_SHORT)]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("one seed: no spread can be given" if len(seeds) == 1 else
            f"mean ± sample standard deviation over {len(seeds)} seeds")
    return "\n".join(lines) + f"\n\nAP: COCO metrics on the validation split ({note}). Conflict: share of active " \
        "locations of each source level where two target levels' value-path gradients of the training loss point " \
        "apart (cosine < 0), at ground-truth positives and at background, with 95 % image-bootstrap intervals; " \
        "n/a where the fusion has no per-source weights (baseline: no fusion; concat: a 1x1 projection).\n"


def skipped_steps_markdown(skipped_steps: dict[str, int]) -> str:
    """The line under the table that says which runs left steps out (their loss or gradients were not finite):
    such a run trained on fewer updates than the others, which a reader of the AP column should know."""
    if not skipped_steps:
        return ""
    hit = {name: count for name, count in skipped_steps.items() if count}
    if not hit:
        return "\nTraining steps skipped for a non-finite loss or gradients: none in any run.\n"
    listed = ", ".join(f"`{name}` {count}" for name, count in hit.items())
    return (f"\nTraining steps skipped for a non-finite loss or gradients (their update left out): {listed}; "
            "none in the other runs.\n")


def write_figures(out: Path, rows: list[dict], conflicts: dict[str, tuple], modes: Sequence[str],
                  seeds: Sequence[int]) -> list[Path]:
    from ..figures import flow_plots, plots
    from ..figures.style import publication_style, save_figure

    paths = []
    with publication_style():
        series = [(name, [row[name] for row in rows]) for name in ("AP", "AP50", "APs", "APl")]
        top = max([row[name] for row in rows for name in ("AP", "AP50", "APs", "APl")] + [0.05])
        figure = plots.grouped_bars([row["mode"] for row in rows], series, ylabel="COCO metric (validation)",
                                    ylim=(0, min(1.0, 1.15 * top)))
        paths += save_figure(figure, out, "ablation_ap", [
            {"mode": row["mode"], **{name: row[name] for name in METRICS},
             **{f"{name}_sd": row[f"{name}_sd"] for name in METRICS}} for row in rows])
        labels = [mode for mode in modes if run_name(mode, seeds[0]) in conflicts]
        if labels:
            rates, lower, upper = (np.stack([conflicts[run_name(mode, seeds[0])][part] for mode in labels])
                                   for part in range(3))
            figure = flow_plots.conflict_bars(labels, rates, lower, upper, regions=(0, 2))
            paths += save_figure(figure, out, "ablation_conflict", [
                {"mode": label, "source_level": level, "region": region_name,
                 "conflict_rate": float(rates[m, level, region]), "ci95_low": float(lower[m, level, region]),
                 "ci95_high": float(upper[m, level, region])}
                for m, label in enumerate(labels) for level in range(3) for region, region_name in REGIONS_SHOWN])
    return paths


