"""`scale-stats`: the quantitative Figure 3: fusion weights inside ground-truth boxes over a dataset.

For every ground-truth box and every target level l, the mean weight of each source level k over the level's
cells whose centre lies inside the box (the one cell holding the box centre when no centre does), grouped by
object size (COCO small / medium / large and finer sqrt(area) bins), by class, and by outcome (true positive,
missed, and, for detections matching nothing, false positive with the detected box). The background, the
cells outside every ground-truth box (one mean per image), is the reference the in-box weights are read
against. Statistics are streamed: sums and 50-bin histograms per group, never the maps.

Outputs (each figure also as .csv with the numbers drawn):
  fusion_composition   mean weight of each source per target level, COCO size and background (stacked bars)
  fusion_by_size       distributions per target x source, small / medium / large / background (violins)
  fusion_by_fine_size  mean and quartiles against sqrt(area), per target level (lines)
  fusion_by_class      mean weight per class and (target, source) (heatmap)
  fusion_by_outcome    distributions for true positives, misses and false positives (violins)
  fusion_contrasts.csv small/medium/large minus background, large minus small, ...: paired over images, 95 % CI
  scale_stats.csv      every group: size bin x class x outcome x target x source (long format)
  outcome_counts.csv   boxes per size and outcome, recall and precision at the matching threshold
  scale_stats.npz      the accumulators themselves (FusionStatistics.load), for re-plotting and merging
"""

from __future__ import annotations

import argparse

import numpy as np

from ..figures import plots
from ..ops.matching import OUTCOMES
from ..utils.argtypes import positive_int
from .cells import COCO_SIZE_LABELS, COCO_SIZE_OF_FINE, FINE_SIZE_EDGES, FINE_SIZE_LABELS
from .fusion_statistics import FusionStatistics, summary_rows
from .provenance import preprocessing_record
from .runner import (
    RunContext,
    add_common_options,
    add_dataset_options,
    add_matching_options,
    fusion_statistics_over,
    parse_counterfactual,
    record_dataset_images,
)
from .sources import AnalysisDataset, load_analysed_model


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "scale-stats", help="fusion weights inside ground-truth boxes by size, class and outcome",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counterfactual", type=parse_counterfactual, default=None,
                        help="analyse a fusion mode instead of the learned weights: uniform, one_hot:K, drop:K")
    parser.add_argument("--min-count", type=positive_int, default=5,
                        help="fine size bins with fewer boxes are left out of the line figure (default 5)")
    add_dataset_options(parser)
    add_matching_options(parser)
    add_common_options(parser)
    parser.set_defaults(handler=run)


# The size axis of fusion_composition and fusion_by_size; bg is the mean over the cells outside every
# ground-truth box, one value per image.
SIZE_TICKS = ("S", "M", "L", "bg")
SIZE_AXIS_LABEL = "COCO object size (small, medium, large) and background"


def full_rows(statistics: FusionStatistics) -> list[dict]:
    """Every non-empty (fine size bin, class, outcome) group, long format."""
    rows = []
    for size, size_label in enumerate(FINE_SIZE_LABELS):
        for class_index, class_name in enumerate(statistics.class_names):
            for outcome, outcome_name in enumerate(OUTCOMES):
                if statistics.counts[size, class_index, outcome] == 0:
                    continue
                summary = statistics.summary(sizes=[size], classes=[class_index], outcomes=[outcome])
                rows.extend(summary.rows(size_bin=size_label, coco_size=COCO_SIZE_LABELS[COCO_SIZE_OF_FINE[size]],
                                         class_name=class_name, outcome=outcome_name))
    return rows


CONTRASTS = (("small", "background"), ("medium", "background"), ("large", "background"), ("large", "small"),
             ("medium", "small"))


def contrast_rows(statistics: FusionStatistics, *, seed: int = 0, samples: int = 1000) -> list[dict]:
    """Paired differences of mean weights between size groups and the background, with 95 % bootstrap
    intervals over images (`FusionStatistics.contrast`)."""
    rows = []
    for first, second in CONTRASTS:
        estimate, lower, upper, images = statistics.contrast(first, second, samples=samples, seed=seed)
        for target in range(3):
            for source in range(3):
                low, high = float(lower[target, source]), float(upper[target, source])
                rows.append({"target_level": target, "source_level": source, "contrast": f"{first} - {second}",
                             "difference": float(estimate[target, source]), "ci95_low": low, "ci95_high": high,
                             "supported": bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0)),
                             "images": images})
    return rows


def write_figures(context: RunContext, statistics: FusionStatistics, *, min_count: int = 5) -> None:
    """All figures and tables of scale-stats from the accumulated statistics (no model needed)."""
    basis = getattr(context.args, "size_basis", "original")
    axis_label = f"object size in {basis} px (COCO S, M, L) and background"
    context.record["size_bins"] = {
        "basis": basis, "coco": "small: area < 32^2, medium: < 96^2, large: the rest",
        "fine_sqrt_area_edges": [e if np.isfinite(e) else None for e in FINE_SIZE_EDGES],
        "tables": "fusion_composition, fusion_by_size, fusion_contrasts, outcome_counts: COCO bins; "
                  "fusion_by_fine_size, scale_stats.csv: fine bins"}
    by_size = statistics.by_coco_size_and_background()
    fine = statistics.by_fine_size()
    by_class = statistics.by_class()
    by_outcome = statistics.by_outcome()
    context.figure("fusion_composition", lambda: plots.composition_bars(
        [("", by_size)], tick_labels=SIZE_TICKS, xlabel=axis_label), summary_rows(by_size, "size"))
    context.figure("fusion_by_size", lambda: plots.violin_grid(
        by_size, tick_labels=SIZE_TICKS, xlabel=axis_label), summary_rows(by_size, "size"))
    context.figure("fusion_by_fine_size", lambda: plots.fine_size_lines(fine, min_count=min_count),
                   summary_rows(fine, "size_bin"))
    context.figure("fusion_by_class", lambda: plots.class_heatmap(by_class), summary_rows(by_class, "class_name"))
    outcome_label = (f"outcome (detections with score $\\geq$ {context.args.match_score:g}; "
                     f"TP: IoU $\\geq$ {context.args.match_iou:g})")
    context.figure("fusion_by_outcome", lambda: plots.violin_grid(
        by_outcome, tick_labels=["TP", "miss", "FP"], xlabel=outcome_label), summary_rows(by_outcome, "outcome"))
    context.table("fusion_contrasts", contrast_rows(statistics, seed=context.seed))
    context.table("scale_stats", full_rows(statistics))
    context.table("outcome_counts", statistics.outcome_counts())
    path = statistics.save(context.out / "scale_stats.npz")
    context.record.add_outputs([path])


def run(args: argparse.Namespace, argv=None) -> RunContext:
    context = RunContext("scale-stats", args, argv)
    dataset = AnalysisDataset(args.annotations, args.images, args.limit)
    model = load_analysed_model(args.weights, context.device)
    model.require_fusion_weights("scale-stats needs an ASFF checkpoint.")
    context.record.add_checkpoint(model.record("model"))
    context.record["preprocessing"] = preprocessing_record(context.size_for(model))
    context.record["thresholds"] = {"conf": args.conf_threshold, "nms": args.nms_threshold,
                                    "match_score": args.match_score, "match_iou": args.match_iou}
    context.record["counterfactual"] = None if args.counterfactual is None else args.counterfactual.to_dict()
    record_dataset_images(context, dataset)
    statistics = fusion_statistics_over(context, model, dataset, counterfactual=args.counterfactual,
                                        description="scale-stats")
    write_figures(context, statistics, min_count=args.min_count)
    context.finish()
    return context
