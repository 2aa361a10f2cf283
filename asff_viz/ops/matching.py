"""Matching detections: to ground truth, as COCO does at one IoU threshold (`match_to_ground_truth`), and to
another model's detections, for diffs (`diff_detections`). Pure functions of boxes, scores and labels; the
overlaps come from `asff_viz.ops.boxes.box_iou`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .boxes import box_iou

OUTCOMES = ("true positive", "missed", "false positive")
TRUE_POSITIVE, MISSED, FALSE_POSITIVE = 0, 1, 2


def iou_matrix(boxes_a, boxes_b) -> np.ndarray:
    """(N, 4), (M, 4) xyxy (arrays or sequences) -> (N, M) float64 IoU; non-finite boxes overlap nothing."""
    a = torch.as_tensor(np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4))
    return np.nan_to_num(box_iou(a, b).numpy(), nan=0.0, posinf=0.0, neginf=0.0)


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


def match_to_ground_truth(detection_boxes, detection_scores, detection_labels, truth_boxes, truth_labels, *,
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
    iou = iou_matrix(detection_boxes, truth_boxes)
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


STATUSES = ("kept", "relabelled", "lost", "new")


@dataclass(frozen=True)
class DetectionChange:
    """One row of a diff. reference / other: indices into the two lists (None when absent there)."""

    status: str  # one of STATUSES
    reference: int | None
    other: int | None
    iou: float


def diff_detections(reference: list, other: list, iou_threshold: float = 0.5) -> list[DetectionChange]:
    """Greedy one-to-one matching of `other` detections to `reference` ones, by decreasing reference score.

    A reference box is "kept" when an unmatched other box of the same class overlaps it with IoU >=
    iou_threshold (the best such box), else "relabelled" when one of another class does, else "lost";
    other boxes left unmatched are "new". Rows: reference order first, then the new ones by score.
    """
    if not reference or not other:
        return ([DetectionChange("lost", index, None, 0.0) for index in range(len(reference))]
                + [DetectionChange("new", None, index, 0.0) for index in range(len(other))])
    iou = iou_matrix([r.box_xyxy for r in reference], [r.box_xyxy for r in other])  # (R, O)
    same_class = np.array([r.label for r in reference])[:, None] == np.array([r.label for r in other])[None, :]
    taken = np.zeros(len(other), dtype=bool)
    changes = []
    for index in np.argsort([-float(r.score) for r in reference], kind="stable"):
        candidates = np.where(~taken & (iou[index] >= iou_threshold), iou[index], -1.0)
        same = np.where(same_class[index], candidates, -1.0)
        if same.max() >= 0:
            match, status = int(same.argmax()), "kept"
        elif candidates.max() >= 0:
            match, status = int(candidates.argmax()), "relabelled"
        else:
            changes.append(DetectionChange("lost", int(index), None, float(iou[index].max())))
            continue
        taken[match] = True
        changes.append(DetectionChange(status, int(index), match, float(iou[index, match])))
    changes.sort(key=lambda change: change.reference)
    for index in np.argsort([-float(r.score) for r in other], kind="stable"):
        if not taken[index]:
            changes.append(DetectionChange("new", None, int(index), float(iou[:, index].max())))
    return changes
