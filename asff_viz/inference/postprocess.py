"""Post-processing of decoded predictions: score threshold and per-class NMS, as the official `postprocess`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.boxes import cxcywh_to_xyxy
from ..ops.nms import batched_nms

# Official thresholds: demo/display (conf 0.01, NMS 0.65) and COCO evaluation (conf 0.001, NMS 0.65).
DISPLAY_CONF_THRESHOLD, EVAL_CONF_THRESHOLD, NMS_THRESHOLD = 0.01, 0.001, 0.65


@dataclass
class Detections:
    """Detections of one image, sorted by decreasing score.

    boxes: (K, 4) xyxy in input pixels (or original pixels after `scaled`); scores: (K,) objectness x best
    class probability; labels: (K,) int64 class indices; objectness, class_confidence: (K,);
    indices: (K,) int64 rows of the decoded (N, 5 + C) tensor that produced each box (see `row_location`).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    objectness: torch.Tensor
    class_confidence: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    def scaled(self, scale_x: float, scale_y: float) -> Detections:
        """A copy with boxes multiplied by (scale_x, scale_y), e.g. input pixels to original pixels."""
        factor = self.boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
        return Detections(self.boxes * factor, self.scores, self.labels, self.objectness,
                          self.class_confidence, self.indices)

    def to(self, device: str | torch.device) -> Detections:
        return Detections(*(t.to(device) for t in (self.boxes, self.scores, self.labels, self.objectness,
                                                   self.class_confidence, self.indices)))


def postprocess(decoded: torch.Tensor, conf_threshold: float = DISPLAY_CONF_THRESHOLD,
                nms_threshold: float = NMS_THRESHOLD) -> list[Detections]:
    """(B, N, 5 + C) decoded rows (cx, cy, w, h, obj, class probs) -> one `Detections` per image.

    A row is kept when objectness x its best class probability >= conf_threshold; then per-class NMS at
    nms_threshold, with no top-k cap (the official behaviour).
    """
    results = []
    for rows in decoded:
        class_confidence, labels = rows[:, 5:].max(dim=1)
        scores = rows[:, 4] * class_confidence
        candidates = torch.nonzero(scores >= conf_threshold).squeeze(1)
        boxes = cxcywh_to_xyxy(rows[candidates, :4])
        keep = candidates[batched_nms(boxes, scores[candidates], labels[candidates], nms_threshold)]
        results.append(Detections(
            boxes=cxcywh_to_xyxy(rows[keep, :4]), scores=scores[keep], labels=labels[keep],
            objectness=rows[keep, 4], class_confidence=class_confidence[keep], indices=keep,
        ))
    return results


@dataclass(frozen=True)
class RowLocation:
    """Where a decoded row comes from: pyramid level (0 = stride 32), anchor slot (3 = anchor-free), cell."""

    level: int
    slot: int
    row: int
    col: int


def row_location(index: int, grid_sizes: list[tuple[int, int]], slots: int = 4) -> RowLocation:
    """Level, slot and cell of row `index` of the decoded tensor, for levels of (H_l, W_l) `grid_sizes`."""
    index = int(index)
    for level, (height, width) in enumerate(grid_sizes):
        count = slots * height * width
        if index < count:
            slot, cell = divmod(index, height * width)
            row, col = divmod(cell, width)
            return RowLocation(level, slot, row, col)
        index -= count
    raise IndexError(f"row {index} is beyond the decoded rows of grids {grid_sizes}")
