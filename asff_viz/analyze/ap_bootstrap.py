"""Paired image bootstrap of COCO AP differences between two sets of detections on the same images.

COCOeval matches detections to ground truth per image (`evaluate`), then pools the images (`accumulate`). A
bootstrap resample draws images with replacement, so each image enters the pool with a multiplicity; pycocotools
cannot pool an image twice, so the pooling is done here, exactly as `accumulate` does it (area "all", the last
maxDets, 101 recall points), with the matches repeated by their image's multiplicity. With every multiplicity 1
it reproduces COCOeval's AP and AP50 (tested). Both variants are pooled over the same resample: the interval is
that of the paired difference.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np


class MatchedImages:
    """COCOeval's per-image matches of one set of detections, ready to be pooled with image multiplicities."""

    def __init__(self, coco, results: Sequence[dict], image_ids: Sequence[int]) -> None:
        from pycocotools.cocoeval import COCOeval

        self.image_ids = [int(i) for i in sorted(image_ids)]
        self.empty = len(results) == 0  # nothing detected: AP 0 (pycocotools cannot load an empty list)
        with contextlib.redirect_stdout(io.StringIO()):
            detections = coco.loadRes(copy.deepcopy(list(results))) if len(results) else None
            evaluator = COCOeval(coco, detections if detections is not None else coco, "bbox")
            evaluator.params.imgIds = self.image_ids
            if detections is not None:
                evaluator.evaluate()
        self.params = evaluator.params
        self.iou_thresholds = np.asarray(self.params.iouThrs)
        self.recall_thresholds = np.asarray(self.params.recThrs)
        max_detections = self.params.maxDets[-1]
        images = len(self.image_ids)
        areas = len(self.params.areaRng)
        # Per category: per image (scores, matches (T, D), ignored (T, D), counted ground truth).
        self.categories = []
        for category in range(len(self.params.catIds)):
            per_image = []
            for image in range(images):
                entry = (evaluator.evalImgs[category * areas * images + image]  # area index 0: "all"
                         if detections is not None else None)
                if entry is None:
                    per_image.append(None)
                    continue
                per_image.append((np.asarray(entry["dtScores"][:max_detections], dtype=np.float64),
                                  np.asarray(entry["dtMatches"][:, :max_detections]) > 0,
                                  np.asarray(entry["dtIgnore"][:, :max_detections], dtype=bool),
                                  int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))))
            self.categories.append(per_image)

    def average_precision(self, multiplicity: np.ndarray | None = None) -> tuple[float, float]:
        """(AP, AP50) over categories with ground truth, each image counted `multiplicity[i]` times."""
        if self.empty:
            return 0.0, 0.0
        multiplicity = (np.ones(len(self.image_ids), dtype=np.int64) if multiplicity is None
                        else np.asarray(multiplicity, dtype=np.int64))
        precisions = []
        for per_image in self.categories:
            chosen = [(entry, count) for entry, count in zip(per_image, multiplicity, strict=True)
                      if entry is not None and count > 0]
            ground_truth = sum(entry[3] * count for entry, count in chosen)
            if ground_truth == 0:
                continue
            if not chosen or sum(len(entry[0]) for entry, _ in chosen) == 0:
                precisions.append(np.zeros((len(self.iou_thresholds), len(self.recall_thresholds))))
                continue
            scores = np.concatenate([np.tile(entry[0], count) for entry, count in chosen])
            matches = np.concatenate([np.tile(entry[1], (1, count)) for entry, count in chosen], axis=1)
            ignored = np.concatenate([np.tile(entry[2], (1, count)) for entry, count in chosen], axis=1)
            order = np.argsort(-scores, kind="mergesort")
            matches, ignored = matches[:, order], ignored[:, order]
            true_positive = np.cumsum(matches & ~ignored, axis=1, dtype=np.float64)
            false_positive = np.cumsum(~matches & ~ignored, axis=1, dtype=np.float64)
            table = np.zeros((len(self.iou_thresholds), len(self.recall_thresholds)))
            for threshold, (tp, fp) in enumerate(zip(true_positive, false_positive, strict=True)):
                recall = tp / ground_truth
                precision = tp / (fp + tp + np.spacing(1))
                precision = np.maximum.accumulate(precision[::-1])[::-1]  # COCO's interpolation
                found = np.searchsorted(recall, self.recall_thresholds, side="left")
                valid = found < len(precision)
                table[threshold, valid] = precision[found[valid]]
            precisions.append(table)
        if not precisions:
            return float("nan"), float("nan")
        stacked = np.stack(precisions)  # (K, T, R)
        at_50 = int(np.argmin(np.abs(self.iou_thresholds - 0.5)))
        return float(stacked.mean()), float(stacked[:, at_50].mean())


def paired_ap_difference(first: MatchedImages, second: MatchedImages, samples: int = 200, seed: int = 0,
                         level: float = 0.95) -> dict:
    """AP and AP50 of `first` minus `second` with paired percentile-bootstrap intervals over images."""
    if first.image_ids != second.image_ids:
        raise ValueError("the two variants were evaluated on different images")
    estimate = np.subtract(first.average_precision(), second.average_precision())
    rng = np.random.default_rng(seed)
    images = len(first.image_ids)
    draws = []
    for _ in range(samples):
        multiplicity = rng.multinomial(images, np.full(images, 1.0 / images))
        draws.append(np.subtract(first.average_precision(multiplicity), second.average_precision(multiplicity)))
    draws = np.asarray(draws)
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(draws, tail, axis=0), np.nanpercentile(draws, 100 - tail, axis=0)
    return {"AP": (float(estimate[0]), float(low[0]), float(high[0])),
            "AP50": (float(estimate[1]), float(low[1]), float(high[1])), "images": images, "resamples": samples}
