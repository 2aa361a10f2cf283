"""YOLOv3 guided-anchor loss, as computed by the official ASFF head during training.

The model's `forward` returns raw predictions (a list of `LevelOutput`, level 0 = stride 32 first); this
module turns them and the padded labels into loss terms. Target assignment per ground-truth (GT) box:

1. The GT's (w, h) is compared with the 9 anchors by "wh-IoU" (both boxes centred at the origin); the best
   anchor `best_n` decides the level (the level whose anchor mask holds it) and the slot `a` (its position in
   that mask).
2. The cell is (j, i) = (int(cy / stride), int(cx / stride)).
3. The predicted "guided anchor" of the anchor-free slot 3 at that cell competes with the best anchor: when its
   wh-IoU with the GT beats the best anchor's, the positive slot is 3, otherwise `a`.
4. The guided-anchor target (the GT's w, h) is written to slot `a` *and* slot 3; box, objectness and class
   targets only to the positive slot. When several GTs write to the same place, the last one (label order)
   wins, as in the official loop; without label smoothing the class targets of such GTs add up (multi-hot).

Loss terms per level, each summed over positions and divided by the batch size:

* ``anchor``: 1 - IoU^2 between the guided anchor wh and the GT wh (centred), at every slot-a/slot-3 target.
* ``iou``: (1 - IoU^2) between the decoded box and the GT box (plain IoU), weighted by 2 - w*h/image_area.
* ``l1``: BCE-with-logits(tx, frac(cx / stride)) + |tw - log(gt_w / guided_anchor_w)| (the same for y, h),
  with the same weight; the wh target keeps the gradient of the guided anchor, as officially.
* ``obj``: BCE-with-logits of the objectness over all positions; predictions whose decoded box has IoU > the
  ignore threshold (0.7) with any GT of their image get weight 0; positives get weight 1, or their mixup
  ratio (labels column 5).
* ``cls``: BCE-with-logits of the class logits at the positives; with label smoothing the targets are 1/C for
  every class and 1 - 1/C for the true class.

`total` = anchor + iou + l1 + obj + cls. All arithmetic is done in float32 (safe under autocast).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.head import SLOTS
from ..ops.boxes import centered_wh_iou, cxcywh_iou
from .assignment import LevelGrid, assign_targets, ignore_weights

LOSS_NAMES = ("anchor", "iou", "l1", "obj", "cls")


class YOLOv3Loss(nn.Module):
    """The official YOLOv3-ASFF training loss over the 3 levels.

    Args:
        num_classes: C.
        anchors: 9 (w, h) anchor sizes in input pixels.
        anchor_masks: per level, the indices into `anchors` of its 3 anchor-based slots (level 0 = stride 32).
        strides: per level, the stride in input pixels.
        base_anchors: optional per level (4, 2) base sizes of the 4 slots (what `model.base_anchors(level)`
            returns); by default the masked anchors plus (4 * stride, 4 * stride) for the anchor-free slot.
        ignore_threshold: predictions whose box has IoU above this with a GT are left out of the objectness loss.
        label_smoothing: class targets 1/C and 1 - 1/C instead of 0 and 1.
    """

    def __init__(
        self,
        num_classes: int,
        anchors: Sequence[Sequence[float]],
        anchor_masks: Sequence[Sequence[int]],
        strides: Sequence[int],
        base_anchors: Sequence[torch.Tensor] | None = None,
        ignore_threshold: float = 0.7,
        label_smoothing: bool = False,
    ) -> None:
        super().__init__()
        if len(anchor_masks) != len(strides):
            raise ValueError(f"{len(anchor_masks)} anchor masks for {len(strides)} strides")
        self.num_classes = int(num_classes)
        self.strides = tuple(int(s) for s in strides)
        self.anchor_masks = tuple(tuple(int(i) for i in mask) for mask in anchor_masks)
        self.ignore_threshold = float(ignore_threshold)
        self.label_smoothing = bool(label_smoothing)
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(-1, 2), persistent=False)
        if base_anchors is None:
            base_anchors = [
                torch.cat([self.anchors[list(mask)], torch.full((1, 2), 4.0 * stride)])
                for mask, stride in zip(self.anchor_masks, self.strides, strict=True)
            ]
        for level, base in enumerate(base_anchors):
            base = torch.as_tensor(base, dtype=torch.float32).view(SLOTS, 2)
            self.register_buffer(f"base_anchors_{level}", base, persistent=False)

    @classmethod
    def from_config(cls, config, *, ignore_threshold: float = 0.7, label_smoothing: bool = False) -> YOLOv3Loss:
        """Build from an `asff_viz.models.config.ModelConfig` (num_classes, anchors, anchor_masks, strides)."""
        return cls(
            config.num_classes,
            config.anchors,
            config.anchor_masks,
            config.strides,
            ignore_threshold=ignore_threshold,
            label_smoothing=label_smoothing,
        )

    def base_anchors(self, level: int) -> torch.Tensor:
        """(4, 2) base (w, h) of the 4 slots of `level`, in input pixels."""
        return getattr(self, f"base_anchors_{level}")

    def forward(self, outputs: Sequence, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss summed over levels.

        Args:
            outputs: per level a `LevelOutput` with `prediction` (B, 4, 5+C, H, W) raw logits and
                `anchor_logwh` (B, 4, 2, H, W) raw guided-anchor log sizes; level 0 (stride 32) first.
            labels: (B, M, 5 or 6) rows [class, cx, cy, w, h(, mixup ratio)] in input pixels; rows with
                w <= 0 or h <= 0 are padding.
        Returns:
            dict of scalar tensors "anchor", "iou", "l1", "obj", "cls", "total" (each divided by B).
        """
        per_level = self.loss_per_level(outputs, labels)
        return {name: torch.stack([terms[name] for terms in per_level]).sum() for name in (*LOSS_NAMES, "total")}

    def loss_per_level(self, outputs: Sequence, labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The same terms for each level separately (list, level 0 first), e.g. to study gradient flow.

        Every level's "total" is connected to all of that level's outputs (zero terms included), so that
        `torch.autograd.grad` and DistributedDataParallel see every parameter used.
        """
        if len(outputs) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} level outputs, got {len(outputs)}")
        if labels.dim() != 3 or labels.shape[-1] < 5:
            raise ValueError(f"labels must be (B, M, 5 or 6) [class, cx, cy, w, h(, ratio)], got {tuple(labels.shape)}")
        labels = labels.detach().float()
        valid = (labels[..., 3] > 0) & (labels[..., 4] > 0)  # (B, M)
        # Columns that are padding in every image carry no information; dropping them keeps the
        # (positions x GTs) IoU matrix of the ignore rule small.
        keep_columns = valid.any(dim=0)
        labels, valid = labels[:, keep_columns], valid[:, keep_columns]
        if valid.any():
            classes = labels[..., 0][valid]
            if (classes < 0).any() or (classes >= self.num_classes).any() or (classes != classes.round()).any():
                raise ValueError(
                    f"label classes must be integers in [0, {self.num_classes}); got values in "
                    f"[{classes.min().item()}, {classes.max().item()}]: check the dataset's category mapping"
                )
        # Best of the 9 anchors by wh-IoU, shared by all levels.
        anchor_ious = centered_wh_iou(labels[..., None, 3:5], self.anchors.to(labels.device))  # (B, M, 9)
        best_anchor_iou, best_anchor = anchor_ious.max(dim=-1)  # (B, M)
        return [
            self._level_loss(level, output, labels, valid, best_anchor, best_anchor_iou)
            for level, output in enumerate(outputs)
        ]

    def _level_loss(
        self,
        level: int,
        output,
        labels: torch.Tensor,
        valid: torch.Tensor,
        best_anchor: torch.Tensor,
        best_anchor_iou: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        prediction = output.prediction.float()
        anchor_logwh = output.anchor_logwh.float()
        batch_size, num_slots, num_channels, height, width = prediction.shape
        if num_slots != SLOTS or num_channels != 5 + self.num_classes:
            raise ValueError(
                f"level {level}: prediction shape {tuple(prediction.shape)} does not match "
                f"(B, {SLOTS}, {5 + self.num_classes}, H, W)"
            )
        stride = self.strides[level]
        image_width, image_height = width * stride, height * stride
        prediction = prediction.permute(0, 1, 3, 4, 2)  # (B, 4, H, W, 5+C)
        anchor_wh, predicted_boxes = self._decode(level, prediction, anchor_logwh)
        num_locations = batch_size * num_slots * height * width
        flat_prediction = prediction.reshape(num_locations, num_channels)
        flat_anchor_wh = anchor_wh.reshape(num_locations, 2)
        flat_boxes = predicted_boxes.reshape(num_locations, 4)

        objectness_weight = ignore_weights(predicted_boxes, labels, valid, self.ignore_threshold)
        grid = LevelGrid(batch_size, num_slots, height, width, stride)
        targets = assign_targets(labels, valid, best_anchor, best_anchor_iou, self.anchor_masks[level],
                                 flat_anchor_wh, grid)
        gt, gt_boxes, column, row = targets.gt, targets.gt[:, 1:5], targets.column, targets.row
        anchor_locations, anchor_gt = targets.anchor_locations, targets.anchor_gt
        positive_locations, positive_gt = targets.positive_locations, targets.positive_gt
        positive = gt[positive_gt]
        scale = 2.0 - positive[:, 3] * positive[:, 4] / (image_width * image_height)

        loss_anchor = (
            1.0 - centered_wh_iou(flat_anchor_wh[anchor_locations], gt_boxes[anchor_gt, 2:]) ** 2
        ).sum()

        box_target = gt_boxes[targets.box_target_gt[positive_locations]]
        loss_iou = (scale * (1.0 - cxcywh_iou(flat_boxes[positive_locations], box_target) ** 2)).sum()

        positive_prediction = flat_prediction[positive_locations]
        xy_target = torch.stack(
            [
                positive[:, 1] / image_width * width - column[positive_gt],
                positive[:, 2] / image_height * height - row[positive_gt],
            ],
            dim=1,
        )
        loss_xy = (
            scale[:, None] * F.binary_cross_entropy_with_logits(positive_prediction[:, :2], xy_target, reduction="none")
        ).sum()
        wh_target = torch.log(positive[:, 3:5] / flat_anchor_wh[positive_locations] + 1e-12)
        loss_wh = (scale[:, None] * (positive_prediction[:, 2:4] - wh_target).abs()).sum()

        objectness_target = torch.zeros(num_locations, device=prediction.device).index_put((positive_locations,),
                                                                             torch.ones_like(scale))
        mixup_ratio = positive[:, 5] if positive.shape[1] > 5 else torch.ones_like(scale)
        objectness_weight = objectness_weight.index_put((positive_locations,), mixup_ratio)
        loss_obj = (
            objectness_weight
            * F.binary_cross_entropy_with_logits(flat_prediction[:, 4], objectness_target, reduction="none")
        ).sum()

        class_target = self._class_targets(targets, num_locations)
        loss_cls = F.binary_cross_entropy_with_logits(positive_prediction[:, 5:], class_target, reduction="none").sum()

        terms = {
            "anchor": loss_anchor / batch_size,
            "iou": loss_iou / batch_size,
            "l1": (loss_xy + loss_wh) / batch_size,
            "obj": loss_obj / batch_size,
            "cls": loss_cls / batch_size,
        }
        # The zero product ties every output into the graph even when this level has no positives.
        terms["total"] = sum(terms.values()) + 0.0 * anchor_logwh.sum()
        return terms

    def _decode(self, level: int, prediction: torch.Tensor, anchor_logwh: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Guided-anchor sizes (B, 4, H, W, 2) and decoded boxes (B, 4, H, W, 4) cxcywh in input pixels, from
        the permuted raw prediction (B, 4, H, W, 5+C) and the raw anchor log sizes (B, 4, 2, H, W)."""
        device = prediction.device
        _, _, height, width, _ = prediction.shape
        stride = self.strides[level]
        base = self.base_anchors(level).to(device)
        anchor_wh = anchor_logwh.exp().permute(0, 1, 3, 4, 2) * base.view(1, SLOTS, 1, 1, 2)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, device=device, dtype=torch.float32),
            torch.arange(width, device=device, dtype=torch.float32),
            indexing="ij",
        )
        predicted_xy = (prediction[..., :2].sigmoid() + torch.stack([grid_x, grid_y], dim=-1)) * stride
        predicted_wh = prediction[..., 2:4].exp() * anchor_wh
        return anchor_wh, torch.cat([predicted_xy, predicted_wh], dim=-1)

    def _class_targets(self, targets, num_locations: int) -> torch.Tensor:
        """(positives, C) class targets of the surviving positives."""
        device = targets.gt.device
        class_index = targets.gt[:, 0].long()
        positive_gt = targets.positive_gt
        if self.label_smoothing:
            smooth = 1.0 / self.num_classes
            class_target = torch.full((len(positive_gt), self.num_classes), smooth, device=device)
            class_target[torch.arange(len(positive_gt), device=device), class_index[positive_gt]] = 1.0 - smooth
            return class_target
        # Every GT that made this slot positive sets its class bit (the official targets are never cleared).
        row_of_location = torch.full((num_locations,), -1, dtype=torch.long, device=device)
        row_of_location[targets.positive_locations] = torch.arange(len(positive_gt), device=device)
        class_target = torch.zeros((len(positive_gt), self.num_classes), device=device)
        class_target[row_of_location[targets.positive_writes], class_index] = 1.0
        return class_target


def build_criterion(config, *, ignore_threshold: float = 0.7, label_smoothing: bool = False) -> YOLOv3Loss:
    """The loss for a model built from `config` (an `asff_viz.models.config.ModelConfig`)."""
    return YOLOv3Loss.from_config(config, ignore_threshold=ignore_threshold, label_smoothing=label_smoothing)
