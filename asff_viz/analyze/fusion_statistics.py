"""Streaming statistics of fusion weights over a dataset (pure numpy, no model).

Nothing here keeps a map: each image is reduced to a few numbers per object or per region, added to
fixed-size accumulators (sums, sums of squares and 50-bin histograms on 0..1), and the accumulators are what
the tables and figures are made from. Memory therefore does not grow with the number of images (the
gradient-flow accumulator also keeps a few counts per image, for bootstrap confidence intervals).

Which cells a box covers, and the size bins, are defined once in `asff_viz.analyze.cells`; gradient flow is
accumulated by `asff_viz.analyze.flow_statistics`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..ops.matching import MISSED, OUTCOMES, TRUE_POSITIVE
from .cells import COCO_SIZE_LABELS, COCO_SIZE_OF_FINE, FINE_SIZE_EDGES, FINE_SIZE_LABELS, LEVELS

HISTOGRAM_BINS = 50
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
LEVEL_LABELS = ("stride 32", "stride 16", "stride 8")  # level 0 first, as asff_viz.introspection names them




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




__all__ = ["FusionStatistics", "HISTOGRAM_BINS", "LEVEL_LABELS", "QUANTILES", "WeightSummary", "histogram_quantiles",
           "summary_rows"]
