"""Target assignment of the official YOLOv3-ASFF loss: which ground-truth box each prediction learns from.

Per ground-truth (GT) box, at the level its best anchor belongs to (see `asff_viz.training.loss`):

1. The cell is (row, column) = (int(cy / stride), int(cx / stride)) (the official int(x / img * fsize)).
2. The guided-anchor target is written to the best anchor's slot `a` *and* to the anchor-free slot 3.
3. The positive slot is 3 when the predicted guided anchor of slot 3 there has a higher wh-IoU with the GT
   than the best anchor, otherwise `a`; box, objectness and class targets go to the positive slot only.
4. When several GTs write to the same place, the last one (label order) wins, as in the official loop.

Separately, the ignore rule: a prediction whose (detached) box overlaps any GT of its image by more than the
threshold gets objectness weight 0.

Locations are flat indices into (B, slots, H, W), the order of the prediction tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ops.boxes import centered_wh_iou, cxcywh_iou

ANCHOR_FREE_SLOT = 3


@dataclass(frozen=True)
class LevelGrid:
    """The shape of one level's predictions: (batch, slots, height, width) cells of `stride` input pixels."""

    batch_size: int
    slots: int
    height: int
    width: int
    stride: int

    @property
    def locations(self) -> int:
        return self.batch_size * self.slots * self.height * self.width


@dataclass
class Assignment:
    """The targets of one level.

    gt: (K, 5 or 6) the GT rows assigned to the level, in (image, label) order; column, row: (K,) their cells.
    anchor_locations, anchor_gt: the guided-anchor writes that survive (location, index into `gt`).
    box_target_gt: (locations,) the GT whose box a location's prediction regresses to, -1 for none.
    positive_writes: (K,) each GT's positive location; positive_locations, positive_gt: the surviving ones.
    """

    gt: torch.Tensor
    column: torch.Tensor
    row: torch.Tensor
    anchor_locations: torch.Tensor
    anchor_gt: torch.Tensor
    box_target_gt: torch.Tensor
    positive_writes: torch.Tensor
    positive_locations: torch.Tensor
    positive_gt: torch.Tensor


@torch.no_grad()
def ignore_weights(predicted_boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                   threshold: float) -> torch.Tensor:
    """(locations,) objectness weights: 0 where the predicted box (B, slots, H, W, 4 cxcywh) overlaps a valid GT
    of its image (labels (B, M, 5+) [class, cx, cy, w, h], valid (B, M)) by more than `threshold`, else 1."""
    batch_size = predicted_boxes.shape[0]
    locations = predicted_boxes[..., 0].numel()
    pairwise = cxcywh_iou(predicted_boxes.reshape(batch_size, -1, 1, 4), labels[:, None, :, 1:5])  # (B, P, M)
    pairwise = pairwise.masked_fill(~valid[:, None, :], 0.0)
    if not pairwise.shape[2]:
        return torch.ones(locations, device=predicted_boxes.device)
    return (pairwise.amax(dim=2) <= threshold).float().reshape(locations)


def last_writer(flat_locations: torch.Tensor, num_locations: int) -> torch.Tensor:
    """Mask of the writes that survive when writes to the same location overwrite each other in order.

    Args:
        flat_locations: (K,) int64 location of each write, in write order.
    Returns:
        (K,) bool, True for the last write to each location (what a Python loop of assignments would leave).
    """
    order = torch.arange(flat_locations.numel(), device=flat_locations.device)
    last = torch.full((num_locations,), -1, dtype=torch.long, device=flat_locations.device)
    last.scatter_reduce_(0, flat_locations, order, reduce="amax", include_self=True)
    return last[flat_locations] == order


def assign_targets(labels: torch.Tensor, valid: torch.Tensor, best_anchor: torch.Tensor,
                   best_anchor_iou: torch.Tensor, anchor_mask: Sequence[int], flat_anchor_wh: torch.Tensor,
                   grid: LevelGrid) -> Assignment:
    """The targets of one level.

    Args:
        labels: (B, M, 5 or 6) [class, cx, cy, w, h(, mixup ratio)] input pixels; valid: (B, M) not padding.
        best_anchor, best_anchor_iou: (B, M) each GT's best of all anchors by wh-IoU and that IoU.
        anchor_mask: the indices (into all anchors) of this level's anchor-based slots.
        flat_anchor_wh: (locations, 2) the predicted guided-anchor sizes (detached here).
    """
    device = labels.device
    mask = torch.tensor(anchor_mask, device=device)
    matches_mask = best_anchor[..., None] == mask  # (B, M, 3)
    assigned = valid & matches_mask.any(dim=-1)
    image_index, label_index = assigned.nonzero(as_tuple=True)  # (K,), the official loop order
    gt = labels[image_index, label_index]  # (K, 5 or 6)
    slot = matches_mask[image_index, label_index].float().argmax(dim=-1)  # position of best_n in the mask
    image_width, image_height = grid.width * grid.stride, grid.height * grid.stride
    column = (gt[:, 1] / image_width * grid.width).long().clamp(0, grid.width - 1)
    row = (gt[:, 2] / image_height * grid.height).long().clamp(0, grid.height - 1)

    def flat_location(slot_index: torch.Tensor) -> torch.Tensor:
        return ((image_index * grid.slots + slot_index) * grid.height + row) * grid.width + column

    free_location = flat_location(torch.full_like(slot, ANCHOR_FREE_SLOT))
    free_iou = centered_wh_iou(gt[:, 3:5], flat_anchor_wh[free_location].detach())
    positive_slot = torch.where(free_iou > best_anchor_iou[image_index, label_index],
                                torch.full_like(slot, ANCHOR_FREE_SLOT), slot)

    # Guided-anchor (and box) targets: each GT writes slot a, then slot 3.
    anchor_writes = torch.stack([flat_location(slot), free_location], dim=1).reshape(-1)  # (2K,)
    anchor_write_gt = torch.arange(len(gt), device=device).repeat_interleave(2)
    kept = last_writer(anchor_writes, grid.locations)
    anchor_locations, anchor_gt = anchor_writes[kept], anchor_write_gt[kept]
    box_target_gt = torch.full((grid.locations,), -1, dtype=torch.long, device=device)
    box_target_gt[anchor_locations] = anchor_gt

    # Positives: box, objectness and class targets at the chosen slot.
    positive_writes = flat_location(positive_slot)  # (K,)
    kept = last_writer(positive_writes, grid.locations)
    return Assignment(gt=gt, column=column, row=row, anchor_locations=anchor_locations, anchor_gt=anchor_gt,
                      box_target_gt=box_target_gt, positive_writes=positive_writes,
                      positive_locations=positive_writes[kept],
                      positive_gt=torch.arange(len(gt), device=device)[kept])
