"""Which detections a counterfactual (or another checkpoint) keeps, loses, adds or relabels: a pure function of
two lists of `DetectionRecord`s (boxes in original pixels), for the diff tables of the app.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ops.boxes import box_iou

STATUSES = ("kept", "relabelled", "lost", "new")


@dataclass(frozen=True)
class DetectionChange:
    """One row of a diff. reference / other: indices into the two lists (None when absent there)."""

    status: str  # one of STATUSES
    reference: int | None
    other: int | None
    iou: float


def match_detections(reference: list, other: list, iou_threshold: float = 0.5) -> list[DetectionChange]:
    """Greedy one-to-one matching of `other` detections to `reference` ones, by decreasing reference score.

    A reference box is "kept" when an unmatched other box of the same class overlaps it with IoU >=
    iou_threshold (the best such box), else "relabelled" when one of another class does, else "lost";
    other boxes left unmatched are "new". Rows: reference order first, then the new ones by score.
    """
    if not reference or not other:
        return ([DetectionChange("lost", index, None, 0.0) for index in range(len(reference))]
                + [DetectionChange("new", None, index, 0.0) for index in range(len(other))])
    boxes_reference = torch.as_tensor(np.array([r.box_xyxy for r in reference]), dtype=torch.float64)
    boxes_other = torch.as_tensor(np.array([r.box_xyxy for r in other]), dtype=torch.float64)
    iou = box_iou(boxes_reference, boxes_other).numpy()  # (R, O)
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
