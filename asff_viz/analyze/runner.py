"""What every analysis command shares: options, the run context (output folder, cache, device, progress bar,
provenance) and the per-image loop that feeds the fusion statistics."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..data.loading import default_workers
from ..figures.style import publication_style, save_figure
from ..inference.postprocess import DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD
from ..inference.transforms import header_size
from ..introspection.capture import COUNTERFACTUAL_KINDS, Counterfactual
from ..ops.matching import FALSE_POSITIVE, MISSED, TRUE_POSITIVE, match_to_ground_truth
from ..utils.argtypes import device, input_size, non_negative_int, output_folder, positive_int, unit_interval
from .batches import DEFAULT_BATCH_SIZE
from .cells import background_weights, mean_weights_in_box, size_bins
from .fusion_statistics import FusionStatistics
from .provenance import RunRecord
from .results_cache import AnalysisCache, ImageResult
from .sources import AnalysedModel, AnalysisDataset, AnalysisError, GroundTruth, resolve_device

logger = logging.getLogger(__name__)

MATCH_SCORE_THRESHOLD = 0.3
MATCH_IOU_THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------------ options


def add_common_options(parser: argparse.ArgumentParser, *, weights: bool = True) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out", required=True, type=lambda text: Path(output_folder(text)),
                       help="output folder (figures, CSV tables, run.json)")
    if weights:
        group.add_argument("--weights", help="checkpoint (asff_viz or official ASFF); default: the embedded model")
    group.add_argument("--size", type=input_size,
                       help="square input size, a multiple of 32 (default: the checkpoint's)")
    group.add_argument("--device", type=lambda text: text if text == "auto" else device(text), default="auto",
                       help="cpu, cuda, cuda:1 or auto (cuda when available)")
    group.add_argument("--conf-threshold", type=unit_interval, default=DISPLAY_CONF_THRESHOLD,
                       help="keep detections with objectness x class probability >= this (default 0.01)")
    group.add_argument("--nms-threshold", type=unit_interval, default=NMS_THRESHOLD,
                       help="per-class NMS IoU (0.65)")
    group.add_argument("--seed", type=int, default=0, help="seed of every random choice (bootstrap resampling)")
    group.add_argument("--cache", type=Path, help="trace cache folder (default OUT/cache)")
    group.add_argument("--no-cache", action="store_true", help="do not read or write cached traces")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                       help=f"images per forward over a dataset (default {DEFAULT_BATCH_SIZE}); changes nothing "
                            "but speed and memory (results agree to float round-off)")
    group.add_argument("--workers", type=non_negative_int, default=None,
                       help="processes that read images while the model runs (default: 1 on 2 to 7 cores, 2 "
                            "from 8, 0 on one core)")
    group.add_argument("--png-dpi", type=positive_int, default=300, help="resolution of the PNG figures (default 300)")


def add_dataset_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_argument_group("dataset (COCO format, with ground truth)")
    group.add_argument("--annotations", required=required, type=Path, help="COCO annotation JSON")
    group.add_argument("--images", required=required, type=Path, help="folder of the images it names")
    group.add_argument("--limit", type=positive_int, help="use only the first N images of the annotation file")


def add_matching_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("true positives, false positives and misses")
    group.add_argument("--match-score", type=unit_interval, default=MATCH_SCORE_THRESHOLD,
                       help="detections with score >= this are matched to ground truth (default 0.3)")
    group.add_argument("--size-basis", choices=("original", "input"), default="original",
                       help="measure object sizes in original-image pixels (COCO's convention, default) or in "
                            "network-input pixels after the resize (compares across datasets and input sizes)")
    group.add_argument("--match-iou", type=unit_interval, default=MATCH_IOU_THRESHOLD,
                       help="IoU needed for a true positive, same class, greedy by score (default 0.5)")


def parse_counterfactual(text: str) -> Counterfactual:
    """'learned', 'uniform', 'one_hot:K' or 'drop:K' (K = source level 0, 1, 2) -> Counterfactual."""
    kind, _, source = text.partition(":")
    if kind not in COUNTERFACTUAL_KINDS:
        raise argparse.ArgumentTypeError(f"unknown fusion mode {text!r}; use one of learned, uniform, one_hot:K, "
                                         "drop:K (K = source level 0, 1 or 2)")
    try:
        return Counterfactual(kind, int(source) if source else None)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def mode_label(counterfactual: Counterfactual) -> str:
    """A short label for figures: learned, uniform, one-hot s16, drop s8."""
    from ..figures.style import SHORT_LEVEL_LABELS

    if counterfactual.source is None:
        return counterfactual.kind
    return f"{counterfactual.kind.replace('_', '-')} {SHORT_LEVEL_LABELS[counterfactual.source]}"


def mode_name(counterfactual: Counterfactual) -> str:
    """A short file- and table-friendly name: learned, uniform, one_hot_1, drop_2."""
    return counterfactual.kind if counterfactual.source is None else f"{counterfactual.kind}_{counterfactual.source}"


# -------------------------------------------------------------------------------------------- run context


class RunContext:
    """The output folder, cache, device, progress bar and provenance record of one command run."""

    def __init__(self, command: str, args: argparse.Namespace, argv: list[str] | None = None) -> None:
        self.command = command
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(getattr(args, "device", "auto"))
        self.seed = int(getattr(args, "seed", 0))
        torch.manual_seed(self.seed)
        cache_dir = None if getattr(args, "no_cache", False) else (args.cache or self.out / "cache")
        self.cache = AnalysisCache(cache_dir)
        self.progress = not getattr(args, "no_progress", False)
        self.record = RunRecord(command, vars(args), argv)
        self.record["device"] = str(self.device)
        self.record["cache"] = {"directory": None if cache_dir is None else str(cache_dir)}
        if self.size_option is not None and (self.size_option <= 0 or self.size_option % 32):
            raise AnalysisError(f"--size must be a positive multiple of 32, got {self.size_option}")

    @property
    def size_option(self) -> int | None:
        return getattr(self.args, "size", None)

    def size_for(self, model: AnalysedModel) -> int:
        return int(self.size_option or model.input_size)

    @property
    def batching(self) -> dict:
        """batch_size and workers of the dataset passes (`AnalysisCache.image_results`)."""
        workers = getattr(self.args, "workers", None)
        return {"batch_size": int(getattr(self.args, "batch_size", None) or DEFAULT_BATCH_SIZE),
                "workers": default_workers() if workers is None else int(workers)}

    def iterate(self, items: Iterable, total: int | None = None, description: str = "") -> Iterable:
        from tqdm import tqdm

        return tqdm(items, total=total, desc=description or self.command, disable=not self.progress,
                    dynamic_ncols=True, file=sys.stderr, leave=False)

    def figure(self, name: str, build: Callable, rows=None, columns=None) -> list[Path]:
        """Build a figure in the publication style, write NAME.pdf/.png (and NAME.csv from rows)."""
        with publication_style():
            figure = build()
        paths = save_figure(figure, self.out, name, rows, columns, png_dpi=getattr(self.args, "png_dpi", 300))
        self.record.add_outputs(paths)
        return paths

    def table(self, name: str, rows, columns=None) -> Path:
        from ..figures.style import write_csv

        path = write_csv(self.out / f"{name}.csv", rows, columns)
        self.record.add_outputs([path])
        return path

    def finish(self) -> Path:
        self.record["cache"] = {**self.record.data["cache"], "hits": self.cache.hits, "misses": self.cache.misses}
        path = self.record.write(self.out)
        logger.info("%s: wrote %d files to %s (cache %d hits, %d misses)", self.command,
                    len(self.record.data["outputs"]) + 1, self.out, self.cache.hits, self.cache.misses)
        return path


# --------------------------------------------------------------------------------- per-image statistics


def add_image_statistics(statistics: FusionStatistics, result: ImageResult, truth: GroundTruth, *,
                         score_threshold: float = MATCH_SCORE_THRESHOLD,
                         iou_threshold: float = MATCH_IOU_THRESHOLD, size_basis: str = "original") -> np.ndarray:
    """Add one image's boxes to `statistics`; returns the (3,) counts of true positives, misses, false positives.

    Ground-truth boxes (not crowd) count as true positives when matched, else as missed, with their own
    class and their annotation area; unmatched detections count as false positives, with the predicted box,
    class and box area. Each box contributes its (3, 3) mean fusion weights inside the box (see
    `cells.mean_weights_in_box`); models without fusion weights only add to the counts. size_basis: the
    pixels the size bins measure areas in, "original" (COCO's: the image as stored) or "input" (the network's
    input, after the square resize: what the levels see, and what compares across datasets and input sizes).
    """
    if not np.isfinite(result.boxes).all():
        # An untrained model can decode boxes of infinite size (exp overflow); they match nothing and have no
        # cells, so they are left out rather than counted as false positives of undefined size.
        finite = np.isfinite(result.boxes).all(axis=1)
        result = replace(result, boxes=result.boxes[finite], scores=result.scores[finite],
                         labels=result.labels[finite], levels=result.levels[finite])
    match = match_to_ground_truth(result.boxes, result.scores, result.labels, truth.boxes, truth.labels,
                             truth_crowd=truth.crowd, score_threshold=score_threshold, iou_threshold=iou_threshold)
    counted = ~truth.crowd
    truth_boxes, truth_labels = truth.boxes[counted], truth.labels[counted]
    truth_outcome = np.where(match.ground_truth_matched[counted], TRUE_POSITIVE, MISSED)
    false_positive = match.detection_outcome == FALSE_POSITIVE
    boxes = np.concatenate([truth_boxes, result.boxes[false_positive]])
    labels = np.concatenate([truth_labels, result.labels[false_positive]])
    detected = result.boxes[false_positive]
    detected_areas = (detected[:, 2] - detected[:, 0]) * (detected[:, 3] - detected[:, 1])
    areas = np.concatenate([truth.areas[counted], detected_areas])
    outcomes = np.concatenate([truth_outcome, np.full(int(false_positive.sum()), FALSE_POSITIVE)])
    transform = result.transform
    scale = np.array([transform.scale_x, transform.scale_y, transform.scale_x, transform.scale_y])
    if size_basis == "input":
        areas = areas / (transform.scale_x * transform.scale_y)
    elif size_basis != "original":
        raise ValueError(f"size_basis must be 'original' or 'input', got {size_basis!r}")
    sizes = size_bins(areas)
    if result.fusion_weights is not None:
        background = background_weights(result.fusion_weights, truth.boxes / scale, result.strides)
        if background is not None:
            statistics.add_background(background)
        weights = (np.stack([mean_weights_in_box(result.fusion_weights, box / scale, result.strides)
                             for box in boxes]) if len(boxes) else np.zeros((0, 3, 3)))
        if len(boxes):
            statistics.add(weights, sizes, labels, outcomes)
        statistics.add_image(weights[:len(truth_boxes)], sizes[:len(truth_boxes)], background)
    elif len(boxes):
        np.add.at(statistics.counts, (sizes, labels, outcomes), 1)
    statistics.images += 1
    return np.bincount(outcomes, minlength=3)


def fusion_statistics_over(context: RunContext, model: AnalysedModel, dataset: AnalysisDataset, *,
                           counterfactual: Counterfactual | None = None, description: str = "",
                           on_result: Callable | None = None) -> FusionStatistics:
    """Stream the dataset through the (cached) model and accumulate `FusionStatistics`.

    on_result(image, result): optional callback per image (e.g. to collect COCO results); nothing else is kept.
    """
    dataset.check_classes(model)
    statistics = FusionStatistics(dataset.class_names)
    size = context.size_for(model)
    images = list(dataset)
    results = context.cache.image_results(model, [image.path for image in images], size=size,
                                          counterfactual=counterfactual, conf_threshold=context.args.conf_threshold,
                                          nms_threshold=context.args.nms_threshold, **context.batching)
    for image, result in context.iterate(zip(images, results, strict=True), total=len(images),
                                         description=description or model.label):
        add_image_statistics(statistics, result, image.ground_truth, score_threshold=context.args.match_score,
                             size_basis=getattr(context.args, "size_basis", "original"),
                             iou_threshold=context.args.match_iou)
        if on_result is not None:
            on_result(image, result)
    return statistics


def record_dataset_images(context: RunContext, dataset: AnalysisDataset) -> None:
    """The dataset and each image used (file name and sha256) in run.json; a warning, before any model runs,
    for images whose size is not the one the annotation file gives (their boxes would be misplaced)."""
    record = dataset.record()
    mismatched = []
    for image in dataset:
        context.record.add_image(image.file_name, context.cache.image_sha256(image.path), image_id=image.image_id)
        size = header_size(image.path)
        if size is not None and size != (image.width, image.height):
            mismatched.append((image, size))
    context.record["dataset"] = {**record, "size_mismatches": [image.file_name for image, _ in mismatched]}
    if mismatched:
        image, (width, height) = mismatched[0]
        logger.warning("warning: %d of %d images are not the size %s gives them (%s is %dx%d, the file says "
                       "%dx%d); their ground-truth boxes follow the annotation file, so they may be misplaced",
                       len(mismatched), len(dataset), dataset.annotation_path.name, image.path, width, height,
                       image.width, image.height)


__all__ = ["MATCH_IOU_THRESHOLD", "MATCH_SCORE_THRESHOLD", "RunContext", "add_common_options",
           "add_dataset_options", "add_image_statistics", "add_matching_options",
           "fusion_statistics_over", "mode_label", "mode_name", "parse_counterfactual", "record_dataset_images"]
