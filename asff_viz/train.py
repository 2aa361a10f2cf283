"""Train YOLOv3-ASFF with the official recipe (guided-anchor loss, warm-up + cosine SGD, mixup, multi-scale).

Single process::

    python -m asff_viz.train --synthetic data/synthetic --out runs/asff --epochs 30 --batch-size 8

Several processes (CPU: gloo, GPU: NCCL; the batch size is per process)::

    torchrun --nproc_per_node=2 -m asff_viz.train --synthetic data/synthetic --out runs/asff ...

Data: COCO-format annotation JSON + image folder (--train-annotations/--train-images, optionally
--val-annotations/--val-images), or --synthetic DIR for a folder written by `python -m asff_viz.data.synthetic`.
The class list comes from the training annotations.

Outputs in --out: last.pt (every --checkpoint-interval epochs and at the end; loadable by
`asff_viz.load_model` and by --resume), best.pt (best validation AP), scalars.csv + tensorboard/ (losses,
learning rate, input size, throughput, validation metrics), fusion_weights.csv (per epoch: mean ASFF weight of
each source level per target level inside small/medium/large boxes), gradient_norms.csv (per epoch and layer),
metrics.csv (per evaluation).

Exact resume: each epoch's shuffling, multi-scale sizes, mixup partners and augmentation are seeded from
(seed, epoch), and checkpoints hold the optimizer, EMA, scaler and RNG states, so on CPU a run interrupted at an
epoch boundary and resumed reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .checkpoint import (
    CheckpointError,
    load_darknet_weights,
    load_state_dict_strict,
    parse_checkpoint,
    read_checkpoint,
)
from .coco_eval import METRIC_NAMES
from .config import FUSION_MODES, ModelConfig
from .data.coco import COCODetection
from .data.errors import DatasetError
from .ema import ModelEMA
from .engine import (
    DistributedContext,
    EpochOptions,
    FusionWeightStatistics,
    GradientNormTracker,
    NonFiniteLossError,
    ScalarLog,
    StepState,
    append_csv,
    epoch_seed,
    evaluate,
    grouped_parameters,
    init_distributed,
    initialize_weights,
    restore_training_state,
    save_training_checkpoint,
    seed_data_worker,
    seed_everything,
    set_objectness_prior,
    train_one_epoch,
    training_checkpoint,
)
from .loss import build_criterion
from .models import build_model, reset_fusion_weights
from .schedule import LearningRateSchedule, ScheduleConfig

logger = logging.getLogger("asff_viz.train")

OFFICIAL_DROPBLOCK = ((5, (1, 3, 5)), (80, (3, 5, 7)), (150, (7, 7, 7)))  # (epoch of 300, block sizes)


# ----------------------------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    train_annotations: str | None = None
    train_images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    synthetic: str | None = None
    input_size: int = 608  # evaluation size, and the training size of the final fixed-size epochs
    min_size: int = 320  # multi-scale range (official 320..608, a multiple of 32 drawn every 10 iterations)
    max_size: int = 608
    multiscale_interval: int = 10
    fixed_size_epochs: int = 10  # the last epochs train at input_size only (official: 10)
    mixup: bool = True
    min_box_size: float = 6.0  # augmented boxes with min(w, h) <= this (input pixels) are dropped (official 6)
    batch_size: int = 5  # per process (official: 5 per GPU)
    workers: int = 2

    def resolve(self) -> None:
        """Fill the split paths from --synthetic and check that the training split is given."""
        if self.synthetic:
            root = Path(self.synthetic)
            self.train_annotations = self.train_annotations or str(root / "annotations" / "train.json")
            self.train_images = self.train_images or str(root / "images" / "train")
            if (root / "annotations" / "val.json").is_file():
                self.val_annotations = self.val_annotations or str(root / "annotations" / "val.json")
                self.val_images = self.val_images or str(root / "images" / "val")
        if not self.train_annotations or not self.train_images:
            raise SystemExit("error: give --train-annotations and --train-images, or --synthetic DIR")
        if bool(self.val_annotations) != bool(self.val_images):
            raise SystemExit("error: --val-annotations and --val-images go together")
        for name in ("input_size", "min_size", "max_size"):
            if getattr(self, name) % 32:
                raise SystemExit(f"error: --{name.replace('_', '-')} must be a multiple of 32")
        if self.min_size > self.max_size:
            raise SystemExit("error: --min-size must not exceed --max-size")


@dataclass
class OptimConfig:
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True  # official: decay on all parameters
    ema: bool = False
    ema_decay: float = 0.9998
    label_smoothing: bool = True  # official cfg LABAL_SMOOTH True
    ignore_threshold: float = 0.7
    burn_in_epochs: int = 5
    flat_until_epoch: int = 20
    final_epochs: int = 30  # last epochs at min_lr, without mixup (official NO_MIXUP_EPOCHS)
    min_lr: float = 1e-5
    clip_grad_norm: float = 0.0  # not official (no clipping); helps short from-scratch runs
    objectness_prior: float | None = None  # not official (zero bias); e.g. 0.01 for from-scratch runs
    optimizer: str = "sgd"  # official: SGD; "adamw" (betas (momentum, 0.999), decoupled decay) for short runs


@dataclass
class RunConfig:
    out: str = "runs/train"
    epochs: int = 301
    seed: int = 0
    device: str | None = None
    amp: str = "auto"  # auto | none | bf16 | fp16 (GPU only)
    sync_bn: bool = False
    freeze_bn: bool = False
    init: str | None = None  # Darknet-53 .weights, official checkpoint or asff_viz checkpoint
    resume: str | None = None
    checkpoint_interval: int = 10
    eval_interval: int = 10
    eval_batch_size: int = 8
    log_interval: int = 10
    grad_norm_interval: int = 10
    fusion_statistics: bool = True
    progress: bool = True
    max_iterations: int | None = None  # per epoch, for quick experiments
    channels_last: bool = False  # NHWC weights and batches (faster convolutions on CPU and GPU)
    reset_fusion_weights: bool = False  # after --init: fusion weights back to uniform, learned afresh


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=dict)  # ModelConfig fields given on the command line
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--synthetic", help="folder written by `python -m asff_viz.data.synthetic`")
    data.add_argument("--train-annotations")
    data.add_argument("--train-images")
    data.add_argument("--val-annotations")
    data.add_argument("--val-images")
    data.add_argument("--size", type=int, default=608, help="evaluation size and final fixed training size")
    data.add_argument("--min-size", type=int, default=320, help="smallest multi-scale training size")
    data.add_argument("--max-size", type=int, default=608, help="largest multi-scale training size")
    data.add_argument("--fixed-size-epochs", type=int, default=10, help="last epochs trained at --size only")
    data.add_argument("--no-mixup", action="store_true", help="disable mixup (official: on)")
    data.add_argument("--min-box-size", type=float, default=6.0,
                      help="drop augmented boxes whose shorter side (input pixels) is not above this")
    data.add_argument("--batch-size", type=int, default=5, help="images per process")
    data.add_argument("--workers", type=int, default=2, help="data loading processes per training process")

    model = parser.add_argument_group("model (default: from --init/--resume checkpoint, else official ASFF)")
    model.add_argument("--fusion", choices=FUSION_MODES)
    model.add_argument("--rfb", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--dropblock", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--width", type=float)
    model.add_argument("--depth", type=float)

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                       help="sgd (official) or adamw (beta1 = --momentum, decoupled weight decay): AdamW "
                            "converges faster in short from-scratch runs and is insensitive to the loss scale")
    optim.add_argument("--lr", type=float, default=0.001)
    optim.add_argument("--momentum", type=float, default=0.9)
    optim.add_argument("--weight-decay", type=float, default=5e-4)
    optim.add_argument("--no-decay-bn-bias", action="store_true", help="no weight decay on BatchNorm and biases")
    optim.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as the model)")
    optim.add_argument("--ema-decay", type=float, default=0.9998)
    optim.add_argument("--no-label-smoothing", action="store_true")
    optim.add_argument("--ignore-threshold", type=float, default=0.7)
    optim.add_argument("--burn-in", type=int, default=5, help="warm-up epochs (lr x progress^4)")
    optim.add_argument("--flat-until", type=int, default=20, help="last epoch at the base lr before the cosine")
    optim.add_argument("--final-epochs", type=int, default=30, help="last epochs at --min-lr and without mixup")
    optim.add_argument("--min-lr", type=float, default=1e-5)
    optim.add_argument("--clip-grad-norm", type=float, default=0.0,
                       help="clip the gradient norm (0: off, official); e.g. 10 for from-scratch runs")
    optim.add_argument("--objectness-prior", type=float, default=None,
                       help="initial objectness probability of every prediction (official: 0.5, i.e. zero "
                       "bias); e.g. 0.01 stabilizes from-scratch runs")

    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/train", help="output folder")
    run.add_argument("--epochs", type=int, default=301, help="epochs to run (official: 301, epochs 0..300)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    run.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                     help="mixed precision on GPU (auto: bf16 when supported)")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs")
    run.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm statistics fixed (eval mode)")
    run.add_argument("--init", help="initial weights: Darknet-53 .weights, official or asff_viz checkpoint "
                     "(another class count re-initializes the class outputs)")
    run.add_argument("--resume", help="checkpoint (last.pt) of an interrupted run to continue exactly")
    run.add_argument("--checkpoint-interval", type=int, default=10, help="epochs between checkpoints")
    run.add_argument("--eval-interval", type=int, default=10, help="epochs between evaluations (0: only at end)")
    run.add_argument("--eval-batch-size", type=int, default=8)
    run.add_argument("--log-interval", type=int, default=10, help="iterations between logged scalars")
    run.add_argument("--grad-norm-interval", type=int, default=10, help="steps between gradient-norm samples "
                     "(0: off)")
    run.add_argument("--no-fusion-statistics", action="store_true")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--max-iterations", type=int, help="cap iterations per epoch (quick experiments)")
    run.add_argument("--channels-last", action="store_true",
                     help="channels-last (NHWC) weights and batches: faster convolutions, same results")
    run.add_argument("--reset-fusion-weights", action="store_true",
                     help="with --init: zero the ASFF weight logits (uniform 1/3 fusion) and learn them afresh")
    args = parser.parse_args(argv)
    if args.reset_fusion_weights and (args.init is None or args.resume is not None):
        parser.error("--reset-fusion-weights needs --init (a trained checkpoint) and no --resume")

    config = TrainConfig(
        data=DataConfig(args.train_annotations, args.train_images, args.val_annotations, args.val_images,
                        args.synthetic, args.size, args.min_size, args.max_size, 10, args.fixed_size_epochs,
                        not args.no_mixup, args.min_box_size, args.batch_size, args.workers),
        model={k: v for k, v in (("fusion", args.fusion), ("rfb", args.rfb), ("dropblock", args.dropblock),
                                 ("width", args.width), ("depth", args.depth)) if v is not None},
        optim=OptimConfig(args.lr, args.momentum, args.weight_decay, not args.no_decay_bn_bias, args.ema,
                          args.ema_decay, not args.no_label_smoothing, args.ignore_threshold, args.burn_in,
                          args.flat_until, args.final_epochs, args.min_lr, args.clip_grad_norm,
                          args.objectness_prior, args.optimizer),
        run=RunConfig(args.out, args.epochs, args.seed, args.device, args.amp, args.sync_bn, args.freeze_bn,
                      args.init, args.resume, args.checkpoint_interval, args.eval_interval, args.eval_batch_size,
                      args.log_interval, args.grad_norm_interval, not args.no_fusion_statistics,
                      not args.no_progress, args.max_iterations, args.channels_last, args.reset_fusion_weights),
    )
    config.data.resolve()
    return config


# ----------------------------------------------------------------------------------------------- model


def resolve_model_config(requested: dict, num_classes: int, reference: ModelConfig | None, source: str | None
                         ) -> ModelConfig:
    """The model config: command-line fields over the reference checkpoint's, class count from the data.

    A requested architecture field that contradicts the checkpoint is an error (its weights would not fit).
    """
    if reference is None:
        return ModelConfig(**{**requested, "num_classes": num_classes})
    base = reference.to_dict()
    for name, value in requested.items():
        if base[name] != value:
            raise SystemExit(f"error: --{name} {value} contradicts {source}, which holds a model with "
                             f"{name}={base[name]}; drop the flag or use a matching checkpoint.")
    return ModelConfig.from_dict({**base, "num_classes": num_classes})


def transfer_weights(model: nn.Module, state_dict: dict, source: str) -> list[str]:
    """Load `state_dict` into `model`, re-initializing class outputs when the class count differs.

    The prediction convs (`head.levels.l.predict`) hold, per slot, rows tx, ty, tw, th, obj, then the class
    logits: the box and objectness rows are copied slot by slot, the class rows keep `model`'s init.
    Returns the names of the partially transferred tensors.
    """
    target = model.state_dict()
    merged, partial = dict(state_dict), []
    for name, tensor in state_dict.items():
        if ".predict." in name and name in target and tensor.shape != target[name].shape:
            old_channels, new_channels = tensor.shape[0] // 4, target[name].shape[0] // 4
            result = target[name].clone()
            for slot in range(4):
                result[slot * new_channels: slot * new_channels + 5] = tensor[slot * old_channels:
                                                                             slot * old_channels + 5]
            merged[name] = result
            partial.append(name)
    load_state_dict_strict(model, merged, source)
    return partial


def load_initial_weights(model: nn.Module, path: str, state_dict: dict | None) -> None:
    if path.endswith(".weights") or path.endswith(".conv.74"):
        count = load_darknet_weights(model.backbone, path)
        logger.info("initialized the backbone from %s (%d convs)", path, count)
        return
    partial = transfer_weights(model, state_dict, path)
    if partial:
        logger.info("initialized from %s; class outputs re-initialized for %d classes", path, model.num_classes)
    else:
        logger.info("initialized from %s", path)


def set_dropblock(model: nn.Module, epoch: int, epochs: int) -> None:
    """The official DropBlock schedule (keep_prob 0.9; blocks grow at epochs 5, 80, 150 of 300), scaled to
    `epochs`. Only for models built with dropblock=True."""
    if not model.config.dropblock:
        return
    blocks = None
    for start, sizes in OFFICIAL_DROPBLOCK:
        if epoch >= round(start * (epochs - 1) / 300):
            blocks = sizes
    for module, size in zip(model.neck.dropblocks(), blocks or (1, 1, 1), strict=True):
        module.block_size, module.keep_prob = size, (0.9 if blocks else 1.0)


# ----------------------------------------------------------------------------------------------- data


def build_train_loader(dataset, config: TrainConfig, epoch: int, context: DistributedContext) -> DataLoader:
    """This epoch's loader over a `TrainDataset`.

    Shuffling, input sizes, mixup partners and augmentation depend only on (seed, epoch) (and the rank):
    the sampler and the loader's generator (which seeds the workers' torch RNG, from which `TrainDataset`
    draws each item's numpy Generator) are seeded per epoch.
    """
    from .data.augment import MultiScaleBatchSampler, collate

    data, run = config.data, config.run
    final_phase = epoch >= run.epochs - config.optim.final_epochs
    dataset.mixup_enabled = data.mixup and not final_phase  # official: no mixup in the last epochs
    if context.distributed:
        sampler = DistributedSampler(dataset, context.world_size, context.rank, shuffle=True, seed=run.seed,
                                     drop_last=True)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch_seed(run.seed, epoch)))
    batch_sampler = MultiScaleBatchSampler(sampler, data.batch_size, drop_last=True,
                                           sizes=range(data.min_size, data.max_size + 1, 32),
                                           change_every=data.multiscale_interval, seed=run.seed)
    batch_sampler.set_epoch(epoch)
    if epoch >= run.epochs - data.fixed_size_epochs:
        batch_sampler.fixed_size = data.input_size
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=data.workers, collate_fn=collate,
                      worker_init_fn=seed_data_worker,
                      generator=torch.Generator().manual_seed(epoch_seed(run.seed, epoch, 1 + context.rank)),
                      pin_memory=context.device.type == "cuda", persistent_workers=False)


class LimitedLoader:
    """At most `limit` batches of `loader` (for --max-iterations)."""

    def __init__(self, loader, limit: int) -> None:
        self.loader, self.limit = loader, limit

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index >= self.limit:
                break
            yield batch


# ----------------------------------------------------------------------------------------------- main


def amp_settings(choice: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use GradScaler) for --amp on `device`; mixed precision only on GPUs."""
    if device.type != "cuda" or choice == "none":
        if choice in ("bf16", "fp16") and device.type != "cuda":
            warnings.warn(f"--amp {choice} needs a GPU; training in float32", stacklevel=2)
        return None, False
    if choice == "auto":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if choice == "bf16" else (torch.float16, True)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train; returns a summary (last epoch's losses, best and last metrics, checkpoint path)."""
    config = parse_args(argv)
    context = init_distributed(config.run.device)
    logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    finished = False
    try:
        summary = _train(config, context)
        finished = True
        return summary
    finally:
        if context.distributed and dist.is_initialized():
            if finished:
                # DDP's reducer goes while its process group lives (freed after it, at exit, it can abort the
                # process in gloo), and every rank is done before any tears its connections down.
                gc.collect()
                dist.barrier()
            dist.destroy_process_group()


def _train(config: TrainConfig, context: DistributedContext) -> dict:
    from .data.augment import TrainDataset, TrainTransform

    data, optim, run = config.data, config.optim, config.run
    out = Path(run.out)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(run.seed)
    try:
        train_set = COCODetection(data.train_annotations, data.train_images)
        val_set = COCODetection(data.val_annotations, data.val_images) if data.val_annotations else None
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    class_names = train_set.class_names
    if val_set is not None and val_set.class_names != class_names:
        raise SystemExit(f"error: {data.val_annotations} and {data.train_annotations} have different categories")

    # The model config: from the resumed/initial checkpoint when there is one, else the command line.
    resume_data, init_state, reference, reference_source = None, None, None, None
    try:
        if run.resume:
            resume_data = read_checkpoint(run.resume)
            reference, _, _ = parse_checkpoint(resume_data, run.resume)
            reference_source = run.resume
        elif run.init and not run.init.endswith((".weights", ".conv.74")):
            reference, init_state, _ = parse_checkpoint(read_checkpoint(run.init), run.init)
            reference_source = run.init
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    model_config = resolve_model_config(config.model, len(class_names), reference, reference_source)
    if run.resume and reference.num_classes != len(class_names):
        raise SystemExit(f"error: {run.resume} was trained on {reference.num_classes} classes, the data has "
                         f"{len(class_names)}; resume with the same data, or start a new run with --init.")
    model = build_model(model_config)
    initialize_weights(model)
    if optim.objectness_prior is not None:
        set_objectness_prior(model, optim.objectness_prior)  # a checkpoint given by --init overrides it
    if run.init and not run.resume:
        try:
            load_initial_weights(model, run.init, init_state)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        if run.reset_fusion_weights:
            try:
                logger.info("fusion weights reset to uniform at %d levels", reset_fusion_weights(model))
            except ValueError as error:
                raise SystemExit(f"error: --reset-fusion-weights: {error}") from None
    model.to(context.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)

    train_dataset = TrainDataset(train_set, TrainTransform(min_box_size=data.min_box_size),
                                 input_size=data.input_size, mixup=data.mixup)
    probe = build_train_loader(train_dataset, config, 0, context)
    iterations_per_epoch = len(probe) if run.max_iterations is None else min(len(probe), run.max_iterations)
    del probe
    if iterations_per_epoch == 0:
        raise SystemExit(f"error: {len(train_set)} training images give no full batch of {data.batch_size} "
                         f"per process; lower --batch-size")

    criterion = build_criterion(model_config, ignore_threshold=optim.ignore_threshold,
                                label_smoothing=optim.label_smoothing).to(context.device)
    groups = grouped_parameters(model, optim.weight_decay, optim.decay_norm_and_bias)
    if optim.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.momentum, 0.999))
    else:
        optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, dampening=0)
    try:
        schedule_config = ScheduleConfig(base_lr=optim.lr, epochs=run.epochs, burn_in_epochs=optim.burn_in_epochs,
                                         flat_until_epoch=optim.flat_until_epoch, final_epochs=optim.final_epochs,
                                         min_lr=optim.min_lr)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    schedule = LearningRateSchedule(optimizer, schedule_config, iterations_per_epoch)
    amp_dtype, use_scaler = amp_settings(run.amp, context.device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    ema = ModelEMA(model, optim.ema_decay) if optim.ema else None

    start_epoch, state, history = 0, StepState(), {}
    if resume_data is not None:
        try:
            start_epoch, state = restore_training_state(resume_data, model, optimizer=optimizer, scaler=scaler,
                                                        ema=ema)
        except (ValueError, RuntimeError) as error:
            raise SystemExit(f"error: cannot resume from {run.resume}: {error}") from None
        history = resume_data["training"].get("history", {})
        logger.info("resumed %s at epoch %d (step %d)", run.resume, start_epoch, state.global_step)
        del resume_data

    training_model: nn.Module = model
    if context.distributed:
        if run.sync_bn and context.device.type == "cuda":
            training_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif run.sync_bn:
            warnings.warn("--sync-bn needs GPUs; using per-process BatchNorm", stacklevel=2)
        training_model = nn.parallel.DistributedDataParallel(
            training_model, device_ids=[context.device.index] if context.device.type == "cuda" else None)

    log = ScalarLog(out, enabled=context.is_main)
    gradient_norms = GradientNormTracker(model) if run.grad_norm_interval > 0 else None
    options = EpochOptions(amp_dtype=amp_dtype, log_interval=run.log_interval,
                           grad_norm_interval=run.grad_norm_interval, freeze_batchnorm=run.freeze_bn,
                           clip_grad_norm=optim.clip_grad_norm, progress=run.progress,
                           channels_last=run.channels_last)
    metadata = {"class_names": class_names, "input_size": data.input_size, "variant": model_config.variant,
                "dataset": {"train_annotations": data.train_annotations, "train_images": len(train_set)}}
    best_ap = max((row.get("AP") or 0.0 for row in history.get("metrics", [])), default=-1.0)
    summary: dict = {"checkpoint": str(out / "last.pt"), "best_ap": best_ap if best_ap >= 0 else None}
    if context.is_main:
        parameters = sum(p.numel() for p in model.parameters())
        logger.info("%s, %.2fM parameters, %d classes, %d training images, %d iterations/epoch x %d images x %d "
                    "processes, device %s", model_config.variant, parameters / 1e6, len(class_names),
                    len(train_set), iterations_per_epoch, data.batch_size, context.world_size, context.device)
    try:
        for epoch in range(start_epoch, run.epochs):
            # Every source of randomness of this epoch depends on (seed, epoch, rank) only: exact resume.
            seed_everything(epoch_seed(run.seed, epoch, context.rank))
            set_dropblock(model, epoch, run.epochs)
            loader = build_train_loader(train_dataset, config, epoch, context)
            if run.max_iterations is not None:
                loader = LimitedLoader(loader, run.max_iterations)
            fusion_statistics = FusionWeightStatistics(model) if run.fusion_statistics else None
            if gradient_norms is not None:
                gradient_norms.reset()
            with fusion_statistics or contextlib.nullcontext():
                result = train_one_epoch(training_model, criterion, loader, optimizer, schedule, epoch,
                                         context=context, state=state, options=options, scaler=scaler, ema=ema,
                                         fusion_statistics=fusion_statistics if fusion_statistics and
                                         fusion_statistics.active else None,
                                         gradient_norms=gradient_norms if context.is_main else None, log=log,
                                         num_epochs=run.epochs)
            if fusion_statistics is not None and fusion_statistics.active:
                fusion_statistics.reduce()
            epoch_row = {"epoch": epoch, **{k: round(v, 5) for k, v in result.items() if isinstance(v, float)},
                         "steps": result["steps"], "images": result["images"]}
            history.setdefault("epochs", []).append(epoch_row)
            if context.is_main:
                if fusion_statistics is not None and fusion_statistics.active:
                    append_csv(out / "fusion_weights.csv", fusion_statistics.rows(epoch))
                if gradient_norms is not None:
                    append_csv(out / "gradient_norms.csv", gradient_norms.rows(epoch))
                logger.info("epoch %d: loss %.3f (anchor %.3f iou %.3f l1 %.3f obj %.3f cls %.3f), %.1f img/s",
                            epoch, result["total"], result["anchor"], result["iou"], result["l1"], result["obj"],
                            result["cls"], result["images"] / max(result["seconds"], 1e-9))
            summary["losses"] = {k: result[k] for k in ("anchor", "iou", "l1", "obj", "cls", "total")}

            last_epoch = epoch == run.epochs - 1
            metrics = None
            if val_set is not None and ((run.eval_interval > 0 and (epoch + 1) % run.eval_interval == 0)
                                        or last_epoch):
                eval_model = ema.module if ema is not None else model
                metrics = evaluate(eval_model, val_set, data.input_size, context=context,
                                   batch_size=run.eval_batch_size, amp_dtype=amp_dtype, progress=run.progress)
                history.setdefault("metrics", []).append({"epoch": epoch, **metrics})
                summary["metrics"] = metrics
                if context.is_main:
                    log.log(state.global_step, epoch, {f"val/{k}": v for k, v in metrics.items()})
                    append_csv(out / "metrics.csv", [{"epoch": epoch, **{k: metrics[k] for k in METRIC_NAMES}}])
                    logger.info("epoch %d: %s", epoch, ", ".join(
                        f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))

            if context.is_main and ((epoch + 1) % run.checkpoint_interval == 0 or last_epoch or metrics):
                checkpoint = training_checkpoint(
                    model, {**metadata, "epoch": epoch, "metrics": metrics}, optimizer=optimizer,
                    schedule=schedule, epoch=epoch + 1, state=state, train_config=config.to_dict(), scaler=scaler,
                    ema=ema, history=history)
                if (epoch + 1) % run.checkpoint_interval == 0 or last_epoch:
                    save_training_checkpoint(out / "last.pt", checkpoint)
                if metrics is not None and metrics["AP"] > best_ap:
                    best_ap = metrics["AP"]
                    summary["best_ap"] = best_ap
                    save_training_checkpoint(out / "best.pt", checkpoint)
                del checkpoint
    except NonFiniteLossError as error:
        logger.error("%s The last good checkpoint is %s.", error, out / "last.pt")
        summary["error"] = str(error)
    finally:
        log.close()
    summary["epochs"] = history.get("epochs", [])
    return summary


if __name__ == "__main__":
    sys.exit(1 if "error" in main() else 0)
