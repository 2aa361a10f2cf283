"""The training loop: one epoch of training (`train_one_epoch`) and evaluation (`evaluate`).

`asff_viz.train` is the command line around these functions; tests call them directly.

Distributed training: every function here works unchanged on one process or under torch.distributed
(launched by torchrun); the loss of each rank is divided by its own batch size and DDP averages gradients,
so N ranks of batch B equal one process of batch N*B. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..inference.coco_eval import evaluate_coco
from ..models import unwrap_model
from .distributed import DistributedContext, all_ranks_true, all_reduce_sum, collective_device
from .ema import ModelEMA
from .loss import LOSS_NAMES, YOLOv3Loss
from .monitors import FusionWeightStatistics, GradientNormTracker, ScalarLog
from .schedule import LearningRateSchedule
from .state import StepState

logger = logging.getLogger(__name__)


def _gradients_finite(model: nn.Module) -> bool:
    """Whether every gradient is finite (one fused norm over all of them)."""
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    return not gradients or bool(torch.isfinite(nn.utils.get_total_norm(gradients)))


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss."""


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
    _set_train_mode(model, options.freeze_batchnorm)
    meter = _EpochMeter(context.world_size)
    iterations = len(loader) if hasattr(loader, "__len__") else None
    bar = _progress_bar(options, context, iterations, epoch, num_epochs)
    buffers = list(unwrap_model(model).buffers())
    try:
        for iteration, batch in enumerate(loader):
            meter.count_unreadable(batch)
            images = torch.as_tensor(batch[0]).to(device, non_blocking=True)
            if options.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = torch.as_tensor(batch[1]).to(device, non_blocking=True).float()
            learning_rate = schedule.step(epoch, iteration)
            saved_buffers = [b.detach().clone() for b in buffers]  # BatchNorm statistics, restored if skipped
            with _autocast(device, options.amp_dtype):
                outputs = model(images)
            terms = criterion(outputs, labels)
            failure = _backward(model, terms["total"], optimizer, scaler, gradient_norms, options, state, device)
            if failure:
                _skip_step(model, optimizer, buffers, saved_buffers, failure)
                if fusion_statistics is not None:
                    fusion_statistics.captured.clear()
                _count_skipped(state, options, terms, failure, epoch, iteration)
                continue
            state.consecutive_nonfinite = 0
            _optimizer_step(model, optimizer, scaler, options.clip_grad_norm)
            if ema is not None:
                ema.update(model)
            if fusion_statistics is not None:
                fusion_statistics.update(labels)
            state.global_step += 1
            meter.add(terms, images.shape[0])
            if bar is not None:
                bar.update(1)
            if (iteration + 1) % options.log_interval == 0 or (iterations is not None and iteration + 1 == iterations):
                _log_window(meter, bar, log, state.global_step, epoch, learning_rate, images.shape[-1])
    finally:
        if bar is not None:
            bar.close()
    return meter.summary(state.skipped_steps)


def _set_train_mode(model: nn.Module, freeze_batchnorm: bool) -> None:
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _progress_bar(options: EpochOptions, context: DistributedContext, iterations: int | None, epoch: int,
                  num_epochs: int | None):
    if not (options.progress and context.is_main):
        return None
    from tqdm import tqdm

    epochs_text = f"/{num_epochs}" if num_epochs else ""
    return tqdm(total=iterations, desc=f"epoch {epoch}{epochs_text}", dynamic_ncols=True, leave=True)


def _backward(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None, gradient_norms: GradientNormTracker | None,
              options: EpochOptions, state: StepState, device: torch.device) -> str | None:
    """Backward pass of a finite loss; returns what was non-finite on any rank ("loss", "gradients") or None."""
    if not all_ranks_true(bool(torch.isfinite(loss)), device):
        return "loss"
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
    # A finite loss can still give non-finite gradients; stepping on them would put NaN into the weights
    # (GradScaler checks this itself under fp16).
    if scaler is None and not all_ranks_true(_gradients_finite(model), device):
        return "gradients"
    return None


def _skip_step(model: nn.Module, optimizer: torch.optim.Optimizer, buffers: list[torch.Tensor],
               saved_buffers: list[torch.Tensor], failure: str) -> None:
    """Undo what a non-finite step changed: BatchNorm statistics and gradients."""
    with torch.no_grad():
        for buffer, saved in zip(buffers, saved_buffers, strict=True):
            buffer.copy_(saved)
    if isinstance(model, nn.parallel.DistributedDataParallel) and failure == "loss":
        # DDP's forward has prepared a gradient reduction; a zero backward completes it on every rank, so the
        # next step starts from the same reducer state everywhere.
        (sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0).backward()
    optimizer.zero_grad(set_to_none=True)


def _count_skipped(state: StepState, options: EpochOptions, terms: dict, failure: str, epoch: int,
                   iteration: int) -> None:
    state.consecutive_nonfinite += 1
    state.skipped_steps += 1
    warnings.warn(f"epoch {epoch} iteration {iteration}: non-finite {failure} "
                  f"({ {k: float(v.detach()) for k, v in terms.items()} }); step skipped "
                  f"({state.consecutive_nonfinite} in a row)", RuntimeWarning, stacklevel=3)
    if state.consecutive_nonfinite >= options.max_consecutive_nonfinite:
        raise NonFiniteLossError(
            f"{state.consecutive_nonfinite} consecutive non-finite steps at epoch {epoch}, iteration "
            f"{iteration}; stopping. Lower the learning rate or check the data.")


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    clip_grad_norm: float) -> None:
    if clip_grad_norm > 0:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


class _EpochMeter:
    """Loss sums of the epoch and of the current logging window, images seen, unreadable items."""

    NAMES = (*LOSS_NAMES, "total")

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.totals = torch.zeros(len(self.NAMES), dtype=torch.float64)
        self.window = torch.zeros(len(self.NAMES) + 1, dtype=torch.float64)  # losses, total, steps
        self.images_seen = self.steps = self.unreadable = 0
        self.unreadable_example = None
        self.batch_images = 0
        self.start = self.window_start = time.perf_counter()

    def count_unreadable(self, batch) -> None:
        for info in batch[2] if len(batch) > 2 and isinstance(batch[2], list) else ():
            if isinstance(info, dict) and info.get("unreadable"):
                self.unreadable += 1
                self.unreadable_example = self.unreadable_example or info["unreadable"]

    def add(self, terms: dict, batch_size: int) -> None:
        values = torch.tensor([float(terms[name].detach()) for name in self.NAMES], dtype=torch.float64)
        self.totals += values
        self.window[:-1] += values
        self.window[-1] += 1
        self.steps += 1
        self.batch_images = batch_size * self.world_size
        self.images_seen += self.batch_images

    def flush_window(self) -> tuple[dict, float]:
        """Mean losses of the window over all ranks and its throughput (images/s); starts a new window."""
        reduced = all_reduce_sum(self.window.to(collective_device())).cpu() / self.world_size
        steps = max(float(reduced[-1]), 1.0)
        means = {name: float(reduced[i]) / steps for i, name in enumerate(self.NAMES)}
        throughput = steps * self.batch_images / max(time.perf_counter() - self.window_start, 1e-9)
        self.window.zero_()
        self.window_start = time.perf_counter()
        return means, throughput

    def summary(self, skipped_steps: int) -> dict:
        steps = torch.cat([self.totals, torch.tensor([float(self.steps)], dtype=torch.float64)])
        reduced = all_reduce_sum(steps.to(collective_device())).cpu()
        steps_all = max(float(reduced[-1]), 1.0)
        summary = {name: float(reduced[i]) / steps_all for i, name in enumerate(self.NAMES)}
        summary.update(images=self.images_seen, seconds=time.perf_counter() - self.start,
                       skipped_steps=skipped_steps, steps=self.steps, unreadable_images=self.unreadable,
                       unreadable_example=self.unreadable_example)
        return summary


def _log_window(meter: _EpochMeter, bar, log: ScalarLog | None, global_step: int, epoch: int,
                learning_rate: float, image_size: int) -> None:
    means, throughput = meter.flush_window()
    if bar is not None:
        bar.set_postfix({"loss": f"{means['total']:.2f}", "obj": f"{means['obj']:.2f}", "iou": f"{means['iou']:.2f}",
                         "cls": f"{means['cls']:.2f}", "lr": f"{learning_rate:.2e}", "size": image_size,
                         "img/s": f"{throughput:.1f}"})
    if log is not None:
        log.log(global_step, epoch, {**{f"train/loss_{k}": v for k, v in means.items()}, "train/lr": learning_rate,
                                     "train/image_size": float(image_size), "train/images_per_second": throughput})


def evaluate(model: nn.Module, dataset, size: int, *, context: DistributedContext | None = None,
             batch_size: int = 8, conf_threshold: float = 0.001, nms_threshold: float = 0.65,
             amp_dtype: torch.dtype | None = None, num_workers: int = 0, progress: bool = False) -> dict:
    """COCO metrics of `model` on `dataset` (a `COCODetection`); every rank must call it when distributed."""
    context = context or DistributedContext()
    metrics, _ = evaluate_coco(model, dataset, size, conf_threshold=conf_threshold, nms_threshold=nms_threshold,
                               batch_size=batch_size, num_workers=num_workers, device=context.device,
                               amp_dtype=amp_dtype, progress=progress)
    return metrics


