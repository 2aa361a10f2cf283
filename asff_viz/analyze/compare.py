"""`compare`: two checkpoints (e.g. ASFF vs sum fusion) or fusion modes of one checkpoint on the same images:
detections, COCO AP by object size, and the fusion statistics side by side.

Variants are every `--weights` checkpoint with its learned fusion, then the first checkpoint under every
`--counterfactual` (uniform, one_hot:K, drop:K). At least two variants are needed.

Outputs (each figure also as .csv):
  compare_ap          AP, AP50, AP75, APs, APm, APl per variant (pycocotools on the images used)
  compare_recall      recall by COCO size at the matching thresholds (TP / (TP + missed))
  compare_fusion      mean weight of each source per target level and size, one row per variant with weights
  compare_detections  the first --show images, one column per variant (dashed white: ground truth)
  compare_outcomes.csv  true positives, misses, false positives, recall and precision per variant and size
  compare_ap_paired.csv AP and AP50 of the first variant minus each other one, paired image bootstrap, 95 % CI
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from ..data.coco import xyxy_to_coco_bbox
from ..figures import figure3, plots
from ..inference.coco_eval import METRIC_NAMES, coco_metrics
from ..inference.transforms import read_image
from ..utils.argtypes import positive_int, unit_interval
from ..utils.fileio import atomic_write
from .ap_bootstrap import MatchedImages, paired_ap_difference
from .cells import COCO_SIZE_LABELS
from .fusion_statistics import summary_rows
from .provenance import preprocessing_record
from .runner import (
    RunContext,
    add_common_options,
    add_dataset_options,
    add_matching_options,
    fusion_statistics_over,
    mode_label,
    parse_counterfactual,
    record_dataset_images,
)
from .sources import AnalysisDataset, AnalysisError, load_analysed_model

logger = logging.getLogger(__name__)

COCO_MAX_DETECTIONS = 100


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="two checkpoints or fusion modes side by side: detections, AP by size, fusion statistics",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", default=[None],
                        help="one or two checkpoints (default: the embedded model)")
    parser.add_argument("--counterfactual", action="append", type=parse_counterfactual, default=[],
                        help="also run the first checkpoint under this fusion mode (repeatable): uniform, "
                             "one_hot:K, drop:K")
    parser.add_argument("--labels", nargs="+", help="names of the variants in the figures, in order")
    parser.add_argument("--bootstrap", type=positive_int, default=200,
                        help="image resamples for the paired AP difference intervals (default 200)")
    parser.add_argument("--show", type=positive_int, default=3, help="images in the detections figure (default 3)")
    parser.add_argument("--score-threshold", type=unit_interval, default=0.3, help="detections drawn (default >= 0.3)")
    add_dataset_options(parser)
    add_matching_options(parser)
    add_common_options(parser, weights=False)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, argv=None) -> RunContext:
    context = RunContext("compare", args, argv)
    dataset = AnalysisDataset(args.annotations, args.images, args.limit)
    models = []
    for position, weights in enumerate(args.weights):
        model = load_analysed_model(weights, context.device)
        dataset.check_classes(model)
        context.record.add_checkpoint(model.record(f"variant model {position}"))
        models.append(model)
    variants = [(model, None, model.label) for model in models]
    for counterfactual in args.counterfactual:
        if not models[0].has_fusion_weights:
            raise AnalysisError(f"{models[0].path}: --counterfactual needs an ASFF checkpoint first in --weights.")
        variants.append((models[0], counterfactual, f"{models[0].label} ({mode_label(counterfactual)})"))
    if len(variants) < 2:
        raise AnalysisError("compare needs two variants: two --weights, or one and --counterfactual uniform.")
    seen: dict = {}
    for model, counterfactual, _ in variants:  # the same weights twice make every difference zero by construction
        key = (model.sha256, None if counterfactual is None else repr(counterfactual.to_dict()))
        if key in seen:
            logger.warning("warning: %s and %s are the same weights (sha256 %s...) in the same mode: their "
                           "differences are zero by construction", seen[key], model.path, model.sha256[:12])
        seen.setdefault(key, model.path)
    labels = [label for _, _, label in variants]
    if len(set(labels)) < len(labels):  # two files with one stem: number them
        labels = [f"{i + 1}: {label}" for i, label in enumerate(labels)]
    if args.labels:
        if len(args.labels) != len(variants):
            raise AnalysisError(f"--labels names {len(args.labels)} variants but there are {len(variants)}: "
                                f"{labels}")
        labels = list(args.labels)
    context.record["variants"] = [{"label": label, "checkpoint": model.path, "sha256": model.sha256,
                                   "counterfactual": None if cf is None else cf.to_dict()}
                                  for (model, cf, _), label in zip(variants, labels, strict=True)]
    context.record["preprocessing"] = preprocessing_record(context.size_for(models[0]))
    context.record["thresholds"] = {"conf": args.conf_threshold, "nms": args.nms_threshold,
                                    "match_score": args.match_score, "match_iou": args.match_iou}
    record_dataset_images(context, dataset)

    show = min(max(args.show, 0), len(dataset))
    shown_ids = {dataset[i].image_id for i in range(show)}
    shown_results = {image_id: [] for image_id in shown_ids}
    metrics, statistics, matched = [], [], []
    for (model, counterfactual, _), label in zip(variants, labels, strict=True):
        results = []

        def collect(image, result, results=results):
            # COCOeval scores the best 100 detections of an image (maxDets), so only those are kept: AP is
            # unchanged and the results stay small on large datasets.
            order = np.argsort(-result.scores, kind="stable")[:COCO_MAX_DETECTIONS]
            keep = order[result.scores[order] >= args.conf_threshold]
            bboxes = xyxy_to_coco_bbox(result.boxes[keep]) if len(keep) else []
            for box, score, class_index in zip(bboxes, result.scores[keep], result.labels[keep], strict=True):
                results.append({"image_id": int(image.image_id),
                                "category_id": int(dataset.category_ids[int(class_index)]),
                                "bbox": [round(float(v), 3) for v in box], "score": round(float(score), 6)})
            if image.image_id in shown_results:
                shown_results[image.image_id].append(result)

        statistics.append(fusion_statistics_over(context, model, dataset, counterfactual=counterfactual,
                                                 description=label, on_result=collect))
        metrics.append(coco_metrics(dataset.coco, results, dataset.image_ids))
        matched.append(MatchedImages(dataset.coco, results, dataset.image_ids))

    paired_rows = []
    for label, other in zip(labels[1:], matched[1:], strict=True):
        paired = paired_ap_difference(matched[0], other, samples=args.bootstrap, seed=context.seed)
        for metric in ("AP", "AP50"):
            difference, low, high = paired[metric]
            paired_rows.append({"variant": labels[0], "minus": label, "metric": metric, "difference": difference,
                                "ci95_low": low, "ci95_high": high, "supported": bool(low > 0 or high < 0),
                                "images": paired["images"], "resamples": paired["resamples"]})
    shown = []
    for index in range(show):
        image = dataset[index]
        shown.append((str(image.path), image.ground_truth, shown_results[image.image_id]))
    # What `replot` needs, beside the figures: each variant's statistics, the metrics, the shown detections.
    context.record["labels"], context.record["metrics"], context.record["paired"] = labels, metrics, paired_rows
    context.record["has_fusion_weights"] = [model.has_fusion_weights for model, _, _ in variants]
    context.record["class_names"] = list(dataset.class_names)
    for index, variant_statistics in enumerate(statistics):
        context.record.add_outputs([variant_statistics.save(context.out / f"compare_variant_{index}.npz")])
    context.record.add_outputs([save_shown(context.out / "compare_shown.npz", shown)])
    draw(context, labels, metrics, statistics, paired_rows, context.record.data["has_fusion_weights"], shown,
         list(dataset.class_names))
    context.finish()
    return context


def draw(context: RunContext, labels: list[str], metrics: list[dict], statistics: list, paired_rows: list[dict],
         has_fusion_weights: list[bool], shown: list, class_names: list[str]) -> None:
    """Every figure and table of compare from its results (also what `replot` calls).

    shown: (image path, GroundTruth, [ImageResult per variant]) of the images drawn in compare_detections.
    """
    args = context.args
    context.table("compare_ap_paired", paired_rows)
    ap_rows = [{"variant": label, **{name: m[name] for name in METRIC_NAMES}} for label, m in zip(labels, metrics,
                                                                                                   strict=True)]
    context.figure("compare_ap", lambda: plots.grouped_bars(
        list(METRIC_NAMES), [(label, [m[n] for n in METRIC_NAMES]) for label, m in zip(labels, metrics, strict=True)],
        ylabel="average precision", ylim=(0, 1)), ap_rows)
    outcome_rows = [{"variant": label, **row} for label, s in zip(labels, statistics, strict=True)
                    for row in s.outcome_counts()]
    context.table("compare_outcomes", outcome_rows)
    recall = [(label, [row["recall"] for row in s.outcome_counts()[:len(COCO_SIZE_LABELS)]])
              for label, s in zip(labels, statistics, strict=True)]
    context.figure("compare_recall", lambda: plots.grouped_bars(
        list(COCO_SIZE_LABELS), recall, ylabel="recall",
        xlabel=f"COCO object size; found: score $\\geq$ {args.match_score:g}, IoU $\\geq$ {args.match_iou:g}"),
        [r for r in outcome_rows if r["size"] != "all"])
    weighted = [(label, s) for weights, label, s in zip(has_fusion_weights, labels, statistics, strict=True)
                if weights]
    if weighted:
        rows = [(label, s.by_coco_size()) for label, s in weighted]
        context.figure("compare_fusion", lambda: plots.composition_bars(
            rows, tick_labels=["S", "M", "L"], xlabel="object size (COCO: small, medium, large)",
            row_height=1.1),
            [{"variant": label, **row} for label, groups in rows for row in summary_rows(groups, "size")])
    if shown:
        images = [read_image(path) for path, _, _ in shown]
        truths = [truth for _, truth, _ in shown]
        results = [variant_results for _, _, variant_results in shown]
        detection_rows = [
            {"image": Path(shown[i][0]).name, "variant": label, "class": class_names[int(result.labels[j])],
             "score": float(result.scores[j]), "x1": result.boxes[j, 0], "y1": result.boxes[j, 1],
             "x2": result.boxes[j, 2], "y2": result.boxes[j, 3], "level": int(result.levels[j])}
            for i in range(len(shown)) for label, result in zip(labels, results[i], strict=True)
            for j in range(len(result.scores)) if result.scores[j] >= args.score_threshold]
        context.figure("compare_detections", lambda: figure3.detections_grid(
            images, truths, results, labels, class_names=class_names, score_threshold=args.score_threshold),
            detection_rows)


def save_shown(path: Path, shown: list) -> Path:
    """The shown images' paths, ground truth and per-variant detections as one .npz (no pickles)."""
    arrays = {"paths": np.array([p for p, _, _ in shown], dtype=str)}
    for index, (_, truth, results) in enumerate(shown):
        for name in ("boxes", "labels", "areas", "crowd"):
            arrays[f"{index}/truth/{name}"] = getattr(truth, name)
        for variant, result in enumerate(results):
            for name in ("boxes", "scores", "labels", "levels"):
                arrays[f"{index}/{variant}/{name}"] = getattr(result, name)
    atomic_write(path, lambda stream: np.savez_compressed(stream, **arrays))
    return path


def load_shown(path: Path, variants: int) -> list:
    """`save_shown`'s file -> [(path, GroundTruth, [detections per variant])] (results as plain namespaces)."""
    from types import SimpleNamespace

    from .sources import GroundTruth

    with np.load(path, allow_pickle=False) as data:
        shown = []
        for index, image_path in enumerate(data["paths"].tolist()):
            truth = GroundTruth(*(data[f"{index}/truth/{name}"] for name in ("boxes", "labels", "areas", "crowd")))
            results = [SimpleNamespace(**{name: data[f"{index}/{variant}/{name}"]
                                          for name in ("boxes", "scores", "labels", "levels")})
                       for variant in range(variants)]
            shown.append((image_path, truth, results))
    return shown


__all__ = ["add_parser", "draw", "load_shown", "run", "save_shown"]
