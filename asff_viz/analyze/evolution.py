"""`evolution`: how the fusion weights change over a training run.

From checkpoints (`--checkpoints`, e.g. the periodic checkpoints of a run) and a dataset with ground truth:
the scale statistics of each checkpoint (mean and quartiles of the weights inside ground-truth boxes, per
target level, COCO size and source level), against the checkpoint's epoch. From a training output folder
(`--run`, written by `python -m asff_viz.train`): the fusion statistics logged during training
(fusion_weights.csv: training images, with augmentation), the per-layer gradient norms (gradient_norms.csv)
and the validation metrics (metrics.csv). Either source alone is enough.

Outputs (each figure also as .csv):
  evolution_fusion           checkpoints on the dataset: rows = target level, columns = size, lines = source
  evolution_training_fusion  the same layout from the training log
  evolution_gradient_norms   gradient norm of the model's parts, and of each level's fusion weight branch
  evolution_metrics          validation AP, AP50 and AP by size
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path

import numpy as np

from ..figures import plots
from ..figures.palette import SOURCE_COLORS
from ..figures.style import LEVEL_LABELS
from .cells import COCO_SIZE_LABELS
from .provenance import preprocessing_record
from .runner import (
    RunContext,
    add_common_options,
    add_dataset_options,
    add_matching_options,
    fusion_statistics_over,
    record_dataset_images,
)
from .sources import AnalysisDataset, AnalysisError, load_analysed_model

logger = logging.getLogger(__name__)
PART_NAMES = ("backbone", "neck", "fusion", "head")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evolution", help="fusion weights and gradient norms over training (checkpoints and/or training logs)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=[], help="checkpoints of one training run")
    parser.add_argument("--run", type=Path, help="training output folder with fusion_weights.csv, "
                                                 "gradient_norms.csv, metrics.csv")
    add_dataset_options(parser, required=False)
    add_matching_options(parser)
    # The training log measures sizes in input pixels (its images are augmented and resized): the checkpoints'
    # statistics do the same by default, so both figures show one quantity (`--size-basis original` for COCO's).
    parser.set_defaults(size_basis="input")
    add_common_options(parser, weights=False)
    parser.set_defaults(handler=run)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def layer_part(layer: str) -> str:
    """'backbone.dark3.…' -> 'backbone'; the four model parts of PART_NAMES ('other' for anything else)."""
    head = layer.split(".", 1)[0]
    return head if head in PART_NAMES else "other"


def fusion_weight_branch_level(layer: str) -> int | None:
    """The target level of a fusion weight-branch layer (weight_convs / weight_logits), else None."""
    parts = layer.split(".")
    if len(parts) >= 4 and parts[0] == "fusion" and parts[1] == "levels" and parts[3] in ("weight_convs",
                                                                                          "weight_logits"):
        return int(parts[2])
    return None


def gradient_norm_series(rows: list[dict]) -> tuple[list[dict], dict, dict]:
    """gradient_norms.csv rows -> (table rows, {part: (epochs, norm)}, {level: (epochs, norm)}).

    A group's norm is the root of the sum of its layers' squared mean norms. The layers are sampled on the
    same steps, so this approximates the norm of the group's whole gradient (exactly, for one sampled step).
    """
    parts: dict = {}
    branches: dict = {}
    for row in rows:
        epoch, norm = int(row["epoch"]), _float(row["grad_norm"])
        if not math.isfinite(norm):
            continue
        part = layer_part(row["layer"])
        parts.setdefault(part, {}).setdefault(epoch, 0.0)
        parts[part][epoch] += norm ** 2
        level = fusion_weight_branch_level(row["layer"])
        if level is not None:
            branches.setdefault(level, {}).setdefault(epoch, 0.0)
            branches[level][epoch] += norm ** 2
    table = []
    part_series, branch_series = {}, {}
    for part in [p for p in (*PART_NAMES, "other") if p in parts]:
        epochs = sorted(parts[part])
        values = np.sqrt([parts[part][e] for e in epochs])
        part_series[part] = (np.array(epochs), values)
        table += [{"group": part, "epoch": e, "grad_norm": float(v)} for e, v in zip(epochs, values, strict=True)]
    for level in sorted(branches):
        epochs = sorted(branches[level])
        values = np.sqrt([branches[level][e] for e in epochs])
        branch_series[level] = (np.array(epochs), values)
        table += [{"group": f"fusion weight branch, target {LEVEL_LABELS[level]}", "epoch": e, "grad_norm": float(v)}
                  for e, v in zip(epochs, values, strict=True)]
    return table, part_series, branch_series


def training_fusion_arrays(rows: list[dict]) -> tuple[list[int], np.ndarray, list[dict]]:
    """fusion_weights.csv rows -> (epochs, mean (E, 3 targets, 3 sizes, 3 sources), table rows)."""
    epochs = sorted({int(row["epoch"]) for row in rows})
    index = {epoch: i for i, epoch in enumerate(epochs)}
    mean = np.full((len(epochs), 3, len(COCO_SIZE_LABELS), 3), np.nan)
    table = []
    for row in rows:
        if row["size"] not in COCO_SIZE_LABELS:
            continue
        epoch, level, size = index[int(row["epoch"])], int(row["level"]), COCO_SIZE_LABELS.index(row["size"])
        values = [_float(row[f"weight_source_{k}"]) for k in range(3)]
        mean[epoch, level, size] = values
        for source, value in enumerate(values):
            table.append({"epoch": int(row["epoch"]), "target_level": level, "target": LEVEL_LABELS[level],
                          "size": row["size"], "source_level": source, "source": LEVEL_LABELS[source],
                          "boxes": int(_float(row.get("boxes")) or 0), "mean": value})
    return epochs, mean, table


def checkpoint_epoch(model, position: int) -> float:
    """The epoch a checkpoint finished (its metadata 'epoch'), or its position when the metadata has none."""
    epoch = model.metadata.get("epoch")
    return float(epoch) if epoch is not None else float(position)


def run(args: argparse.Namespace, argv=None) -> RunContext:
    context = RunContext("evolution", args, argv)
    if not args.checkpoints and args.run is None:
        raise AnalysisError("evolution needs --checkpoints (with --annotations and --images) and/or --run DIR.")
    wrote = 0
    if args.checkpoints:
        if args.annotations is None or args.images is None:
            raise AnalysisError("--checkpoints are analysed on a dataset: pass --annotations JSON and --images DIR.")
        dataset = AnalysisDataset(args.annotations, args.images, args.limit)
        record_dataset_images(context, dataset)
        points = []
        x_is_epoch = True
        seen: dict = {}
        saved_points = []
        for position, path in enumerate(args.checkpoints):
            model = load_analysed_model(path, context.device)
            model.require_fusion_weights("the evolution follows them over checkpoints of an ASFF run.")
            epoch = model.metadata.get("epoch")
            if epoch is not None and epoch in seen:
                # best.pt and last.pt of one run often hold the same epoch: one point per epoch.
                logger.info("evolution: %s is epoch %s like %s; left out", path, epoch, seen[epoch])
                continue
            seen[epoch] = path
            x_is_epoch &= epoch is not None
            context.record.add_checkpoint(model.record(f"checkpoint {position}"))
            context.record["preprocessing"] = preprocessing_record(context.size_for(model))
            statistics = fusion_statistics_over(context, model, dataset, description=Path(path).name)
            # What `replot` needs: each checkpoint's statistics, beside the figures.
            saved = statistics.save(context.out / f"evolution_checkpoint_{position}.npz")
            context.record.add_outputs([saved])
            points.append((checkpoint_epoch(model, position), str(path), statistics.by_coco_size()))
            saved_points.append({"epoch": checkpoint_epoch(model, position), "checkpoint": str(path),
                                 "statistics": saved.name})
            del model
        context.record["checkpoint_points"] = saved_points
        context.record["x_is_epoch"] = x_is_epoch
        draw_checkpoints(context, points, x_is_epoch)
        wrote += 1
    if args.run is not None:
        wrote += draw_run(context, Path(args.run))
    if wrote == 0:
        raise AnalysisError(f"{args.run}: found none of fusion_weights.csv, gradient_norms.csv, metrics.csv "
                            "with rows; nothing to plot.")
    context.finish()
    return context


def draw_checkpoints(context: RunContext, points: list, x_is_epoch: bool) -> None:
    """evolution_fusion from (epoch, checkpoint, by_coco_size groups) points (also what `replot` calls)."""
    points.sort(key=lambda point: point[0])
    epochs = [p[0] for p in points]
    mean = np.stack([[[s.mean[t] for _, s in groups] for t in range(3)] for _, _, groups in points])
    low = np.stack([[[s.quantiles[t, :, 1] for _, s in groups] for t in range(3)] for _, _, groups in points])
    high = np.stack([[[s.quantiles[t, :, 3] for _, s in groups] for t in range(3)] for _, _, groups in points])
    rows = []
    for epoch, path, groups in points:
        for size, summary in groups:
            rows += summary.rows(epoch=epoch, checkpoint=str(path), size=size)
    context.figure("evolution_fusion", lambda: plots.evolution_grid(
        epochs, mean, low=low, high=high, xlabel="epoch" if x_is_epoch else "checkpoint"), rows)


def draw_run(context: RunContext, run_dir: Path) -> int:
    """The figures of a training output folder's logs; returns how many were drawn (also used by `replot`)."""
    wrote = 0
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: no such training output folder (written by python -m asff_viz.train).")
    context.record["training_run"] = str(run_dir)
    fusion_log, norms_log, metrics_log = (run_dir / name for name in
                                          ("fusion_weights.csv", "gradient_norms.csv", "metrics.csv"))
    if fusion_log.is_file() and (rows := read_csv(fusion_log)):
        epochs, mean, table = training_fusion_arrays(rows)
        context.figure("evolution_training_fusion", lambda: plots.evolution_grid(epochs, mean), table)
        wrote += 1
    if norms_log.is_file() and (rows := read_csv(norms_log)):
        table, parts, branches = gradient_norm_series(rows)
        panels = [("model parts", [(name, *parts[name]) for name in parts]),
                  ("fusion weight branch", [(f"target {LEVEL_LABELS[level]}", *branches[level])
                                            for level in branches])]
        colors = {f"target {LEVEL_LABELS[level]}": SOURCE_COLORS[level] for level in range(3)}
        context.figure("evolution_gradient_norms", lambda: plots.line_panels(
            [p for p in panels if p[1]], ylabel="gradient norm", log_y=True, colors=colors), table)
        wrote += 1
    if metrics_log.is_file() and (rows := read_csv(metrics_log)):
        names = [n for n in ("AP", "AP50", "APs", "APm", "APl") if n in rows[0]]
        epochs = np.array([int(r["epoch"]) for r in rows])
        lines = [(name, epochs, np.array([_float(r[name]) for r in rows])) for name in names]
        table = [{"epoch": int(r["epoch"]), **{n: _float(r[n]) for n in names}} for r in rows]
        context.figure("evolution_metrics", lambda: plots.line_panels(
            [("validation", lines)], ylabel="average precision"), table)
        wrote += 1
    return wrote
