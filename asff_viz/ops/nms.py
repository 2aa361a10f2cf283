"""Non-maximum suppression, vectorized in PyTorch (torchvision's compiled op is used when it imports)."""

from __future__ import annotations

import torch

from .boxes import box_iou


def _torchvision_nms():
    try:
        from torchvision.ops import nms as op  # noqa: PLC0415
    except Exception:  # absent, or a build that does not match this torch
        return None
    return op


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, use_torchvision: bool = True
        ) -> torch.Tensor:
    """Greedy NMS: indices (int64) of the kept (N, 4) xyxy boxes, in decreasing score order.

    A box is suppressed when its IoU with a higher-scoring kept box is strictly greater than `iou_threshold`
    (torchvision's rule). Ties in score keep the lower index first (stable sort).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    op = _torchvision_nms() if use_torchvision else None
    if op is not None:
        return op(boxes.float(), scores.float(), iou_threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order].float()
    # Greedy pass over the kept boxes only: each step compares the best remaining box with the rest in one
    # vector op, so the cost is (kept boxes) x (remaining boxes), with no N x N matrix in memory.
    keep = []
    remaining = torch.arange(order.numel(), device=boxes.device)
    while remaining.numel() > 0:
        best = remaining[0]
        keep.append(best)
        rest = remaining[1:]
        if rest.numel() == 0:
            break
        overlap = box_iou(sorted_boxes[best].unsqueeze(0), sorted_boxes[rest])[0]
        remaining = rest[overlap <= iou_threshold]
    return order[torch.stack(keep)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float,
                use_torchvision: bool = True) -> torch.Tensor:
    """Per-class NMS: boxes of different labels never suppress each other. Returns kept indices by score.

    Implemented with the coordinate-offset trick: each label's boxes are shifted to a disjoint region, so one
    NMS pass equals one pass per class.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    span = (boxes.max() - boxes.min()).float() + 1
    shifted = boxes.float() - boxes.min().float() + labels.to(torch.float32)[:, None] * span
    return nms(shifted, scores, iou_threshold, use_torchvision)
