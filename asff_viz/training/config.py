"""The settings of a training run and the command line that sets them.

`DataConfig`, `OptimConfig` and `RunConfig` hold every setting with its default (the official recipe's where
there is one); the parser is built from them: each flag's destination maps to one field (`FLAG_FIELDS`), its
default is the field's, and a config is always built by keyword, so a new field cannot shift the others.
Problems found in the settings are `TrainingError`s: one line, printed by the command without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..models.config import BACKBONES, FUSION_MODES
from ..utils.argtypes import device as device_type
from ..utils.argtypes import (
    input_size,
    non_negative_float,
    non_negative_int,
    output_folder,
    positive_float,
    positive_int,
    unit_interval,
)
from .schedule import ScheduleConfig

DESCRIPTION = ("Train YOLOv3-ASFF with the official recipe (guided-anchor loss, warm-up + cosine SGD, mixup, "
               "multi-scale).")


class TrainingError(ValueError):
    """A run that cannot start or go on as asked (settings, data, checkpoint); the message is one line."""


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
            if not root.is_dir():
                problem = "is a file, not a folder" if root.exists() else "no such folder"
                raise TrainingError(f"--synthetic {root}: {problem}; a synthetic set is written by `python -m "
                                    "asff_viz.data.synthetic --out DIR`")
            if not (root / "annotations" / "train.json").is_file():
                raise TrainingError(f"--synthetic {root} is not a synthetic set (no annotations/train.json in it); "
                                    "a synthetic set is written by `python -m asff_viz.data.synthetic --out DIR`")
            self.train_annotations = self.train_annotations or str(root / "annotations" / "train.json")
            self.train_images = self.train_images or str(root / "images" / "train")
            val_folder = root / "images" / "val"
            # `data.synthetic --val 0` writes an empty validation split: then there is none to evaluate on.
            if (root / "annotations" / "val.json").is_file() and val_folder.is_dir() and any(val_folder.iterdir()):
                self.val_annotations = self.val_annotations or str(root / "annotations" / "val.json")
                self.val_images = self.val_images or str(root / "images" / "val")
        if not self.train_annotations or not self.train_images:
            raise TrainingError("give --train-annotations and --train-images, or --synthetic DIR")
        if bool(self.val_annotations) != bool(self.val_images):
            raise TrainingError("--val-annotations and --val-images go together")
        for name, flag in (("input_size", "--size"), ("min_size", "--min-size"), ("max_size", "--max-size")):
            if getattr(self, name) % 32 or getattr(self, name) < 32:
                raise TrainingError(f"{flag} must be a positive multiple of 32")
        if self.min_size > self.max_size:
            raise TrainingError("--min-size must not exceed --max-size")


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
    parser = argparse.ArgumentParser(prog="python -m asff_viz.train", description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_flags(parser.add_argument_group("data"))
    _add_model_flags(parser.add_argument_group(
        "model (default: from --init/--resume checkpoint, else official ASFF)"))
    _add_optim_flags(parser.add_argument_group("optimization"))
    _add_run_flags(parser.add_argument_group("run"))
    defaults = flag_defaults()  # not parser.set_defaults: its values would count as given in explicit_destinations
    for action in parser._actions:
        if action.dest in defaults:
            action.default = defaults[action.dest]
    return parser


def _add_data_flags(group) -> None:
    group.add_argument("--synthetic", help="folder written by `python -m asff_viz.data.synthetic`")
    group.add_argument("--train-annotations")
    group.add_argument("--train-images")
    group.add_argument("--val-annotations")
    group.add_argument("--val-images")
    group.add_argument("--size", type=input_size, help="evaluation size and final fixed training size")
    group.add_argument("--min-size", type=input_size, help="smallest multi-scale training size")
    group.add_argument("--max-size", type=input_size, help="largest multi-scale training size")
    group.add_argument("--fixed-size-epochs", type=non_negative_int,
                       help="last epochs trained at --size only")
    group.add_argument("--no-mixup", action="store_true", help="disable mixup (official: on)")
    group.add_argument("--min-box-size", type=non_negative_float,
                       help="drop augmented boxes whose shorter side (input pixels) is not above this")
    group.add_argument("--batch-size", type=positive_int, help="images per process")
    group.add_argument("--workers", type=non_negative_int,
                       help="data loading processes per training process")


def _add_model_flags(group) -> None:
    group.add_argument("--backbone", choices=BACKBONES,
                       help="darknet53 (the official ASFF models) or mobilenet_v2 (the official light models: ReLU6, "
                            "no feature adaption, 9th anchor (373, 326)); --init with torchvision's ImageNet "
                            "MobileNetV2 state_dict initialises its backbone")
    group.add_argument("--fusion", choices=FUSION_MODES)
    group.add_argument("--rfb", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--dropblock", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--width", type=positive_float)
    group.add_argument("--depth", type=positive_float)


def _add_optim_flags(group) -> None:
    group.add_argument("--optimizer", choices=("sgd", "adamw"),
                       help="sgd (official) or adamw (beta1 = --momentum, decoupled weight decay): AdamW "
                            "converges faster in short from-scratch runs and is insensitive to the loss scale")
    group.add_argument("--lr", type=positive_float)
    group.add_argument("--momentum", type=unit_interval)
    group.add_argument("--weight-decay", type=non_negative_float)
    group.add_argument("--no-decay-bn-bias", action="store_true", help="no weight decay on BatchNorm and biases")
    group.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as the model)")
    group.add_argument("--ema-decay", type=unit_interval)
    group.add_argument("--no-label-smoothing", action="store_true")
    group.add_argument("--ignore-threshold", type=unit_interval)
    group.add_argument("--burn-in", type=non_negative_int, help="warm-up epochs (lr x progress^4)")
    group.add_argument("--flat-until", type=non_negative_int,
                       help="last epoch at the base lr before the cosine")
    group.add_argument("--final-epochs", type=non_negative_int,
                       help="last epochs at --min-lr and without mixup")
    group.add_argument("--min-lr", type=non_negative_float)
    group.add_argument("--clip-grad-norm", type=non_negative_float,
                       help="clip the gradient norm (0: off, official); e.g. 10 for from-scratch runs")
    group.add_argument("--objectness-prior", type=unit_interval,
                       help="initial objectness probability of every prediction (official: 0.5, i.e. zero "
                       "bias); e.g. 0.01 stabilizes from-scratch runs")


def _add_run_flags(group) -> None:
    group.add_argument("--out", type=output_folder, help="output folder")
    group.add_argument("--epochs", type=positive_int,
                       help="epochs to run (official: 301, epochs 0..300)")
    group.add_argument("--seed", type=int)
    group.add_argument("--device", type=device_type, help="cpu, cuda, cuda:1 (default: cuda when available)")
    group.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"),
                       help="mixed precision on GPU (auto: bf16 when supported)")
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs")
    group.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm statistics fixed (eval mode)")
    group.add_argument("--init", help="initial weights: Darknet-53 .weights, official or asff_viz checkpoint "
                       "(another class count re-initializes the class outputs)")
    group.add_argument("--resume", help="checkpoint (last.pt) of an interrupted run to continue exactly, with the "
                       "settings it was started with")
    group.add_argument("--allow-changes", action="store_true",
                       help="with --resume: accept flags that change the run's saved settings (each is logged)")
    group.add_argument("--checkpoint-interval", type=positive_int, help="epochs between checkpoints")
    group.add_argument("--eval-interval", type=non_negative_int,
                       help="epochs between evaluations (0: only at end)")
    group.add_argument("--eval-batch-size", type=positive_int)
    group.add_argument("--log-interval", type=positive_int, help="iterations between logged scalars")
    group.add_argument("--grad-norm-interval", type=non_negative_int,
                       help="steps between gradient-norm samples (0: off)")
    group.add_argument("--no-fusion-statistics", action="store_true")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--max-iterations", type=positive_int, help="cap iterations per epoch (quick experiments)")
    group.add_argument("--channels-last", action="store_true",
                       help="channels-last (NHWC) weights and batches: faster convolutions, same results")
    group.add_argument("--reset-fusion-weights", action="store_true",
                       help="with --init: zero the ASFF weight logits (uniform 1/3 fusion) and learn them afresh")


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
    "backbone": ("model", "backbone"), "fusion": ("model", "fusion"), "rfb": ("model", "rfb"),
    "dropblock": ("model", "dropblock"),
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


def flag_defaults() -> dict[str, object]:
    """Each flag's default: its config field's (negated for a `--no-*` flag); model flags default to None (the
    checkpoint's or `ModelConfig`'s value is used)."""
    sections = {"data": DataConfig, "optim": OptimConfig, "run": RunConfig}
    defaults = {}
    for dest, (section, name, *convert) in FLAG_FIELDS.items():
        if section == "model":
            defaults[dest] = None
            continue
        value = {f.name: f.default for f in dataclasses.fields(sections[section])}[name]
        defaults[dest] = convert[0](value) if convert else value
    return defaults


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
        except TrainingError as error:  # a usage error: argparse's one line and exit status 2
            parser.error(str(error))
    return config


def check_schedule(config: TrainConfig) -> ScheduleConfig:
    """The learning-rate schedule of `config`; TrainingError (before any work) when it does not fit the epochs."""
    optim = config.optim
    try:
        return ScheduleConfig(base_lr=optim.lr, epochs=config.run.epochs, burn_in_epochs=optim.burn_in_epochs,
                              flat_until_epoch=optim.flat_until_epoch, final_epochs=optim.final_epochs,
                              min_lr=optim.min_lr)
    except ValueError as error:
        raise TrainingError(str(error)) from None


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
        raise TrainingError(f"{source}: its saved training settings cannot be read ({error}); start a new "
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
        raise TrainingError(f"{source} was started with other settings ({'; '.join(contradictions)}); a "
                         "resumed run continues with its own settings, so drop these flags, or add "
                         "--allow-changes to change them.")
    resumed = config_from_values(merged)
    resumed.given, resumed.allow_changes = config.given, config.allow_changes
    return resumed, changes + [f"{line} (--allow-changes)" for line in contradictions]


