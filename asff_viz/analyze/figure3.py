"""`figure3`: the paper's Figure 3 for chosen images: detections plus the fusion weight maps of every level.

Per image IMAGE (its file stem): figure3_IMAGE.pdf/.png (detections and the 3 x 3 weight maps, row = target
level, column = source level), figure3_IMAGE.csv (every weight of every cell: target level, source level, row,
col, cell box in original pixels, weight) and figure3_IMAGE_detections.csv. All images together:
figure3_overview.pdf/.png (one row per image: detections and the dominant source of each target level) with
figure3_overview.csv (per image and target level: share of cells dominated by each source, mean largest weight).
"""

from __future__ import annotations

import argparse

from ..figures import figure3 as figure3_plots
from ..figures.style import LEVEL_LABELS
from ..utils.argtypes import positive_int, unit_interval
from .provenance import preprocessing_record
from .runner import RunContext, add_common_options, mode_name, parse_counterfactual
from .sources import check_image_paths, load_analysed_model


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "figure3", help="the paper's Figure 3 (detections and fusion weight maps) for chosen images",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="+", required=True, help="image files")
    parser.add_argument("--counterfactual", type=parse_counterfactual, default=None,
                        help="draw the weights of a fusion mode instead of the learned ones: uniform, one_hot:K, "
                             "drop:K")
    parser.add_argument("--score-threshold", type=unit_interval, default=0.3, help="detections drawn (default >= 0.3)")
    parser.add_argument("--max-detections", type=positive_int, default=20, help="at most this many boxes per image")
    add_common_options(parser)
    parser.set_defaults(handler=run)


def weight_rows(trace) -> list[dict]:
    """Every cell's weights of a trace as long-format rows (cell boxes in original pixels)."""
    rows = []
    transform = trace.transform
    for target, (weights, stride) in enumerate(zip(trace.fusion_weights, trace.strides, strict=True)):
        _, height, width = weights.shape
        for row in range(height):
            for col in range(width):
                box = (col * stride * transform.scale_x, row * stride * transform.scale_y,
                       (col + 1) * stride * transform.scale_x, (row + 1) * stride * transform.scale_y)
                for source in range(3):
                    rows.append({"target_level": target, "target": LEVEL_LABELS[target], "source_level": source,
                                 "source": LEVEL_LABELS[source], "row": row, "col": col,
                                 "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
                                 "weight": float(weights[source, row, col])})
    return rows


def detection_rows(trace, score_threshold: float) -> list[dict]:
    rows = []
    for record in trace.detections:
        if record.score < score_threshold:
            continue
        rows.append({"class": record.class_name, "score": record.score, "x1": record.box_xyxy[0],
                     "y1": record.box_xyxy[1], "x2": record.box_xyxy[2], "y2": record.box_xyxy[3],
                     "level": record.level, "stride": trace.strides[record.level], "slot": record.slot,
                     "row": record.row, "col": record.col,
                     **{f"weight_source_{k}": float(record.weights_here[k]) for k in range(3)}})
    return rows


def overview_rows(traces, names) -> list[dict]:
    rows = []
    for trace, name in zip(traces, names, strict=True):
        for target, weights in enumerate(trace.fusion_weights):
            dominant = weights.argmax(axis=0)
            rows.append({"image": name, "target_level": target, "target": LEVEL_LABELS[target],
                         "cells": int(dominant.size),
                         **{f"dominant_source_{k}_share": float((dominant == k).mean()) for k in range(3)},
                         "mean_largest_weight": float(weights.max(axis=0).mean())})
    return rows


def draw(context: RunContext, traces: list, names: list[str], suffix: str) -> None:
    """Every figure and table of figure3 from the traces (also what `replot` calls)."""
    args = context.args
    for trace, name in zip(traces, names, strict=True):
        context.figure(f"figure3_{name}{suffix}", lambda trace=trace: figure3_plots.figure3(
            trace, score_threshold=args.score_threshold, max_detections=args.max_detections), weight_rows(trace))
        context.table(f"figure3_{name}{suffix}_detections", detection_rows(trace, args.score_threshold))
    context.figure(f"figure3_overview{suffix}", lambda: figure3_plots.figure3_overview(
        traces, names, score_threshold=args.score_threshold, max_detections=args.max_detections),
        overview_rows(traces, names))


def unique_names(paths) -> list[str]:
    """File stems, made unique with a numeric suffix when two images share a stem."""
    names, seen = [], {}
    for path in paths:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def run(args: argparse.Namespace, argv=None) -> RunContext:
    context = RunContext("figure3", args, argv)
    paths = check_image_paths(args.images)
    model = load_analysed_model(args.weights, context.device)
    model.require_fusion_weights("Figure 3 draws them: pass an ASFF checkpoint.")
    size = context.size_for(model)
    context.record.add_checkpoint(model.record("model"))
    context.record["preprocessing"] = preprocessing_record(size)
    context.record["thresholds"] = {"conf": args.conf_threshold, "nms": args.nms_threshold,
                                    "drawn_score": args.score_threshold}
    context.record["counterfactual"] = None if args.counterfactual is None else args.counterfactual.to_dict()
    names = unique_names(paths)
    learned = args.counterfactual is None or args.counterfactual.is_learned
    suffix = "" if learned else f"_{mode_name(args.counterfactual)}"
    traces = []
    for path, name in context.iterate(list(zip(paths, names, strict=True)), total=len(paths)):
        trace = context.cache.trace(model, path, size=size, counterfactual=args.counterfactual,
                                    conf_threshold=args.conf_threshold, nms_threshold=args.nms_threshold)
        context.record.add_image(path, context.cache.image_sha256(path))
        traces.append(trace)
        # What `replot` needs: the trace itself, next to its figure (no model, no cache then).
        trace_path = context.out / f"figure3_{name}{suffix}.trace.npz"
        trace.save(trace_path)
        context.record.add_outputs([trace_path])
    context.record["traces"] = [f"figure3_{name}{suffix}.trace.npz" for name in names]
    context.record["names"] = names
    draw(context, traces, names, suffix)
    context.finish()
    return context
