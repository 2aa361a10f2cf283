"""What a training run records besides its losses: the fusion weights inside boxes, per-layer gradient norms,
scalars (CSV + tensorboard). Only rank 0 writes files."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..models import unwrap_model
from ..utils.fileio import atomic_write_text
from .distributed import all_reduce_sum, collective_device

logger = logging.getLogger(__name__)


SIZE_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}
"""COCO's object size ranges by box area; the fusion statistics apply them in input pixels."""


class FusionWeightStatistics:
    """Mean ASFF fusion weight of each source level, per target level, inside small/medium/large GT boxes.

    Forward hooks on `model.fusion.levels[l].softmax` capture the weights (B, 3, H_l, W_l) of each forward;
    `update(labels)` then averages them over the cells of each GT box (the cells whose centre lies inside the
    box, or the cell holding its centre when there is none: `analyze.cells.box_cell_mask`, the definition
    `scale-stats` uses) and accumulates one mean per box. Sizes are COCO's bins of the box area in input pixels
    (the training images are augmented and resized: their original sizes are gone), i.e. `scale-stats
    --size-basis input`. Use as a context manager: the hooks are removed on exit, also after an exception.
    Models without ASFF softmax modules give no statistics.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model)
        self.strides = tuple(self.model.strides)
        self.handles: list = []
        self.captured: dict[int, torch.Tensor] = {}
        self.hooked_levels: list[int] = []  # kept after exit: which levels had an ASFF softmax
        self.reset()

    def reset(self) -> None:
        # sums[level][size] = (3,) sum over boxes of their mean weights; counts[level][size] = boxes
        self.sums = torch.zeros(len(self.strides), len(SIZE_RANGES), 3, dtype=torch.float64)
        self.counts = torch.zeros(len(self.strides), len(SIZE_RANGES), dtype=torch.float64)

    def __enter__(self) -> FusionWeightStatistics:
        self.hooked_levels = []
        fusion = getattr(self.model, "fusion", None)
        for level, module in enumerate(getattr(fusion, "levels", [])):
            observed = getattr(module, "weights_module", None)  # ASFF's softmax or the weighted fusion's weights
            if observed is not None:
                self.handles.append(observed.register_forward_hook(self._hook(level)))
                self.hooked_levels.append(level)
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.captured.clear()

    @property
    def active(self) -> bool:
        """True when the model has ASFF softmax modules to observe (also after the hooks are removed)."""
        return bool(self.hooked_levels)

    def _hook(self, level: int) -> Callable:
        def hook(module, inputs, output):
            self.captured[level] = output.detach()

        return hook

    @torch.no_grad()
    def update(self, labels: torch.Tensor) -> None:
        """Accumulate the last forward's weights over `labels` (B, M, 5+) [class, cx, cy, w, h] input pixels."""
        if not self.captured:
            return
        labels = labels.detach().float()
        valid = (labels[..., 3] > 0) & (labels[..., 4] > 0)  # (B, M)
        areas = labels[..., 3] * labels[..., 4]
        size_index = torch.zeros_like(areas, dtype=torch.long)
        for index, (low, _) in enumerate(SIZE_RANGES.values()):
            size_index[areas >= low] = index
        for level, weights in self.captured.items():
            weights = weights.float().to(labels.device)  # (B, 3, H, W)
            _, _, height, width = weights.shape
            stride = self.strides[level]
            centers_x = (torch.arange(width, device=labels.device) + 0.5) * stride
            centers_y = (torch.arange(height, device=labels.device) + 0.5) * stride
            x1 = labels[..., 1] - labels[..., 3] / 2
            x2 = labels[..., 1] + labels[..., 3] / 2
            y1 = labels[..., 2] - labels[..., 4] / 2
            y2 = labels[..., 2] + labels[..., 4] / 2
            inside_x = (centers_x >= x1[..., None]) & (centers_x <= x2[..., None])  # (B, M, W)
            inside_y = (centers_y >= y1[..., None]) & (centers_y <= y2[..., None])  # (B, M, H)
            inside = (inside_y[..., :, None] & inside_x[..., None, :]).float()  # (B, M, H, W)
            # The one definition of the cells of a box (`asff_viz.analyze.cells.box_cell_mask`): the cells
            # whose centre lies inside it, or the cell holding its centre when there is none.
            empty = inside.sum(dim=(2, 3)) == 0  # (B, M)
            column = (labels[..., 1] / stride).floor().long().clamp(0, width - 1)
            row = (labels[..., 2] / stride).floor().long().clamp(0, height - 1)
            inside.view(*inside.shape[:2], -1).scatter_add_(2, (row * width + column)[..., None],
                                                            empty.float()[..., None])
            sums = torch.einsum("bmhw,bkhw->bmk", inside, weights)  # (B, M, 3)
            means = sums / inside.sum(dim=(2, 3))[..., None]
            for size in range(len(SIZE_RANGES)):
                chosen = valid & (size_index == size)
                self.sums[level, size] += means[chosen].sum(dim=0).double().cpu()
                self.counts[level, size] += float(chosen.sum())
        self.captured.clear()

    def reduce(self) -> None:
        """Sum the statistics over ranks."""
        if dist.is_available() and dist.is_initialized():
            for tensor in (self.sums, self.counts):
                reduced = all_reduce_sum(tensor.to(collective_device()))
                tensor.copy_(reduced.cpu())

    def rows(self, epoch: int) -> list[dict]:
        """One row per (target level, size): epoch, level, stride, size, boxes, weight_source_{0,1,2}."""
        rows = []
        for level, stride in enumerate(self.strides):
            if level not in self.hooked_levels:
                continue
            for size_index, size in enumerate(SIZE_RANGES):
                count = float(self.counts[level, size_index])
                means = (self.sums[level, size_index] / count).tolist() if count else [float("nan")] * 3
                rows.append({"epoch": epoch, "level": level, "stride": stride, "size": size, "boxes": int(count),
                             **{f"weight_source_{k}": round(v, 6) for k, v in enumerate(means)}})
        return rows


class GradientNormTracker:
    """Mean L2 norm of the gradient of each layer (module owning parameters), averaged over sampled steps."""

    def __init__(self, model: nn.Module) -> None:
        named = [(name, p) for name, p in unwrap_model(model).named_parameters() if p.requires_grad]
        self.layer_names: list[str] = []
        index_of: dict[str, int] = {}
        self.parameters, layer_of_parameter = [], []
        for name, parameter in named:
            layer = name.rsplit(".", 1)[0]
            if layer not in index_of:
                index_of[layer] = len(self.layer_names)
                self.layer_names.append(layer)
            self.parameters.append(parameter)
            layer_of_parameter.append(index_of[layer])
        self.layer_of_parameter = torch.tensor(layer_of_parameter, dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.layer_names), dtype=torch.float64)
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        """Record the current gradients (call after backward, after unscaling under fp16)."""
        squares = torch.zeros(len(self.parameters), dtype=torch.float64)
        for index, parameter in enumerate(self.parameters):
            if parameter.grad is not None:
                squares[index] = float(parameter.grad.detach().float().pow(2).sum())
        per_layer = torch.zeros(len(self.layer_names), dtype=torch.float64).index_add_(
            0, self.layer_of_parameter, squares)
        self.sums += per_layer.sqrt()
        self.steps += 1

    def rows(self, epoch: int) -> list[dict]:
        if not self.steps:
            return []
        means = (self.sums / self.steps).tolist()
        return [{"epoch": epoch, "layer": name, "grad_norm": mean, "steps": self.steps}
                for name, mean in zip(self.layer_names, means, strict=True)]


class ScalarLog:
    """Scalars to TensorBoard and to a CSV (`scalars.csv`: step, epoch, tag, value, wall_time); rank 0 only."""

    def __init__(self, log_dir: str | os.PathLike | None, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled and log_dir is not None
        self.writer = None
        self.csv_file = None
        if not self.enabled:
            return
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.log_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional: the CSV carries the same numbers
                logger.warning("tensorboard is not installed; writing scalars to CSV only")
        path = self.log_dir / "scalars.csv"
        new = not path.exists()
        self.csv_file = open(path, "a", newline="")
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["step", "epoch", "tag", "value", "wall_time"])

    def log(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        for tag, value in scalars.items():
            if value is None:
                continue
            if self.writer is not None:
                self.writer.add_scalar(tag, value, step, walltime=now)
            self.csv.writerow([step, epoch, tag, f"{value:.6g}", f"{now:.3f}"])
        self.csv_file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.csv_file is not None:
            self.csv_file.close()


def append_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append dict rows to a CSV, writing the header when the file is new."""
    if not rows:
        return
    path = Path(path)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def truncate_csv_epochs(path: str | os.PathLike, first_epoch: int) -> int:
    """Drop the rows of epochs >= `first_epoch` from a log CSV (a resumed run logs them again); atomic.

    Returns the number of rows dropped. Files without an `epoch` column are left as they are.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    if not fields or "epoch" not in fields:
        return 0
    kept = [row for row in rows if _epoch_of(row) < first_epoch]
    if len(kept) == len(rows):
        return 0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, buffer.getvalue())
    return len(rows) - len(kept)


def _epoch_of(row: dict) -> float:
    try:
        return float(row.get("epoch") or 0)
    except ValueError:
        return 0.0
