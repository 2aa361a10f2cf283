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
    check_finite,
    load_darknet_weights,
    load_state_dict_strict,
    parse_checkpoint,
    read_checkpoint,
)
from .data.class_names import ClassMismatchError, match_classes
from .data.coco import COCODetection
from .data.errors import DatasetError
from .inference.coco_eval import METRIC_NAMES
from .models import build_model, reset_fusion_weights
from .models.config import FUSION_MODES, ModelConfig
from .training.distributed import DistributedContext, init_distributed
from .training.ema import ModelEMA, unwrap_model
from .training.engine import EpochOptions, NonFiniteLossError, evaluate, train_one_epoch
from .training.loss import build_criterion
from .training.monitors import FusionWeightStatistics, GradientNormTracker, ScalarLog, append_csv, truncate_csv_epochs
from .training.params import grouped_parameters, initialize_weights, set_objectness_prior
from .training.schedule import LearningRateSchedule, ScheduleConfig
from .training.state import (
    StepState,
    epoch_seed,
    restore_training_state,
    save_training_checkpoint,
    seed_data_worker,
    seed_everything,
    training_checkpoint,
)
from .utils.argtypes import (
    describe_os_error,
    input_size,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
    unit_interval,
)
from .utils.argtypes import device as device_type
from .utils.fileio import remove_stale_temporaries

logger = logging.getLogger(__name__)

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
            val_folder = root / "images" / "val"
            # `data.synthetic --val 0` writes an empty validation split: then there is none to evaluate on.
            if (root / "annotations" / "val.json").is_file() and val_folder.is_dir() and any(val_folder.iterdir()):
                self.val_annotations = self.val_annotations or str(root / "annotations" / "val.json")
                self.val_images = self.val_images or str(root / "images" / "val")
        if not self.train_annotations or not self.train_images:
            raise SystemExit("error: give --train-annotations and --train-images, or --synthetic DIR")
        if bool(self.val_annotations) != bool(self.val_images):
            raise SystemExit("error: --val-annotations and --val-images go together")
        for name, flag in (("input_size", "--size"), ("min_size", "--min-size"), ("max_size", "--max-size")):
            if getattr(self, name) % 32 or getattr(self, name) < 32:
                raise SystemExit(f"error: {flag} must be a positive multiple of 32")
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
    given: dict = field(default_factory=dict, repr=False)  # the flags given explicitly: {destination: value}
    allow_changes: bool = False  # --allow-changes: a resumed run may change its saved settings

    def to_dict(self) -> dict:
        return {"data": asdict(self.data), "model": dict(self.model), "optim": asdict(self.optim),
                "run": asdict(self.run)}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag's destination is a config field, listed in `FLAG_FIELDS`."""
    parser = argparse.ArgumentParser(prog="python -m asff_viz.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--synthetic", help="folder written by `python -m asff_viz.data.synthetic`")
    data.add_argument("--train-annotations")
    data.add_argument("--train-images")
    data.add_argument("--val-annotations")
    data.add_argument("--val-images")
    data.add_argument("--size", type=input_size, default=608, help="evaluation size and final fixed training size")
    data.add_argument("--min-size", type=input_size, default=320, help="smallest multi-scale training size")
    data.add_argument("--max-size", type=input_size, default=608, help="largest multi-scale training size")
    data.add_argument("--fixed-size-epochs", type=non_negative_int, default=10,
                      help="last epochs trained at --size only")
    data.add_argument("--no-mixup", action="store_true", help="disable mixup (official: on)")
    data.add_argument("--min-box-size", type=non_negative_float, default=6.0,
                      help="drop augmented boxes whose shorter side (input pixels) is not above this")
    data.add_argument("--batch-size", type=positive_int, default=5, help="images per process")
    data.add_argument("--workers", type=non_negative_int, default=2,
                      help="data loading processes per training process")

    model = parser.add_argument_group("model (default: from --init/--resume checkpoint, else official ASFF)")
    model.add_argument("--fusion", choices=FUSION_MODES)
    model.add_argument("--rfb", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--dropblock", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--width", type=positive_float)
    model.add_argument("--depth", type=positive_float)

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                       help="sgd (official) or adamw (beta1 = --momentum, decoupled weight decay): AdamW "
                            "converges faster in short from-scratch runs and is insensitive to the loss scale")
    optim.add_argument("--lr", type=positive_float, default=0.001)
    optim.add_argument("--momentum", type=unit_interval, default=0.9)
    optim.add_argument("--weight-decay", type=non_negative_float, default=5e-4)
    optim.add_argument("--no-decay-bn-bias", action="store_true", help="no weight decay on BatchNorm and biases")
    optim.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as the model)")
    optim.add_argument("--ema-decay", type=unit_interval, default=0.9998)
    optim.add_argument("--no-label-smoothing", action="store_true")
    optim.add_argument("--ignore-threshold", type=unit_interval, default=0.7)
    optim.add_argument("--burn-in", type=non_negative_int, default=5, help="warm-up epochs (lr x progress^4)")
    optim.add_argument("--flat-until", type=non_negative_int, default=20,
                       help="last epoch at the base lr before the cosine")
    optim.add_argument("--final-epochs", type=non_negative_int, default=30,
                       help="last epochs at --min-lr and without mixup")
    optim.add_argument("--min-lr", type=non_negative_float, default=1e-5)
    optim.add_argument("--clip-grad-norm", type=non_negative_float, default=0.0,
                       help="clip the gradient norm (0: off, official); e.g. 10 for from-scratch runs")
    optim.add_argument("--objectness-prior", type=unit_interval, default=None,
                       help="initial objectness probability of every prediction (official: 0.5, i.e. zero "
                       "bias); e.g. 0.01 stabilizes from-scratch runs")

    run = parser.add_argument_group("run")
    run.add_argument("--out", type=output_folder, default="runs/train", help="output folder")
    run.add_argument("--epochs", type=positive_int, default=301,
                     help="epochs to run (official: 301, epochs 0..300)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", type=device_type, help="cpu, cuda, cuda:1 (default: cuda when available)")
    run.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                     help="mixed precision on GPU (auto: bf16 when supported)")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs")
    run.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm statistics fixed (eval mode)")
    run.add_argument("--init", help="initial weights: Darknet-53 .weights, official or asff_viz checkpoint "
                     "(another class count re-initializes the class outputs)")
    run.add_argument("--resume", help="checkpoint (last.pt) of an interrupted run to continue exactly, with the "
                     "settings it was started with")
    run.add_argument("--allow-changes", action="store_true",
                     help="with --resume: accept flags that change the run's saved settings (each is logged)")
    run.add_argument("--checkpoint-interval", type=positive_int, default=10, help="epochs between checkpoints")
    run.add_argument("--eval-interval", type=non_negative_int, default=10,
                     help="epochs between evaluations (0: only at end)")
    run.add_argument("--eval-batch-size", type=positive_int, default=8)
    run.add_argument("--log-interval", type=positive_int, default=10, help="iterations between logged scalars")
    run.add_argument("--grad-norm-interval", type=non_negative_int, default=10,
                     help="steps between gradient-norm samples (0: off)")
    run.add_argument("--no-fusion-statistics", action="store_true")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--max-iterations", type=positive_int, help="cap iterations per epoch (quick experiments)")
    run.add_argument("--channels-last", action="store_true",
                     help="channels-last (NHWC) weights and batches: faster convolutions, same results")
    run.add_argument("--reset-fusion-weights", action="store_true",
                     help="with --init: zero the ASFF weight logits (uniform 1/3 fusion) and learn them afresh")
    return parser


def _negate(value: bool) -> bool:
    return not value


# Each command-line destination -> (config section, field[, conversion]). Sections are DataConfig ("data"),
# OptimConfig ("optim"), RunConfig ("run") and the model fields ("model", only those given).
FLAG_FIELDS: dict[str, tuple] = {
    "synthetic": ("data", "synthetic"), "train_annotations": ("data", "train_annotations"),
    "train_images": ("data", "train_images"), "val_annotations": ("data", "val_annotations"),
    "val_images": ("data", "val_images"), "size": ("data", "input_size"), "min_size": ("data", "min_size"),
    "max_size": ("data", "max_size"), "fixed_size_epochs": ("data", "fixed_size_epochs"),
    "no_mixup": ("data", "mixup", _negate), "min_box_size": ("data", "min_box_size"),
    "batch_size": ("data", "batch_size"), "workers": ("data", "workers"),
    "fusion": ("model", "fusion"), "rfb": ("model", "rfb"), "dropblock": ("model", "dropblock"),
    "width": ("model", "width"), "depth": ("model", "depth"),
    "optimizer": ("optim", "optimizer"), "lr": ("optim", "lr"), "momentum": ("optim", "momentum"),
    "weight_decay": ("optim", "weight_decay"), "no_decay_bn_bias": ("optim", "decay_norm_and_bias", _negate),
    "ema": ("optim", "ema"), "ema_decay": ("optim", "ema_decay"),
    "no_label_smoothing": ("optim", "label_smoothing", _negate), "ignore_threshold": ("optim", "ignore_threshold"),
    "burn_in": ("optim", "burn_in_epochs"), "flat_until": ("optim", "flat_until_epoch"),
    "final_epochs": ("optim", "final_epochs"), "min_lr": ("optim", "min_lr"),
    "clip_grad_norm": ("optim", "clip_grad_norm"), "objectness_prior": ("optim", "objectness_prior"),
    "out": ("run", "out"), "epochs": ("run", "epochs"), "seed": ("run", "seed"), "device": ("run", "device"),
    "amp": ("run", "amp"), "sync_bn": ("run", "sync_bn"), "freeze_bn": ("run", "freeze_bn"),
    "init": ("run", "init"), "resume": ("run", "resume"), "checkpoint_interval": ("run", "checkpoint_interval"),
    "eval_interval": ("run", "eval_interval"), "eval_batch_size": ("run", "eval_batch_size"),
    "log_interval": ("run", "log_interval"), "grad_norm_interval": ("run", "grad_norm_interval"),
    "no_fusion_statistics": ("run", "fusion_statistics", _negate), "no_progress": ("run", "progress", _negate),
    "max_iterations": ("run", "max_iterations"), "channels_last": ("run", "channels_last"),
    "reset_fusion_weights": ("run", "reset_fusion_weights"),
}

# Settings a resumed run may change freely: where and how it reports, not what it computes.
RESUME_FREE_FIELDS = {("run", name) for name in ("out", "device", "resume", "init", "checkpoint_interval",
                                                 "eval_interval", "eval_batch_size", "log_interval",
                                                 "grad_norm_interval", "fusion_statistics", "progress")}
_PATH_FIELDS = {"synthetic", "train_annotations", "train_images", "val_annotations", "val_images"}


def _config_values(namespace: dict) -> dict[tuple[str, str], object]:
    """Command-line destinations -> {(section, field): value}."""
    values = {}
    for dest, value in namespace.items():
        if dest not in FLAG_FIELDS:
            continue
        section, name, *convert = FLAG_FIELDS[dest]
        values[(section, name)] = convert[0](value) if convert else value
    return values


def config_from_values(values: dict[tuple[str, str], object]) -> TrainConfig:
    """A TrainConfig from {(section, field): value}, built by keyword; the model dict keeps given fields only."""
    sections: dict[str, dict] = {"data": {}, "model": {}, "optim": {}, "run": {}}
    for (section, name), value in values.items():
        if section != "model" or value is not None:
            sections[section][name] = value
    return TrainConfig(data=DataConfig(**sections["data"]), model=sections["model"],
                       optim=OptimConfig(**sections["optim"]), run=RunConfig(**sections["run"]))


def explicit_destinations(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The destinations the command line sets explicitly (not left at their default)."""
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.reset_fusion_weights and (args.init is None or args.resume is not None):
        parser.error("--reset-fusion-weights needs --init (a trained checkpoint) and no --resume")
    if args.allow_changes and args.resume is None:
        parser.error("--allow-changes goes with --resume")
    config = config_from_values(_config_values(vars(args)))
    config.given = {dest: getattr(args, dest) for dest in explicit_destinations(parser, argv)}
    config.allow_changes = args.allow_changes
    if not args.resume:  # a resumed run's settings are checked once the checkpoint's are laid under them
        try:
            config.data.resolve()
            check_schedule(config)
        except SystemExit as error:  # a usage error: argparse's one line and exit status 2
            parser.error(str(error.code).removeprefix("error: "))
    return config


def check_schedule(config: TrainConfig) -> ScheduleConfig:
    """The learning-rate schedule of `config`; SystemExit (before any work) when it does not fit the epochs."""
    optim = config.optim
    try:
        return ScheduleConfig(base_lr=optim.lr, epochs=config.run.epochs, burn_in_epochs=optim.burn_in_epochs,
                              flat_until_epoch=optim.flat_until_epoch, final_epochs=optim.final_epochs,
                              min_lr=optim.min_lr)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def resumed_config(config: TrainConfig, saved: dict, source: str) -> tuple[TrainConfig, list[str]]:
    """The saved run's config, with the flags given explicitly now laid over it.

    A flag that changes what the run computes (data, model, optimization, schedule, seed) is an error unless
    `--allow-changes` is given; returns the config and one line per change (logged by the caller).
    """
    try:
        saved_values = {(section, name): value for section in ("data", "optim", "run")
                        for name, value in dict(saved[section]).items()}
        saved_values.update({("model", name): value for name, value in dict(saved.get("model") or {}).items()})
        config_from_values(saved_values)  # fails here when the saved settings are malformed
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"error: {source}: its saved training settings cannot be read ({error}); start a new "
                         "run with --init instead.") from None
    changes, contradictions = [], []
    merged = dict(saved_values)
    for key, value in _config_values(config.given).items():
        before = saved_values.get(key)
        same = before == value or (key[1] in _PATH_FIELDS and before is not None and value is not None
                                   and Path(str(before)).resolve() == Path(str(value)).resolve())
        merged[key] = value
        if same:
            continue
        line = f"{key[1]}: {before!r} -> {value!r}"
        (changes if key in RESUME_FREE_FIELDS else contradictions).append(line)
    if contradictions and not config.allow_changes:
        raise SystemExit(f"error: {source} was started with other settings ({'; '.join(contradictions)}); a "
                         "resumed run continues with its own settings, so drop these flags, or add "
                         "--allow-changes to change them.")
    resumed = config_from_values(merged)
    resumed.given, resumed.allow_changes = config.given, config.allow_changes
    return resumed, changes + [f"{line} (--allow-changes)" for line in contradictions]


# ----------------------------------------------------------------------------------------------- guards


def check_class_names(saved: list[str] | None, class_names: list[str], source: str, annotations: str) -> None:
    """A resumed run continues on the classes it was trained on, in the same order: SystemExit otherwise."""
    if not saved:
        return
    try:
        mapping, _ = match_classes(saved, class_names, source, annotations)
    except ClassMismatchError as error:
        raise SystemExit(f"error: {error}") from None
    if mapping != list(range(len(mapping))):
        raise SystemExit(f"error: {annotations} orders its categories differently from {source}; a resumed run "
                         "needs the same class order (start a new run with --init instead).")


def prepare_output_folder(out: Path, resuming: bool) -> None:
    """Create --out; refuse to start a new run over another run's checkpoint; clear a killed write's leftovers."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: {describe_os_error(error, out)}") from None
    if not resuming and (out / "last.pt").exists():
        raise SystemExit(f"error: {out} already holds a run's last.pt; continue it with --resume {out / 'last.pt'}, "
                         "or give another --out (nothing was overwritten).")
    for name in ("last.pt", "best.pt"):
        if removed := remove_stale_temporaries(out / name):
            logger.info("removed %d unfinished temporary copies of %s (left by an interrupted save)",
                        removed, out / name)


def weight_probe(size: int, device: torch.device) -> torch.Tensor:
    """A fixed input for `unsound_weights`: seeded noise, the same in every epoch."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, size, size, generator=generator).to(device)


@torch.no_grad()
def unsound_weights(model: nn.Module, ema: ModelEMA | None, probe: torch.Tensor) -> str | None:
    """Why the weights must not be saved (None when they may): non-finite parameters or buffers, in the model or
    its EMA, or non-finite outputs on a fixed probe input (weights that exploded without overflowing yet)."""
    for name, module in (("weights", unwrap_model(model)), ("EMA weights", ema.module if ema is not None else None)):
        if module is None:
            continue
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        if bad:
            return f"{len(bad)} of {len(tensors)} {name} tensors hold NaN or infinity (e.g. {bad[0]})"
        was_training = module.training
        module.eval()
        try:
            outputs = module(probe)
        finally:
            module.train(was_training)
        # The raw outputs, not the decoded boxes: exp() of a young model's size logits may overflow harmlessly.
        if not all(torch.isfinite(level.prediction).all() for level in outputs):
            return f"the {name} give non-finite outputs on a probe input (exploded weights)"
    return None


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

    resume_data, reference, reference_source, reference_metadata = None, None, None, {}
    if config.run.resume:
        try:
            resume_data = read_checkpoint(config.run.resume)
            reference, resume_weights, reference_metadata = parse_checkpoint(resume_data, config.run.resume)
            check_finite(resume_weights, config.run.resume)
            reference_source = config.run.resume
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        if not isinstance(resume_data.get("training"), dict):
            raise SystemExit(f"error: {config.run.resume} has no training state (a weights-only file); use it "
                             "with --init to start a new run from its weights instead of --resume")
        config, changes = resumed_config(config, resume_data["training"].get("train_config") or {},
                                         config.run.resume)
        for line in changes:
            logger.info("resume: %s", line)
        config.data.resolve()
        check_schedule(config)
    data, optim, run = config.data, config.optim, config.run
    out = Path(run.out)
    if context.is_main:
        prepare_output_folder(out, resuming=resume_data is not None)
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
    init_state = None
    if not run.resume and run.init and not run.init.endswith((".weights", ".conv.74")):
        try:
            reference, init_state, reference_metadata = parse_checkpoint(read_checkpoint(run.init), run.init)
            check_finite(init_state, run.init)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from None
        reference_source = run.init
    if run.resume:
        check_class_names(reference_metadata.get("class_names"), class_names, run.resume, data.train_annotations)
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
    schedule = LearningRateSchedule(optimizer, check_schedule(config), iterations_per_epoch)
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
        history["epochs"] = [row for row in history.get("epochs", []) if row.get("epoch", 0) < start_epoch]
        history["metrics"] = [row for row in history.get("metrics", []) if row.get("epoch", 0) < start_epoch]
        logger.info("resumed %s at epoch %d (step %d)", run.resume, start_epoch, state.global_step)
        del resume_data
    if context.is_main:
        # An interrupted run logged the epoch it did not finish: those rows are logged again, once.
        for name in ("scalars.csv", "fusion_weights.csv", "gradient_norms.csv", "metrics.csv"):
            truncate_csv_epochs(out / name, start_epoch)

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
    # The newest checkpoint known to hold sound weights: named whenever the run has to stop.
    last_good = f"{run.resume} (the checkpoint this run resumed)" if run.resume else None
    probe = weight_probe(data.min_size, context.device)
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
            if result.get("unreadable_images"):
                logger.warning("epoch %d: %d images could not be read and were replaced by others (e.g. %s)",
                               epoch, result["unreadable_images"], result.get("unreadable_example"))
            if result["steps"] == 0:
                raise NonFiniteLossError(f"epoch {epoch}: every step was skipped (non-finite losses); nothing of "
                                         "it is kept. Lower the learning rate or check the data.")
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
                problem = unsound_weights(model, ema, probe)
                if problem:
                    raise NonFiniteLossError(f"epoch {epoch}: {problem}; not saved, so no checkpoint holds them.")
                checkpoint = training_checkpoint(
                    model, {**metadata, "epoch": epoch, "metrics": metrics}, optimizer=optimizer,
                    schedule=schedule, epoch=epoch + 1, state=state, train_config=config.to_dict(), scaler=scaler,
                    ema=ema, history=history)
                if (epoch + 1) % run.checkpoint_interval == 0 or last_epoch:
                    save_training_checkpoint(out / "last.pt", checkpoint)
                    last_good = f"{out / 'last.pt'} (epoch {epoch})"
                if metrics is not None and metrics["AP"] > best_ap:
                    best_ap = metrics["AP"]
                    summary["best_ap"] = best_ap
                    save_training_checkpoint(out / "best.pt", checkpoint)
                del checkpoint
    except NonFiniteLossError as error:
        where = (f"The last good checkpoint is {last_good}" if last_good else "No checkpoint was saved")
        best = f"; the best by validation AP is {out / 'best.pt'}" if (out / "best.pt").is_file() else ""
        logger.error("%s %s%s.", error, where, best)
        summary["error"] = str(error)
    except OSError as error:  # a full disk or a folder gone: the checkpoint on disk is the previous one, intact
        message = describe_os_error(error)
        logger.error("%s. The last good checkpoint is %s.", message, last_good or "none (no checkpoint was saved)")
        summary["error"] = message
    finally:
        log.close()
    summary["epochs"] = history.get("epochs", [])
    return summary


if __name__ == "__main__":
    sys.exit(1 if "error" in main() else 0)
