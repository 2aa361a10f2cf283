"""Box format conversions and IoU. Boxes are (..., 4) float tensors.

Formats: xyxy = (x1, y1, x2, y2) corners; cxcywh = (center x, center y, width, height); xywh = COCO's
(left, top, width, height). Coordinates are continuous pixels; area is (x2 - x1) * (y2 - y1), as in
torchvision and COCO (not the legacy +1 convention).
"""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...) area; degenerate boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes -> (N, M). Pairs with zero union get IoU 0."""
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=torch.finfo(union.dtype).tiny),
                       torch.zeros_like(union))


def centered_wh_iou(wh_a: torch.Tensor, wh_b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes that share their centre, from their sizes only.

    Args:
        wh_a: (..., 2) widths and heights.
        wh_b: (..., 2), broadcastable against `wh_a`.
    Returns:
        (...) IoU. Sizes <= 0 give 0 (no division by zero: the official epsilon 1e-16 is kept).
    """
    intersection = torch.minimum(wh_a, wh_b).clamp(min=0).prod(dim=-1)
    union = wh_a.prod(dim=-1) + wh_b.prod(dim=-1) - intersection
    return intersection / (union + 1e-16)


def cxcywh_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of (..., 4) boxes in (cx, cy, w, h) format (broadcasting like any binary op)."""
    top_left = torch.maximum(boxes_a[..., :2] - boxes_a[..., 2:] / 2, boxes_b[..., :2] - boxes_b[..., 2:] / 2)
    bottom_right = torch.minimum(boxes_a[..., :2] + boxes_a[..., 2:] / 2, boxes_b[..., :2] + boxes_b[..., 2:] / 2)
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = boxes_a[..., 2:].prod(dim=-1) + boxes_b[..., 2:].prod(dim=-1) - intersection
    return intersection / (union + 1e-16)
