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
    return order[_greedy_sorted(boxes[order].float(), iou_threshold)]


BLOCK = 512


def _greedy_sorted(boxes: torch.Tensor, iou_threshold: float, block: int = BLOCK) -> torch.Tensor:
    """Greedy NMS of boxes already sorted by decreasing score: positions of the kept boxes, ascending.

    Exact, and with no Python loop over boxes. The sorted boxes go in blocks of `block`. A block first drops
    every box that overlaps a box kept from an earlier block (one kept x block IoU matrix). Greedy NMS
    inside the block is then the unique solution of keep[j] = alive[j] and no kept i < j overlaps j. That
    system is triangular, so iterating it from "all kept" fixes at least one more leading entry per pass and
    stops at the solution (the iteration of Cluster-NMS, Zheng et al. 2020). The number of passes is the
    longest chain of suppressions inside the block, a handful in practice. Memory is block^2 + kept x block.
    """
    count = boxes.shape[0]
    kept_positions: list[torch.Tensor] = []
    kept_boxes = boxes.new_zeros((0, 4))
    for start in range(0, count, block):
        chunk = boxes[start:start + block]
        alive = torch.ones(chunk.shape[0], dtype=torch.bool, device=boxes.device)
        if kept_boxes.shape[0]:
            alive &= ~(box_iou(kept_boxes, chunk) > iou_threshold).any(dim=0)
        index = alive.nonzero().squeeze(1)
        if index.numel() == 0:
            continue
        chunk = chunk[index]
        overlaps = (box_iou(chunk, chunk) > iou_threshold).triu_(diagonal=1)  # [i, j]: earlier i hits later j
        keep = torch.ones(index.numel(), dtype=torch.bool, device=boxes.device)
        while True:
            updated = ~(overlaps & keep[:, None]).any(dim=0)
            if torch.equal(updated, keep):
                break
            keep = updated
        kept_positions.append(index[keep] + start)
        kept_boxes = torch.cat((kept_boxes, chunk[keep]))
    return torch.cat(kept_positions)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float,
                use_torchvision: bool = True) -> torch.Tensor:
    """Per-class NMS: boxes of different labels never suppress each other. Returns kept indices by score.

    With torchvision's op: the coordinate-offset trick (each label's boxes shifted to a disjoint region, so
    one pass equals one pass per class). Without it, one exact greedy pass per label, so the cost is the sum
    of the squared class sizes rather than the square of the total.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if use_torchvision and _torchvision_nms() is not None:
        span = (boxes.max() - boxes.min()).float() + 1
        shifted = boxes.float() - boxes.min().float() + labels.to(torch.float32)[:, None] * span
        return nms(shifted, scores, iou_threshold, use_torchvision)
    kept = []
    for label in torch.unique(labels):
        members = (labels == label).nonzero().squeeze(1)
        kept.append(members[nms(boxes[members], scores[members], iou_threshold, use_torchvision=False)])
    kept = torch.sort(torch.cat(kept)).values  # ascending index, so that the stable sort breaks ties by index
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]
