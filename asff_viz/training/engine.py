"""Training and evaluation engine: one epoch of training, evaluation, checkpoints, logs, statistics.

`asff_viz.train` is the command line around these functions; tests call them directly.

Distributed training: every function here works unchanged on one process or under torch.distributed
(launched by torchrun); the loss of each rank is divided by its own batch size and DDP averages gradients,
so N ranks of batch B equal one process of batch N*B. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import atomic_save, checkpoint_dict
from ..inference.coco_eval import evaluate_coco
from ..utils.fileio import atomic_write_text
from .ema import ModelEMA, unwrap_model
from .loss import LOSS_NAMES, YOLOv3Loss
from .schedule import LearningRateSchedule

logger = logging.getLogger(__name__)

SIZE_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}
"""COCO's object size ranges by box area; the fusion statistics apply them in input pixels."""


# ------------------------------------------------------------------------------------------ distributed


@dataclass
class DistributedContext:
    """Where this process stands: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), if any.

    NCCL on GPUs (one per local rank), gloo on CPU. Without those variables: a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        index = local_rank if world_size > 1 else (device.index or 0)
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; a no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on every rank (ranks must agree on skipping a step, or DDP would hang)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


# --------------------------------------------------------------------------------------------- model init


def initialize_weights(model: nn.Module) -> None:
    """The official `init_yolo`: Conv2d kaiming_normal_(a=0.1, fan_in) with zero bias, BatchNorm (1, 0).

    Deformable convs (not nn.Conv2d) keep their own initialization, as officially.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, a=0.1, mode="fan_in")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def set_objectness_prior(model: nn.Module, probability: float) -> None:
    """Bias the objectness logits of every slot to `probability` (RetinaNet's prior init; not official).

    With zero bias every one of the 4 * sum(H_l * W_l) positions starts at objectness 0.5, so the first
    steps are dominated by a huge objectness loss; from-scratch training on short schedules is much more
    stable when positions start near `probability` (e.g. 0.01).
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"objectness prior must be in (0, 1), got {probability}")
    raw = unwrap_model(model)
    with torch.no_grad():
        for level in raw.head.levels:
            bias = level.predict.bias.view(4, -1)  # (slot, 5 + C) rows of the prediction conv
            bias[:, 4] = -math.log((1.0 - probability) / probability)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed for (seed, epoch, rank), so that each epoch's randomness does not depend on earlier epochs."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def seed_data_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: numpy and python seeded from the worker's torch seed.

    PyTorch derives each worker's torch seed from the loader's generator; seeding the loader's generator
    per epoch therefore makes every worker's augmentation reproducible.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """RNG states of python, numpy, torch and CUDA as tensors and plain lists (loadable with weights_only)."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------------- statistics


class FusionWeightStatistics:
    """Mean ASFF fusion weight of each source level, per target level, inside small/medium/large GT boxes.

    Forward hooks on `model.fusion.levels[l].softmax` capture the weights (B, 3, H_l, W_l) of each forward;
    `update(labels)` then averages them over the cells of each GT box (the cells whose centre lies inside the
    box, or the cell holding its centre when there is none: `analyze.statistics.box_cell_mask`, the definition
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
            softmax = getattr(module, "softmax", None)
            if softmax is not None:
                self.handles.append(softmax.register_forward_hook(self._hook(level)))
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
            # The one definition of the cells of a box (`asff_viz.analyze.statistics.box_cell_mask`): the cells
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
                reduced = all_reduce_sum(tensor.to(_collective_device()))
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


def _collective_device() -> torch.device:
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


# ----------------------------------------------------------------------------------------------- logging


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


# ---------------------------------------------------------------------------------------------- training


def _gradients_finite(model: nn.Module) -> bool:
    """Whether every gradient is finite (one fused norm over all of them)."""
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    return not gradients or bool(torch.isfinite(nn.utils.get_total_norm(gradients)))


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss."""


@dataclass
class StepState:
    """Counters carried across epochs: optimizer steps done and the current run of non-finite losses."""

    global_step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0


@dataclass
class EpochOptions:
    """Settings of `train_one_epoch` that rarely change between calls."""

    amp_dtype: torch.dtype | None = None  # torch.bfloat16 / torch.float16 autocast on GPU; None: float32
    max_consecutive_nonfinite: int = 3
    log_interval: int = 10  # iterations between logged scalars
    grad_norm_interval: int = 0  # sample per-layer gradient norms every N steps (0: never)
    freeze_batchnorm: bool = False  # BatchNorm in eval mode: running statistics fixed, batch-independent
    clip_grad_norm: float = 0.0  # clip the global gradient norm to this (0: off, the official setting)
    progress: bool = True
    channels_last: bool = False  # batches in NHWC memory order (pair with a channels-last model)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_one_epoch(model: nn.Module, criterion: YOLOv3Loss, loader: Iterable, optimizer: torch.optim.Optimizer,
                    schedule: LearningRateSchedule, epoch: int, *, context: DistributedContext | None = None,
                    state: StepState | None = None, options: EpochOptions | None = None,
                    scaler: torch.amp.GradScaler | None = None, ema: ModelEMA | None = None,
                    fusion_statistics: FusionWeightStatistics | None = None,
                    gradient_norms: GradientNormTracker | None = None, log: ScalarLog | None = None,
                    num_epochs: int | None = None) -> dict:
    """Train `model` for one pass over `loader`.

    Args:
        loader: yields batches whose first two items are images (B, 3, S, S) normalized and labels
            (B, M, 6) [class, cx, cy, w, h, mixup ratio] in input pixels (zero rows are padding).
        schedule: sets the learning rate per iteration from (epoch, iteration).
        state: step counters carried across epochs (created when None).
        scaler: a GradScaler for fp16 autocast (None otherwise).
        fusion_statistics / gradient_norms: optional trackers, updated on every / every Nth step.
    Returns:
        dict with the epoch's mean loss terms (averaged over ranks), "images", "seconds", "skipped_steps",
        "steps" (this rank's optimizer steps), "unreadable_images" (items whose image could not be read and was
        replaced by another) and "unreadable_example" (the first such reason).
    Raises:
        NonFiniteLossError after `options.max_consecutive_nonfinite` consecutive non-finite losses; the
        model then holds the weights of the last good step (skipped steps change nothing).
    """
    context = context or DistributedContext()
    state = state or StepState()
    options = options or EpochOptions()
    device = context.device
    model.train()
    if options.freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    totals = torch.zeros(len(LOSS_NAMES) + 1, dtype=torch.float64)
    window = torch.zeros(len(LOSS_NAMES) + 2, dtype=torch.float64)  # losses, total, steps (for logging)
    images_seen, steps_done, unreadable, unreadable_example = 0, 0, 0, None
    start = window_start = time.perf_counter()
    iterations = len(loader) if hasattr(loader, "__len__") else None
    bar = None
    if options.progress and context.is_main:
        from tqdm import tqdm

        epochs_text = f"/{num_epochs}" if num_epochs else ""
        bar = tqdm(total=iterations, desc=f"epoch {epoch}{epochs_text}", dynamic_ncols=True, leave=True)
    buffers = list(unwrap_model(model).buffers())
    try:
        for iteration, batch in enumerate(loader):
            images, labels = batch[0], batch[1]
            for info in batch[2] if len(batch) > 2 and isinstance(batch[2], list) else ():
                if isinstance(info, dict) and info.get("unreadable"):
                    unreadable += 1
                    unreadable_example = unreadable_example or info["unreadable"]
            images = torch.as_tensor(images).to(device, non_blocking=True)
            if options.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = torch.as_tensor(labels).to(device, non_blocking=True).float()
            learning_rate = schedule.step(epoch, iteration)
            # BatchNorm statistics are restored if the step turns out non-finite.
            saved_buffers = [b.detach().clone() for b in buffers]
            with _autocast(device, options.amp_dtype):
                outputs = model(images)
            terms = criterion(outputs, labels)
            loss = terms["total"]
            loss_finite = all_ranks_true(bool(torch.isfinite(loss)), device)
            finite = loss_finite
            if finite:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                sample_norms = (gradient_norms is not None and options.grad_norm_interval > 0
                                and state.global_step % options.grad_norm_interval == 0)
                if scaler is not None and (sample_norms or options.clip_grad_norm > 0):
                    scaler.unscale_(optimizer)
                if sample_norms:
                    gradient_norms.update()  # before clipping: the norms the loss produces
                if scaler is None:
                    # A finite loss can still give non-finite gradients; stepping on them would put NaN into the
                    # weights (GradScaler checks this itself under fp16).
                    finite = all_ranks_true(_gradients_finite(model), device)
            if not finite:
                state.consecutive_nonfinite += 1
                state.skipped_steps += 1
                with torch.no_grad():
                    for buffer, saved in zip(buffers, saved_buffers, strict=True):
                        buffer.copy_(saved)
                if isinstance(model, nn.parallel.DistributedDataParallel) and not loss_finite:
                    # DDP's forward has prepared a gradient reduction; a zero backward completes it on every
                    # rank, so the next step starts from the same reducer state everywhere.
                    (sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0).backward()
                optimizer.zero_grad(set_to_none=True)
                if fusion_statistics is not None:
                    fusion_statistics.captured.clear()
                what = "loss" if not loss_finite else "gradients"
                warnings.warn(f"epoch {epoch} iteration {iteration}: non-finite {what} "
                              f"({ {k: float(v.detach()) for k, v in terms.items()} }); step skipped "
                              f"({state.consecutive_nonfinite} in a row)", RuntimeWarning, stacklevel=2)
                if state.consecutive_nonfinite >= options.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{state.consecutive_nonfinite} consecutive non-finite steps at epoch {epoch}, iteration "
                        f"{iteration}; stopping. Lower the learning rate or check the data.")
                continue
            state.consecutive_nonfinite = 0
            if options.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), options.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if ema is not None:
                ema.update(model)
            if fusion_statistics is not None:
                fusion_statistics.update(labels)
            state.global_step += 1
            steps_done += 1
            batch_images = images.shape[0] * context.world_size
            images_seen += batch_images
            values = torch.tensor([float(terms[name].detach()) for name in (*LOSS_NAMES, "total")], dtype=torch.float64)
            totals += values
            window[:-1] += values
            window[-1] += 1
            if bar is not None:
                bar.update(1)
            if (iteration + 1) % options.log_interval == 0 or (iterations is not None and iteration + 1 == iterations):
                reduced = all_reduce_sum(window.to(_collective_device())).cpu() / context.world_size
                steps_in_window = max(float(reduced[-1]), 1.0)
                means = {name: float(reduced[i]) / steps_in_window for i, name in enumerate((*LOSS_NAMES, "total"))}
                elapsed = time.perf_counter() - window_start
                throughput = steps_in_window * batch_images / max(elapsed, 1e-9)
                if bar is not None:
                    bar.set_postfix({"loss": f"{means['total']:.2f}", "obj": f"{means['obj']:.2f}",
                                     "iou": f"{means['iou']:.2f}", "cls": f"{means['cls']:.2f}",
                                     "lr": f"{learning_rate:.2e}", "size": images.shape[-1],
                                     "img/s": f"{throughput:.1f}"})
                if log is not None:
                    log.log(state.global_step, epoch, {**{f"train/loss_{k}": v for k, v in means.items()},
                                                       "train/lr": learning_rate,
                                                       "train/image_size": float(images.shape[-1]),
                                                       "train/images_per_second": throughput})
                window.zero_()
                window_start = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    reduced_totals = all_reduce_sum(torch.cat([totals, torch.tensor([float(steps_done)], dtype=torch.float64)])
                                    .to(_collective_device())).cpu()
    steps_all = max(float(reduced_totals[-1]), 1.0)
    summary = {name: float(reduced_totals[i]) / steps_all for i, name in enumerate((*LOSS_NAMES, "total"))}
    summary.update(images=images_seen, seconds=time.perf_counter() - start, skipped_steps=state.skipped_steps,
                   steps=steps_done, unreadable_images=unreadable, unreadable_example=unreadable_example)
    return summary


def evaluate(model: nn.Module, dataset, size: int, *, context: DistributedContext | None = None,
             batch_size: int = 8, conf_threshold: float = 0.001, nms_threshold: float = 0.65,
             amp_dtype: torch.dtype | None = None, num_workers: int = 0, progress: bool = False) -> dict:
    """COCO metrics of `model` on `dataset` (a `COCODetection`); every rank must call it when distributed."""
    context = context or DistributedContext()
    metrics, _ = evaluate_coco(model, dataset, size, conf_threshold=conf_threshold, nms_threshold=nms_threshold,
                               batch_size=batch_size, num_workers=num_workers, device=context.device,
                               amp_dtype=amp_dtype, progress=progress)
    return metrics


# -------------------------------------------------------------------------------------------- checkpoints


def training_checkpoint(model: nn.Module, metadata: dict, *, optimizer: torch.optim.Optimizer,
                        schedule: LearningRateSchedule, epoch: int, state: StepState, train_config: dict,
                        scaler: torch.amp.GradScaler | None = None, ema: ModelEMA | None = None,
                        history: dict | None = None) -> dict:
    """A project checkpoint (loadable by `asff_viz.load_model`) plus everything needed to resume.

    "model" holds the weights to use for inference: the EMA weights when EMA is on (the raw weights are then
    under "training"/"model"). `epoch` is the next epoch to run.
    """
    raw = unwrap_model(model)
    inference_model = ema.module if ema is not None else raw
    training = {
        "epoch": int(epoch),
        "global_step": state.global_step,
        "skipped_steps": state.skipped_steps,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "rng": rng_state(),
        "train_config": train_config,
        "history": history or {},
    }
    if ema is not None:
        training["model"] = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
    return checkpoint_dict(inference_model, metadata, training=training)


def save_training_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write atomically (temporary file, fsync, rename): a crash mid-write leaves the previous file intact."""
    atomic_save(checkpoint, path)


def restore_training_state(checkpoint: dict, model: nn.Module, *, optimizer: torch.optim.Optimizer,
                           schedule: LearningRateSchedule | None = None, scaler: torch.amp.GradScaler | None = None,
                           ema: ModelEMA | None = None, restore_rng: bool = True) -> tuple[int, StepState]:
    """Load the training state saved by `training_checkpoint`; returns (next epoch, step counters)."""
    training = checkpoint.get("training")
    if not isinstance(training, dict):
        raise ValueError("checkpoint has no training state (a weights-only file); use it with --init to "
                         "start a new run from its weights instead of --resume")
    raw = unwrap_model(model)
    raw.load_state_dict(training["model"] if training.get("model") is not None else checkpoint["model"])
    optimizer.load_state_dict(training["optimizer"])
    if schedule is not None and training.get("schedule"):
        schedule.load_state_dict(training["schedule"])
    if scaler is not None and training.get("scaler"):
        scaler.load_state_dict(training["scaler"])
    if ema is not None:
        if training.get("ema") is None:
            raise ValueError("the run being resumed had no EMA; resume without --ema")
        ema.load_state_dict(training["ema"])
    if restore_rng and training.get("rng"):
        set_rng_state(training["rng"])
    state = StepState(global_step=int(training.get("global_step", 0)),
                      skipped_steps=int(training.get("skipped_steps", 0)))
    return int(training["epoch"]), state


def grouped_parameters(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = True) -> list[dict]:
    """SGD parameter groups. Officially weight decay applies to all parameters; with
    `decay_norm_and_bias=False` BatchNorm parameters and biases are left undecayed."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or name == "bias":
                no_decay.append(parameter)
            else:
                decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

