"""Streaming statistics of fusion weights and gradient flow over a dataset (pure numpy, no model).

Nothing here keeps a map: each image is reduced to a few numbers per object or per region, added to
fixed-size accumulators (sums, sums of squares and 50-bin histograms on 0..1), and the accumulators are what
the tables and figures are made from. Memory therefore does not grow with the number of images (the
gradient-flow accumulator also keeps a few counts per image, for bootstrap confidence intervals).

Geometry: boxes are xyxy. `mean_weights_in_box` takes them in *input* pixels (the square network input);
the cell (row, col) of a level with stride s has its centre at ((col + 0.5) s, (row + 0.5) s).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.fileio import atomic_write

# Object size bins by sqrt(area) in original pixels. 32 and 96 are edges, so COCO's small (area < 32^2),
# medium (32^2 <= area < 96^2) and large bins are unions of these finer ones.
FINE_SIZE_EDGES = (0.0, 16.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0, math.inf)
FINE_SIZE_LABELS = ("<16", "16-32", "32-48", "48-64", "64-96", "96-128", "128-192", "192-256", ">=256")
COCO_SIZE_LABELS = ("small", "medium", "large")
COCO_SIZE_OF_FINE = (0, 0, 1, 1, 1, 2, 2, 2, 2)
OUTCOMES = ("true positive", "missed", "false positive")
TRUE_POSITIVE, MISSED, FALSE_POSITIVE = 0, 1, 2
HISTOGRAM_BINS = 50
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
LEVELS = 3
LEVEL_LABELS = ("stride 32", "stride 16", "stride 8")  # level 0 first, as asff_viz.introspection names them


# --------------------------------------------------------------------------------------------- geometry


def size_bins(areas) -> np.ndarray:
    """(N,) areas in square pixels -> (N,) fine size-bin indices into FINE_SIZE_LABELS."""
    sides = np.sqrt(np.clip(np.asarray(areas, dtype=np.float64), 0.0, None))
    return np.clip(np.searchsorted(np.asarray(FINE_SIZE_EDGES), sides, side="right") - 1, 0,
                   len(FINE_SIZE_LABELS) - 1)


def coco_size_bins(areas) -> np.ndarray:
    """(N,) areas -> (N,) indices into COCO_SIZE_LABELS (small < 32^2 <= medium < 96^2 <= large)."""
    return np.asarray(COCO_SIZE_OF_FINE)[size_bins(areas)]


def box_cell_mask(box_xyxy, stride: float, grid_shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the cells of a level whose centre lies inside the box (edges included).

    box_xyxy: (4,) in input pixels. A box that contains no cell centre (smaller than a cell, or thin) gets the
    single cell holding its centre instead, clamped to the grid, so that every box has at least one cell.
    """
    height, width = grid_shape
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    centres_x = (np.arange(width) + 0.5) * stride
    centres_y = (np.arange(height) + 0.5) * stride
    inside = (((centres_y >= y1) & (centres_y <= y2))[:, None] & ((centres_x >= x1) & (centres_x <= x2))[None, :])
    if not inside.any():
        row = min(max(int(math.floor((y1 + y2) / 2 / stride)), 0), height - 1)
        col = min(max(int(math.floor((x1 + x2) / 2 / stride)), 0), width - 1)
        inside[row, col] = True
    return inside


def mean_weights_in_box(fusion_weights, box_input_xyxy, strides) -> np.ndarray:
    """(3, 3) mean fusion weight of each source (column) at each target level (row) inside one box.

    fusion_weights: 3 arrays (3, H_l, W_l), level 0 (stride 32) first; box_input_xyxy: (4,) input pixels;
    strides: per level. Each row is an average of probability vectors, so it sums to 1.
    """
    result = np.zeros((LEVELS, LEVELS), dtype=np.float64)
    for level, (weights, stride) in enumerate(zip(fusion_weights, strides, strict=True)):
        mask = box_cell_mask(box_input_xyxy, stride, weights.shape[1:])
        result[level] = np.asarray(weights, dtype=np.float64)[:, mask].mean(axis=1)
    return result


def background_weights(fusion_weights, boxes_input_xyxy, strides) -> np.ndarray | None:
    """(3, 3) mean fusion weight of each source (column) at each target level (row) outside every box.

    The reference for the in-box means: what a level does where there is no object. A cell is inside when
    `box_cell_mask` puts it in any of the boxes (input pixels). None when a level has no cell left outside.
    """
    boxes = np.asarray(boxes_input_xyxy, dtype=np.float64).reshape(-1, 4)
    result = np.zeros((LEVELS, LEVELS), dtype=np.float64)
    for level, (weights, stride) in enumerate(zip(fusion_weights, strides, strict=True)):
        covered = np.zeros(weights.shape[1:], dtype=bool)
        for box in boxes:
            covered |= box_cell_mask(box, stride, weights.shape[1:])
        if covered.all():
            return None
        result[level] = np.asarray(weights, dtype=np.float64)[:, ~covered].mean(axis=1)
    return result


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """(N, 4), (M, 4) xyxy -> (N, M) IoU (0 where the union is empty)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite boxes get IoU 0, not NaN
        iou = _iou(a, np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4))
    return np.nan_to_num(iou, nan=0.0, posinf=0.0, neginf=0.0)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    intersection = width * height
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


@dataclass
class MatchResult:
    """Detections matched to ground truth.

    ground_truth_matched: (M,) bool, a detection was matched to the (non-crowd) box. detection_outcome: (K,)
    TRUE_POSITIVE, FALSE_POSITIVE, or -1 for detections that do not count (score below the threshold, or
    inside a crowd region of their class). matched_detection: (M,) index of the matching detection or -1.
    """

    ground_truth_matched: np.ndarray
    detection_outcome: np.ndarray
    matched_detection: np.ndarray


def match_detections(detection_boxes, detection_scores, detection_labels, truth_boxes, truth_labels, *,
                     truth_crowd=None, score_threshold: float = 0.3, iou_threshold: float = 0.5) -> MatchResult:
    """Greedy matching by decreasing score, per class, as COCO does at one IoU threshold.

    Each detection with score >= score_threshold takes the unmatched ground-truth box of its class with the
    highest IoU, if that IoU >= iou_threshold (a true positive); otherwise it is a false positive, unless it
    lies inside a crowd box of its class (intersection / detection area >= iou_threshold), where it does not
    count. Boxes are xyxy in one coordinate system (original pixels here).
    """
    detection_boxes = np.asarray(detection_boxes, dtype=np.float64).reshape(-1, 4)
    detection_scores = np.asarray(detection_scores, dtype=np.float64).reshape(-1)
    detection_labels = np.asarray(detection_labels, dtype=np.int64).reshape(-1)
    truth_boxes = np.asarray(truth_boxes, dtype=np.float64).reshape(-1, 4)
    truth_labels = np.asarray(truth_labels, dtype=np.int64).reshape(-1)
    crowd = (np.zeros(len(truth_boxes), dtype=bool) if truth_crowd is None
             else np.asarray(truth_crowd, dtype=bool).reshape(-1))
    outcome = np.full(len(detection_boxes), -1, dtype=np.int64)
    matched = np.zeros(len(truth_boxes), dtype=bool)
    matched_detection = np.full(len(truth_boxes), -1, dtype=np.int64)
    iou = box_iou(detection_boxes, truth_boxes)
    order = np.argsort(-detection_scores, kind="stable")
    for index in order:
        if detection_scores[index] < score_threshold:
            continue
        candidates = (truth_labels == detection_labels[index]) & ~matched & ~crowd
        overlaps = np.where(candidates, iou[index], -1.0)
        best = int(np.argmax(overlaps)) if len(overlaps) else -1
        if best >= 0 and overlaps[best] >= iou_threshold:
            matched[best] = True
            matched_detection[best] = index
            outcome[index] = TRUE_POSITIVE
            continue
        in_crowd = crowd & (truth_labels == detection_labels[index])
        if in_crowd.any() and _intersection_over_first(detection_boxes[index], truth_boxes[in_crowd]).max() \
                >= iou_threshold:
            continue
        outcome[index] = FALSE_POSITIVE
    return MatchResult(matched, outcome, matched_detection)


def _intersection_over_first(box, others) -> np.ndarray:
    width = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-12)
    return width * height / area


# ---------------------------------------------------------------------------------- histogram summaries


def histogram_quantiles(histogram, quantiles=QUANTILES) -> np.ndarray:
    """(..., B) counts of B equal bins on [0, 1] -> (..., Q) quantiles, linear inside the bin that holds them.

    Exact to within one bin width (1 / B); NaN where the histogram is empty.
    """
    histogram = np.asarray(histogram, dtype=np.float64)
    bins = histogram.shape[-1]
    flat = histogram.reshape(-1, bins)
    result = np.full((flat.shape[0], len(quantiles)), np.nan)
    cumulative = np.cumsum(flat, axis=1)
    for row, (counts, cdf) in enumerate(zip(flat, cumulative, strict=True)):
        total = cdf[-1]
        if total <= 0:
            continue
        for column, quantile in enumerate(quantiles):
            target = quantile * total
            index = int(np.searchsorted(cdf, target, side="left"))
            index = min(index, bins - 1)
            while counts[index] == 0 and index < bins - 1:  # a target on an empty bin's edge: next filled bin
                index += 1
            before = cdf[index] - counts[index]
            fraction = (target - before) / counts[index] if counts[index] > 0 else 0.0
            result[row, column] = (index + min(max(fraction, 0.0), 1.0)) / bins
    return result.reshape(*histogram.shape[:-1], len(quantiles))


@dataclass
class WeightSummary:
    """Statistics of one group of boxes: every array is (3, 3), row = target level, column = source level.

    count: boxes in the group. mean, std: exact (from running sums). quantiles: (3, 3, 5) at QUANTILES, from
    the histogram (within 1/HISTOGRAM_BINS). histogram: (3, 3, B) counts on [0, 1].
    """

    count: int
    mean: np.ndarray
    std: np.ndarray
    quantiles: np.ndarray
    histogram: np.ndarray

    @classmethod
    def from_sums(cls, count, sums, squares, histogram) -> WeightSummary:
        count = int(count)
        if count == 0:
            nan = np.full((LEVELS, LEVELS), np.nan)
            return cls(0, nan, nan.copy(), np.full((LEVELS, LEVELS, len(QUANTILES)), np.nan), np.asarray(histogram))
        mean = np.asarray(sums, dtype=np.float64) / count
        variance = np.clip(np.asarray(squares, dtype=np.float64) / count - mean ** 2, 0.0, None)
        return cls(count, mean, np.sqrt(variance), histogram_quantiles(histogram), np.asarray(histogram))

    def rows(self, **group) -> list[dict]:
        """Long-format table rows, one per (target level, source level), each starting with `group`."""
        rows = []
        for target in range(LEVELS):
            for source in range(LEVELS):
                q = self.quantiles[target, source]
                rows.append({**group, "target_level": target, "target": LEVEL_LABELS[target],
                             "source_level": source, "source": LEVEL_LABELS[source], "boxes": self.count,
                             "mean": float(self.mean[target, source]), "std": float(self.std[target, source]),
                             "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]),
                             "q95": float(q[4])})
        return rows


# ---------------------------------------------------------------------------------- fusion accumulator


@dataclass
class FusionStatistics:
    """Running statistics of the mean fusion weights inside boxes, by size bin, class and outcome.

    Axes of every array: fine size bin (S = len(FINE_SIZE_LABELS)), class (C), outcome (OUTCOMES), then
    target level and source level (3, 3), then histogram bin. Ground-truth boxes are `true positive` or
    `missed`; `false positive` entries are detections (their predicted box and class).

    `background_*` hold the same statistics for the background: one (3, 3) entry per image, the mean weights
    over the cells outside every ground-truth box (`background_weights`).
    """

    class_names: list
    bins: int = HISTOGRAM_BINS
    counts: np.ndarray = field(default=None)
    sums: np.ndarray = field(default=None)
    squares: np.ndarray = field(default=None)
    histograms: np.ndarray = field(default=None)
    images: int = 0
    background_count: int = 0
    background_sums: np.ndarray = field(default=None)
    background_squares: np.ndarray = field(default=None)
    background_histogram: np.ndarray = field(default=None)
    # Per image, for paired intervals over images: sums and counts of the ground-truth boxes' (3, 3) means by
    # COCO size, and the background's (3, 3) (NaN when the image has no cell outside its boxes).
    image_sums: np.ndarray = field(default=None)
    image_counts: np.ndarray = field(default=None)
    image_background: np.ndarray = field(default=None)

    def __post_init__(self) -> None:
        shape = (len(FINE_SIZE_LABELS), len(self.class_names), len(OUTCOMES))
        if self.counts is None:
            self.counts = np.zeros(shape, dtype=np.int64)
            self.sums = np.zeros((*shape, LEVELS, LEVELS), dtype=np.float64)
            self.squares = np.zeros((*shape, LEVELS, LEVELS), dtype=np.float64)
            self.histograms = np.zeros((*shape, LEVELS, LEVELS, self.bins), dtype=np.int64)
        if self.image_sums is None:
            self.image_sums = np.zeros((0, len(COCO_SIZE_LABELS), LEVELS, LEVELS), dtype=np.float64)
            self.image_counts = np.zeros((0, len(COCO_SIZE_LABELS)), dtype=np.int64)
            self.image_background = np.zeros((0, LEVELS, LEVELS), dtype=np.float64)
        if self.background_sums is None:
            self.background_sums = np.zeros((LEVELS, LEVELS), dtype=np.float64)
            self.background_squares = np.zeros((LEVELS, LEVELS), dtype=np.float64)
            self.background_histogram = np.zeros((LEVELS, LEVELS, self.bins), dtype=np.int64)

    def add(self, weights, size_index, class_index, outcome) -> None:
        """Add N boxes: weights (N, 3, 3) (target, source); size_index, class_index, outcome: (N,) ints."""
        weights = np.asarray(weights, dtype=np.float64).reshape(-1, LEVELS, LEVELS)
        if len(weights) == 0:
            return
        index = tuple(np.asarray(v, dtype=np.int64).reshape(-1) for v in (size_index, class_index, outcome))
        np.add.at(self.counts, index, 1)
        np.add.at(self.sums, index, weights)
        np.add.at(self.squares, index, weights ** 2)
        targets, sources, bins = _histogram_index(weights, self.bins)
        expand = [v[:, None, None] for v in index]
        np.add.at(self.histograms, (*expand, targets[None], sources[None], bins), 1)

    def add_background(self, weights) -> None:
        """Add one image's background: weights (3, 3) (target, source), e.g. from `background_weights`."""
        weights = np.asarray(weights, dtype=np.float64).reshape(LEVELS, LEVELS)
        self.background_count += 1
        self.background_sums += weights
        self.background_squares += weights ** 2
        np.add.at(self.background_histogram, _histogram_index(weights, self.bins), 1)

    def add_image(self, truth_weights, truth_size_index, background) -> None:
        """One image's per-image record: its ground-truth boxes' (N, 3, 3) means with their fine size bins, and
        its background (3, 3) or None."""
        weights = np.asarray(truth_weights, dtype=np.float64).reshape(-1, LEVELS, LEVELS)
        coco = np.asarray(COCO_SIZE_OF_FINE)[np.asarray(truth_size_index, dtype=np.int64).reshape(-1)]
        sums = np.zeros((1, len(COCO_SIZE_LABELS), LEVELS, LEVELS))
        counts = np.zeros((1, len(COCO_SIZE_LABELS)), dtype=np.int64)
        np.add.at(sums[0], coco, weights)
        np.add.at(counts[0], coco, 1)
        row = np.full((1, LEVELS, LEVELS), np.nan) if background is None else np.asarray(
            background, dtype=np.float64).reshape(1, LEVELS, LEVELS)
        self.image_sums = np.concatenate([self.image_sums, sums])
        self.image_counts = np.concatenate([self.image_counts, counts])
        self.image_background = np.concatenate([self.image_background, row])

    GROUPS = (*COCO_SIZE_LABELS, "background")

    def contrast(self, first: str, second: str, samples: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(3, 3) mean weight of group `first` minus group `second` (COCO sizes or "background"), with the
        percentile bootstrap interval of that paired difference over images (both groups pooled over the same
        resampled images), and the number of images. A size's mean pools its boxes (sum / count); the
        background's is the mean over the images that have one."""
        for name in (first, second):
            if name not in self.GROUPS:
                raise ValueError(f"unknown group {name!r}; expected one of {self.GROUPS}")
        images = len(self.image_counts)
        if images == 0:
            nan = np.full((LEVELS, LEVELS), np.nan)
            return nan, nan.copy(), nan.copy(), 0

        def means(weights: np.ndarray) -> list[np.ndarray]:
            """(B, N) image weights -> per group (B, 3, 3) pooled means."""
            result = []
            for name in (first, second):
                if name == "background":
                    present = np.isfinite(self.image_background[:, 0, 0]).astype(np.float64)
                    total = np.einsum("bn,nts->bts", weights * present, np.nan_to_num(self.image_background))
                    count = (weights * present).sum(axis=1)[:, None, None]
                else:
                    size = COCO_SIZE_LABELS.index(name)
                    total = np.einsum("bn,nts->bts", weights, self.image_sums[:, size])
                    count = (weights @ self.image_counts[:, size].astype(np.float64))[:, None, None]
                with np.errstate(invalid="ignore", divide="ignore"):
                    result.append(total / count)
            return result

        estimate = np.subtract(*means(np.ones((1, images))))[0]
        rng = np.random.default_rng(seed)
        differences = []
        for start in range(0, samples, 200):
            chunk = min(200, samples - start)
            weights = rng.multinomial(images, np.full(images, 1.0 / images), size=chunk).astype(np.float64)
            differences.append(np.subtract(*means(weights)))
        differences = np.concatenate(differences)
        tail = (1.0 - level) / 2 * 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return (estimate, np.nanpercentile(differences, tail, axis=0),
                    np.nanpercentile(differences, 100 - tail, axis=0), images)

    def background(self) -> WeightSummary:
        """The background's summary; its count is the number of images, not of boxes."""
        return WeightSummary.from_sums(self.background_count, self.background_sums, self.background_squares,
                                       self.background_histogram)

    def merge(self, other: FusionStatistics) -> None:
        if list(other.class_names) != list(self.class_names) or other.bins != self.bins:
            raise ValueError("cannot merge fusion statistics of different classes or histogram bins")
        for name in ("counts", "sums", "squares", "histograms", "background_sums", "background_squares",
                     "background_histogram"):
            getattr(self, name).__iadd__(getattr(other, name))
        for name in ("image_sums", "image_counts", "image_background"):
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))
        self.images += other.images
        self.background_count += other.background_count

    def summary(self, sizes=None, classes=None, outcomes=(TRUE_POSITIVE, MISSED)) -> WeightSummary:
        """The summary of the boxes in the chosen fine size bins, classes and outcomes (None = all).

        The default outcomes are the ground-truth boxes (found or missed), not the false positives.
        """
        selection = tuple(slice(None) if v is None else np.asarray(list(v), dtype=np.int64)
                          for v in (sizes, classes, outcomes))
        counts, sums, squares, histograms = self.counts, self.sums, self.squares, self.histograms
        for axis, chosen in enumerate(selection):
            counts = np.take(counts, _indices(chosen, counts.shape[axis]), axis=axis)
            sums = np.take(sums, _indices(chosen, sums.shape[axis]), axis=axis)
            squares = np.take(squares, _indices(chosen, squares.shape[axis]), axis=axis)
            histograms = np.take(histograms, _indices(chosen, histograms.shape[axis]), axis=axis)
        return WeightSummary.from_sums(counts.sum(), sums.sum(axis=(0, 1, 2)), squares.sum(axis=(0, 1, 2)),
                                       histograms.sum(axis=(0, 1, 2)))

    # Groupings used by the figures and tables: (label, WeightSummary) in a fixed order.

    def by_coco_size(self, outcomes=(TRUE_POSITIVE, MISSED)) -> list[tuple[str, WeightSummary]]:
        return [(label, self.summary(sizes=[i for i, c in enumerate(COCO_SIZE_OF_FINE) if c == coco],
                                     outcomes=outcomes))
                for coco, label in enumerate(COCO_SIZE_LABELS)]

    def by_coco_size_and_background(self) -> list[tuple[str, WeightSummary]]:
        """Small, medium, large ground-truth boxes, then the background (per image) as the reference."""
        return [*self.by_coco_size(), ("background", self.background())]

    def by_fine_size(self, outcomes=(TRUE_POSITIVE, MISSED)) -> list[tuple[str, WeightSummary]]:
        return [(label, self.summary(sizes=[i], outcomes=outcomes)) for i, label in enumerate(FINE_SIZE_LABELS)]

    def by_class(self, outcomes=(TRUE_POSITIVE, MISSED)) -> list[tuple[str, WeightSummary]]:
        return [(name, self.summary(classes=[i], outcomes=outcomes)) for i, name in enumerate(self.class_names)]

    def by_outcome(self) -> list[tuple[str, WeightSummary]]:
        return [(name, self.summary(outcomes=[i])) for i, name in enumerate(OUTCOMES)]

    def outcome_counts(self) -> list[dict]:
        """Boxes per COCO size and outcome, with recall = TP / (TP + missed) and precision = TP / (TP + FP)."""
        rows = []
        for coco, label in enumerate(COCO_SIZE_LABELS):
            fine = [i for i, c in enumerate(COCO_SIZE_OF_FINE) if c == coco]
            counts = self.counts[fine].sum(axis=(0, 1))
            rows.append(_outcome_row(label, counts))
        rows.append(_outcome_row("all", self.counts.sum(axis=(0, 1))))
        return rows

    # Files: the raw accumulators, so that figures can be redrawn and runs merged without the model.

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"class_names": list(self.class_names), "bins": self.bins, "images": self.images,
                  "background_count": self.background_count,
                  "fine_size_edges": [e if math.isfinite(e) else None for e in FINE_SIZE_EDGES],
                  "outcomes": list(OUTCOMES)}
        np.savez_compressed(path, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                            counts=self.counts, sums=self.sums, squares=self.squares, histograms=self.histograms,
                            background_sums=self.background_sums, background_squares=self.background_squares,
                            background_histogram=self.background_histogram, image_sums=self.image_sums,
                            image_counts=self.image_counts, image_background=self.image_background)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FusionStatistics:
        """Read `save`'s file; files written before the background statistics load with an empty background."""
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode())
            background = {}
            if "background_sums" in data:
                background = {"background_count": header["background_count"],
                              "background_sums": data["background_sums"],
                              "background_squares": data["background_squares"],
                              "background_histogram": data["background_histogram"]}
            per_image = {name: data[name] for name in ("image_sums", "image_counts", "image_background")
                         if name in data}  # files from before the per-image records load without them
            return cls(header["class_names"], header["bins"], data["counts"], data["sums"], data["squares"],
                       data["histograms"], header["images"], **background, **per_image)


def _histogram_index(weights: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., 3, 3) weights -> (target, source, bin) index arrays into a (..., 3, 3, bins) histogram.

    Bins are equal on [0, 1]; a weight of exactly 1.0 goes to the last bin.
    """
    targets, sources = np.meshgrid(np.arange(LEVELS), np.arange(LEVELS), indexing="ij")
    return targets, sources, np.clip(np.floor(weights * bins).astype(np.int64), 0, bins - 1)


def _indices(chosen, length: int) -> np.ndarray:
    return np.arange(length) if isinstance(chosen, slice) else chosen


def _outcome_row(label: str, counts) -> dict:
    tp, missed, fp = (int(v) for v in counts)
    return {"size": label, "true_positives": tp, "missed": missed, "false_positives": fp,
            "recall": tp / (tp + missed) if tp + missed else math.nan,
            "precision": tp / (tp + fp) if tp + fp else math.nan}


def summary_rows(groups, group_name: str) -> list[dict]:
    """[(label, WeightSummary)] -> long-format rows with the label under `group_name`."""
    return [row for label, summary in groups for row in summary.rows(**{group_name: label})]


# ----------------------------------------------------------------------------- gradient-flow accumulator

# Regions of a source grid, from the ground-truth assignment (see gradflow.ground_truth_cells):
# the first three are disjoint; the per-level ones may overlap each other.
REGIONS = ("positive", "object background", "background",
           "positive of s32", "positive of s16", "positive of s8",
           "object background of s32", "object background of s16", "object background of s8")
MAIN_REGIONS = 3


def region_masks(positives_at_source, background_at_source, shape) -> np.ndarray:
    """(R, H_k, W_k) bool masks of REGIONS on one source grid.

    positives_at_source, background_at_source: (3, H_k, W_k) target level l's positive / object-background
    cells mapped onto the source grid (None without ground truth: everything is background).
    """
    height, width = shape
    if positives_at_source is None:
        positives = np.zeros((LEVELS, height, width), dtype=bool)
        background = np.zeros((LEVELS, height, width), dtype=bool)
    else:
        positives = np.asarray(positives_at_source, dtype=bool)
        background = np.asarray(background_at_source, dtype=bool)
    positive = positives.any(axis=0)
    object_background = background.any(axis=0) & ~positive
    rest = ~positive & ~object_background
    return np.concatenate([np.stack([positive, object_background, rest]), positives, background])


def summarize_flow(flow) -> dict:
    """One image's `GradientFlow` -> the few arrays the dataset statistics need (what the cache stores).

    value_norms, weight_branch_norms: (3, 3) Frobenius norms (target, source); neck_norms, total_norms,
    fusion_total_norms: (3,) per source; region_energy: (3, 3, R) sum of squared value-path norms over each
    region of source k; active, conflicting: (3, R) counts of locations; cancellation: (3, R) summed over active
    locations; weighted_cancellation, gradient_weight: (3, R) sums over active locations of cancellation x
    sum_l |g_l| and of sum_l |g_l| (for the gradient-weighted mean); objective: the objective's value.
    """
    regions = len(REGIONS)
    energy = np.zeros((LEVELS, LEVELS, regions))
    active = np.zeros((LEVELS, regions), dtype=np.int64)
    conflicting = np.zeros((LEVELS, regions), dtype=np.int64)
    cancellation = np.zeros((LEVELS, regions))
    weighted_cancellation = np.zeros((LEVELS, regions))
    gradient_weight = np.zeros((LEVELS, regions))
    for source in range(LEVELS):
        shape = flow.maps[0][source].shape
        masks = region_masks(None if flow.positives_at_source is None else flow.positives_at_source[source],
                             None if flow.background_at_source is None else flow.background_at_source[source],
                             shape)
        statistics = flow.conflict[source]
        for target in range(LEVELS):
            squared = np.asarray(flow.maps[target][source], dtype=np.float64) ** 2
            energy[target, source] = (masks * squared[None]).sum(axis=(1, 2))
        on = masks & statistics.active[None]
        active[source] = on.sum(axis=(1, 2))
        conflicting[source] = (on & statistics.conflicting[None]).sum(axis=(1, 2))
        location_cancellation = np.asarray(statistics.cancellation, dtype=np.float64)
        location_weight = np.asarray(statistics.norms, dtype=np.float64).sum(axis=0)  # sum_l |g_l|, (H, W)
        cancellation[source] = (on * location_cancellation[None]).sum(axis=(1, 2))
        weighted_cancellation[source] = (on * (location_cancellation * location_weight)[None]).sum(axis=(1, 2))
        gradient_weight[source] = (on * location_weight[None]).sum(axis=(1, 2))
    return {"value_norms": np.asarray(flow.matrix, dtype=np.float64),
            "weight_branch_norms": np.asarray(flow.weight_branch_matrix, dtype=np.float64),
            "neck_norms": np.asarray(flow.neck_path_norms, dtype=np.float64),
            "total_norms": np.asarray(flow.total_norms, dtype=np.float64),
            "fusion_total_norms": np.asarray(flow.fusion_total_norms, dtype=np.float64),
            "region_energy": energy, "active": active, "conflicting": conflicting, "cancellation": cancellation,
            "weighted_cancellation": weighted_cancellation, "gradient_weight": gradient_weight,
            "objective": np.float64(flow.objective_value)}


@dataclass
class GradientFlowStatistics:
    """Dataset statistics of the gradient decomposition for several fusion modes (learned, uniform, sum).

    Per mode: sums over images of squared norms (for root-mean-square norms and energy shares), pooled
    location counts per region, and the per-image counts that bootstrap confidence intervals resample.
    """

    modes: list
    images: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)

    def add(self, mode: str, summary: dict, image: str = "") -> None:
        if mode not in self.modes:
            raise ValueError(f"unknown mode {mode!r}; expected one of {self.modes}")
        squares = {"value_norms": summary["value_norms"] ** 2,
                   "weight_branch_norms": summary["weight_branch_norms"] ** 2,
                   "neck_norms": summary["neck_norms"] ** 2, "total_norms": summary["total_norms"] ** 2,
                   "fusion_total_norms": summary["fusion_total_norms"] ** 2,
                   "region_energy": summary["region_energy"], "active": summary["active"],
                   "conflicting": summary["conflicting"], "cancellation": summary["cancellation"],
                   "weighted_cancellation": summary["weighted_cancellation"],
                   "gradient_weight": summary["gradient_weight"]}
        totals = self.sums.setdefault(mode, {})
        for name, value in squares.items():
            totals[name] = totals.get(name, 0) + np.asarray(value, dtype=np.float64)
        self.images[mode] = self.images.get(mode, 0) + 1
        self.per_image.setdefault(mode, []).append(
            {"image": image, "objective": float(summary["objective"]),
             "active": np.asarray(summary["active"], dtype=np.int64),
             "conflicting": np.asarray(summary["conflicting"], dtype=np.int64),
             "cancellation": np.asarray(summary["cancellation"], dtype=np.float64)})

    def rms_norms(self, mode: str) -> dict:
        """Root-mean-square over images of each norm: value (3, 3), weight_branch (3, 3), neck/total (3,)."""
        count = max(self.images.get(mode, 0), 1)
        sums = self.sums[mode]
        return {name: np.sqrt(sums[f"{name}_norms"] / count)
                for name in ("value", "weight_branch", "neck", "total", "fusion_total")}

    def energy_shares(self, mode: str, region: int | None = None) -> np.ndarray:
        """(3, 3) share of source k's value-path gradient energy that comes from target l (columns sum to 1).

        region: an index into REGIONS, or None for every location.
        """
        energy = self.sums[mode]["region_energy"]
        energy = energy[..., :MAIN_REGIONS].sum(axis=-1) if region is None else energy[..., region]
        column = energy.sum(axis=0, keepdims=True)
        return np.where(column > 0, energy / np.where(column > 0, column, 1.0), np.nan)

    def weighted_cancellation(self, mode: str) -> np.ndarray:
        """(3 sources, R regions) mean cancellation over active locations, weighted by their gradient sum_l |g_l|."""
        sums = self.sums[mode]
        weight = sums["gradient_weight"]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(weight > 0, sums["weighted_cancellation"] / weight, np.nan)

    def conflict_rates(self, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pooled (3 sources, R regions) conflict rate, mean cancellation, active and conflicting counts."""
        sums = self.sums[mode]
        active, conflicting = sums["active"], sums["conflicting"]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(active > 0, conflicting / active, np.nan)
            cancellation = np.where(active > 0, sums["cancellation"] / active, np.nan)
        return rate, cancellation, active.astype(np.int64), conflicting.astype(np.int64)

    def bootstrap_interval(self, mode: str, samples: int = 1000, seed: int = 0,
                           level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """(3, R) lower and upper percentile-bootstrap bounds of the pooled conflict rate, resampling images."""
        records = self.per_image.get(mode, [])
        if not records:
            nan = np.full((LEVELS, len(REGIONS)), np.nan)
            return nan, nan.copy()
        active = np.stack([r["active"] for r in records]).astype(np.float64)  # (N, 3, R)
        conflicting = np.stack([r["conflicting"] for r in records]).astype(np.float64)
        count = len(records)
        rng = np.random.default_rng(seed)
        rates = []
        for start in range(0, samples, 100):  # chunks keep the (chunk, N) weight matrix small
            chunk = min(100, samples - start)
            weights = rng.multinomial(count, np.full(count, 1.0 / count), size=chunk).astype(np.float64)
            pooled_active = np.einsum("bn,nsr->bsr", weights, active)
            pooled_conflicting = np.einsum("bn,nsr->bsr", weights, conflicting)
            with np.errstate(invalid="ignore", divide="ignore"):
                rates.append(np.where(pooled_active > 0, pooled_conflicting / pooled_active, np.nan))
        rates = np.concatenate(rates)
        tail = (1.0 - level) / 2 * 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN regions (no such location anywhere) stay NaN
            return np.nanpercentile(rates, tail, axis=0), np.nanpercentile(rates, 100 - tail, axis=0)

    def paired_difference(self, mode: str, control: str, samples: int = 1000, seed: int = 0, level: float = 0.95
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(3 sources, R regions) pooled conflict rate of `mode` minus that of `control`, with the percentile
        bootstrap interval of the *paired* difference: each resample draws images, and both modes are pooled
        over the same draw. (Two intervals computed apart may overlap while the paired one excludes zero.)

        Both modes must hold the same images in the same order (the analysis adds them so).
        """
        first, second = self.per_image.get(mode, []), self.per_image.get(control, [])
        if [r["image"] for r in first] != [r["image"] for r in second]:
            raise ValueError(f"{mode!r} and {control!r} do not hold the same images; a paired difference needs them")
        if not first:
            nan = np.full((LEVELS, len(REGIONS)), np.nan)
            return nan, nan.copy(), nan.copy()
        counts = [np.stack([r[name] for r in records]).astype(np.float64)
                  for records in (first, second) for name in ("active", "conflicting")]  # 4 x (N, 3, R)
        with np.errstate(invalid="ignore", divide="ignore"):
            estimate = (counts[1].sum(0) / counts[0].sum(0)) - (counts[3].sum(0) / counts[2].sum(0))
        rng = np.random.default_rng(seed)
        count = len(first)
        differences = []
        for start in range(0, samples, 100):
            chunk = min(100, samples - start)
            weights = rng.multinomial(count, np.full(count, 1.0 / count), size=chunk).astype(np.float64)
            pooled = [np.einsum("bn,nsr->bsr", weights, c) for c in counts]
            with np.errstate(invalid="ignore", divide="ignore"):
                differences.append(pooled[1] / pooled[0] - pooled[3] / pooled[2])
        differences = np.concatenate(differences)
        tail = (1.0 - level) / 2 * 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return (estimate, np.nanpercentile(differences, tail, axis=0),
                    np.nanpercentile(differences, 100 - tail, axis=0))

    PER_IMAGE_ARRAYS = ("active", "conflicting", "cancellation")

    def save(self, path: str | os.PathLike) -> Path:
        """Everything `write_figures` needs, as one .npz (no pickles): re-plotting needs no model."""
        header = {"modes": list(self.modes), "images": self.images,
                  "per_image": {mode: [{"image": r["image"], "objective": r["objective"]} for r in records]
                                for mode, records in self.per_image.items()}}
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        for index, mode in enumerate(self.modes):
            for name, value in self.sums.get(mode, {}).items():
                arrays[f"sum/{index}/{name}"] = np.asarray(value, dtype=np.float64)
            records = self.per_image.get(mode, [])
            for name in self.PER_IMAGE_ARRAYS:
                if records:
                    arrays[f"per_image/{index}/{name}"] = np.stack([r[name] for r in records])
        atomic_write(path, lambda stream: np.savez_compressed(stream, **arrays))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GradientFlowStatistics:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode())
            statistics = cls(list(header["modes"]))
            statistics.images = {mode: int(count) for mode, count in header["images"].items()}
            for index, mode in enumerate(statistics.modes):
                prefix = f"sum/{index}/"
                sums = {name[len(prefix):]: data[name] for name in data.files if name.startswith(prefix)}
                if sums:
                    statistics.sums[mode] = sums
                described = header["per_image"].get(mode, [])
                if described:
                    arrays = {name: data[f"per_image/{index}/{name}"] for name in cls.PER_IMAGE_ARRAYS}
                    statistics.per_image[mode] = [
                        {**entry, **{name: arrays[name][position] for name in cls.PER_IMAGE_ARRAYS}}
                        for position, entry in enumerate(described)]
        return statistics

    def per_image_rows(self) -> list[dict]:
        rows = []
        for mode in self.modes:
            for record in self.per_image.get(mode, []):
                row = {"image": record["image"], "mode": mode, "loss": record["objective"]}
                active, conflicting = record["active"], record["conflicting"]
                total_active = active[:, :MAIN_REGIONS].sum()
                row["conflict_rate"] = (conflicting[:, :MAIN_REGIONS].sum() / total_active
                                        if total_active else math.nan)
                for source in range(LEVELS):
                    for region in range(MAIN_REGIONS):
                        name = f"source_{source}_{REGIONS[region].replace(' ', '_')}"
                        row[f"{name}_active"] = int(active[source, region])
                        row[f"{name}_conflicting"] = int(conflicting[source, region])
                rows.append(row)
        return rows


__all__ = ["COCO_SIZE_LABELS", "FALSE_POSITIVE", "FINE_SIZE_EDGES", "FINE_SIZE_LABELS", "FusionStatistics",
           "GradientFlowStatistics", "HISTOGRAM_BINS", "MISSED", "MatchResult", "OUTCOMES", "QUANTILES", "REGIONS",
           "TRUE_POSITIVE", "WeightSummary", "box_cell_mask", "box_iou", "coco_size_bins", "histogram_quantiles",
           "match_detections", "mean_weights_in_box", "region_masks", "size_bins", "summarize_flow",
           "summary_rows"]
