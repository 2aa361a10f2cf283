"""What a gradient is the gradient of (objectives: one detection's score, the sum of scores, the training loss
against ground truth) and where ground truth sits on each level's grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..inference.postprocess import row_location
from ..ops.boxes import centered_wh_iou
from .capture import LEVEL_NAMES


def row_scores(outputs: list, row_index: int, class_index: int | None = None) -> tuple[torch.Tensor, int]:
    """(B,) pre-NMS scores sigmoid(objectness) x sigmoid(class logit) of decoded row `row_index`, and the class.

    Read straight from the raw outputs at the row's level, slot and cell (as `model.decode` orders rows), so
    no other row is decoded: an overflowing exp() in some far-away box size cannot turn gradients into NaN,
    and the model's dtype is kept. class_index None = the most probable class of the first image.
    """
    grid_sizes = [tuple(int(v) for v in output.prediction.shape[-2:]) for output in outputs]
    location = row_location(row_index, grid_sizes)
    logits = outputs[location.level].prediction[:, location.slot, :, location.row, location.col]  # (B, 5 + C)
    if class_index is None:
        class_index = int(logits[0, 5:].argmax())
    return torch.sigmoid(logits[:, 4]) * torch.sigmoid(logits[:, 5 + int(class_index)]), int(class_index)


@dataclass(frozen=True)
class DetectionScore:
    """The pre-NMS score objectness x class probability of decoded row `row_index` (first image).

    class_index: the class whose probability counts; None = the row's most probable class in this forward.
    """

    row_index: int
    class_index: int | None = None

    def __call__(self, model: nn.Module, outputs: list) -> torch.Tensor:
        return row_scores(outputs, self.row_index, self.class_index)[0][0]

    def describe(self) -> str:
        suffix = "" if self.class_index is None else f", class {self.class_index}"
        return f"score of row {self.row_index}{suffix}"


@dataclass(frozen=True)
class SumOfScores:
    """Sum of objectness x best class probability over `row_indices` (all decoded rows when None)."""

    row_indices: tuple[int, ...] | None = None

    def __call__(self, model: nn.Module, outputs: list) -> torch.Tensor:
        if self.row_indices is not None:
            return sum(row_scores(outputs, row)[0][0] for row in self.row_indices)
        total = 0
        for output in outputs:
            probabilities = torch.sigmoid(output.prediction[0, :, 4:])  # (4, 1 + C, H, W)
            total = total + (probabilities[:, 0] * probabilities[:, 1:].max(dim=1).values).sum()
        return total

    def describe(self) -> str:
        return "sum of scores" + ("" if self.row_indices is None else f" of {len(self.row_indices)} rows")


@dataclass(frozen=True)
class TrainingLoss:
    """The training loss of the image against ground truth, summed over chosen levels and terms.

    labels: (M, 5) rows [class, cx, cy, w, h] in input pixels (or (1, M, 5); a 6th mixup column is allowed).
    terms: loss terms among "anchor", "iou", "l1", "obj", "cls", or "total". levels: output levels whose loss
    counts (0 = stride 32). Uses `asff_viz.training.loss.build_criterion(model.config)`.
    """

    labels: torch.Tensor | np.ndarray
    terms: tuple[str, ...] = ("total",)
    levels: tuple[int, ...] = (0, 1, 2)

    def batched_labels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(self.labels, dtype=np.float32), device=device)
        if labels.dim() == 2:
            labels = labels.unsqueeze(0)
        if labels.dim() != 3 or labels.shape[0] != 1 or labels.shape[-1] < 5:
            raise ValueError(f"labels must be (M, 5) [class, cx, cy, w, h] in input pixels, got "
                             f"{tuple(labels.shape)}")
        return labels

    def __call__(self, model: nn.Module, outputs: list) -> torch.Tensor:
        from ..training.loss import build_criterion  # local: the loss module is only needed for this objective

        criterion = build_criterion(model.config).to(outputs[0].prediction.device)
        per_level = criterion.loss_per_level(outputs, self.batched_labels(outputs[0].prediction.device))
        return sum(per_level[level][term] for level in self.levels for term in self.terms)

    def describe(self) -> str:
        levels = ", ".join(LEVEL_NAMES[level] for level in self.levels)
        return f"training loss ({'+'.join(self.terms)}) at {levels}"


def ground_truth_labels(boxes_xyxy: np.ndarray, class_indices: np.ndarray, transform) -> np.ndarray:
    """Ground truth in original pixels -> (M, 5) [class, cx, cy, w, h] in input pixels, for `TrainingLoss`.

    boxes_xyxy: (M, 4) x1, y1, x2, y2 in original image pixels; transform: the trace's `ImageTransform`.
    """
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    scale = np.array([transform.scale_x, transform.scale_y] * 2)
    boxes = boxes / scale
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = boxes[:, 2:] - boxes[:, :2]
    classes = np.asarray(class_indices, dtype=np.float64).reshape(-1, 1)
    return np.concatenate([classes, centers, sizes], axis=1).astype(np.float32)


def ground_truth_cells(labels, config, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Positives and object background of each level from ground truth, by the loss's assignment rule.

    A ground-truth box is a positive at the level whose anchor mask holds its best of the 9 anchors (by
    centred wh-IoU), in the cell holding its centre. At the other two levels the cell holding its centre is
    background for it: the conflicting case of the paper. (The loss's ignore rule depends on predictions and
    is not reproduced.) labels: (M, 5) [class, cx, cy, w, h] input pixels.
    Returns (positives, background): 3 bool arrays (H_l, W_l) each, level 0 first; a cell positive for one
    box is never marked background.
    """
    labels = np.asarray(labels, dtype=np.float64)
    labels = labels.reshape(-1, labels.shape[-1])
    anchors = np.asarray(config.anchors, dtype=np.float64)
    grids = [size // stride for stride in config.strides]
    positives = [np.zeros((g, g), dtype=bool) for g in grids]
    background = [np.zeros((g, g), dtype=bool) for g in grids]
    for row in labels:
        width, height = row[3], row[4]
        if width <= 0 or height <= 0:
            continue
        iou = centered_wh_iou(torch.tensor([width, height], dtype=torch.float64), torch.from_numpy(anchors))
        best = int(iou.argmax())
        assigned = next(level for level, mask in enumerate(config.anchor_masks) if best in mask)
        for level, (stride, grid) in enumerate(zip(config.strides, grids, strict=True)):
            r = min(max(int(row[2] // stride), 0), grid - 1)
            c = min(max(int(row[1] // stride), 0), grid - 1)
            (positives if level == assigned else background)[level][r, c] = True
    background = [b & ~p for b, p in zip(background, positives, strict=True)]
    return positives, background


def resample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (H, W) bool cell mask onto another grid of the same image: repeat when finer, any() when coarser."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    target_h, target_w = shape
    if target_h >= height:
        factor_h, factor_w = target_h // height, target_w // width
        return np.repeat(np.repeat(mask, factor_h, axis=0), factor_w, axis=1)
    factor_h, factor_w = height // target_h, width // target_w
    return mask.reshape(target_h, factor_h, target_w, factor_w).any(axis=(1, 3))
