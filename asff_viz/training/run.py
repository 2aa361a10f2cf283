"""One training run, from its settings to its checkpoints: `train(config, context)`.

The steps, each a function: read the checkpoint to resume (its settings laid under the given flags), read the
datasets, build and initialise the model, set up the optimization, restore the training state, then train
epoch by epoch, evaluating and saving as scheduled. Weights are checked (finite, finite outputs on a fixed
probe) before every save, so a checkpoint never holds NaN; the error names the last good checkpoint.
The steps stay in one module, in the order they run (a little over 400 lines), so that a run reads top to bottom.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (
    CheckpointError,
    check_finite,
    parse_checkpoint,
    read_checkpoint,
    strip_prefixes,
)
from ..data.class_names import ClassMismatchError, match_classes
from ..data.coco import COCODetection
from ..data.errors import DatasetError
from ..inference.coco_eval import METRIC_NAMES
from ..models import build_model, reset_fusion_weights
from ..models.config import ModelConfig
from ..models.official import is_torchvision_mobilenet_v2, remap_torchvision_mobilenet_v2
from ..utils.argtypes import describe_os_error
from ..utils.fileio import remove_stale_temporaries
from .config import TrainConfig, TrainingError, check_schedule, resumed_config
from .distributed import DistributedContext
from .ema import ModelEMA
from .engine import EpochOptions, NonFiniteLossError, evaluate, train_one_epoch
from .loader import LimitedLoader, build_train_loader
from .loss import YOLOv3Loss, build_criterion
from .monitors import FusionWeightStatistics, GradientNormTracker, ScalarLog, append_csv, truncate_csv_epochs
from .params import grouped_parameters, initialize_weights, set_objectness_prior
from .schedule import LearningRateSchedule
from .state import (
    StepState,
    epoch_seed,
    restore_training_state,
    save_training_checkpoint,
    seed_everything,
    training_checkpoint,
)
from .weights import (
    load_backbone_weights,
    load_initial_weights,
    resolve_model_config,
    set_dropblock,
    unsound_weights,
    weight_probe,
)

logger = logging.getLogger(__name__)


def check_class_names(saved: list[str] | None, class_names: list[str], source: str, annotations: str) -> None:
    """A resumed run continues on the classes it was trained on, in the same order: TrainingError otherwise."""
    if not saved:
        return
    try:
        mapping, _ = match_classes(saved, class_names, source, annotations)
    except ClassMismatchError as error:
        raise TrainingError(f"{error}") from None
    if mapping != list(range(len(mapping))):
        raise TrainingError(f"{annotations} orders its categories differently from {source}; a resumed run "
                         "needs the same class order (start a new run with --init instead).")


def prepare_output_folder(out: Path, resuming: bool) -> None:
    """Create --out; refuse to start a new run over another run's checkpoint; clear a killed write's leftovers."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainingError(f"{describe_os_error(error, out)}") from None
    if not resuming and (out / "last.pt").exists():
        raise TrainingError(f"{out} already holds a run's last.pt; continue it with --resume {out / 'last.pt'}, "
                         "or give another --out (nothing was overwritten).")
    for name in ("last.pt", "best.pt"):
        if removed := remove_stale_temporaries(out / name):
            logger.info("removed %d unfinished temporary copies of %s (left by an interrupted save)",
                        removed, out / name)


def amp_settings(choice: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, use GradScaler) for --amp on `device`; mixed precision only on GPUs."""
    if device.type != "cuda" or choice == "none":
        if choice in ("bf16", "fp16") and device.type != "cuda":
            warnings.warn(f"--amp {choice} needs a GPU; training in float32", stacklevel=2)
        return None, False
    if choice == "auto":
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if choice == "bf16" else (torch.float16, True)


@dataclass
class _Reference:
    """The checkpoint a run starts from (--resume or --init): its model config, weights and metadata."""

    source: str
    config: ModelConfig
    weights: dict
    metadata: dict
    training: dict | None = None  # the training state, for --resume
    backbone_only: bool = False  # torchvision's ImageNet MobileNetV2: `weights` are the backbone's (no config)


@dataclass
class _Run:
    """What the epochs of one run share."""

    config: TrainConfig
    context: DistributedContext
    out: Path
    model: nn.Module
    training_model: nn.Module  # the model, wrapped for distributed training
    model_config: ModelConfig
    train_dataset: object
    val_set: COCODetection | None
    criterion: YOLOv3Loss
    optimizer: torch.optim.Optimizer
    schedule: LearningRateSchedule
    scaler: torch.amp.GradScaler | None
    ema: ModelEMA | None
    amp_dtype: torch.dtype | None
    log: ScalarLog
    metadata: dict
    probe: torch.Tensor
    gradient_norms: GradientNormTracker | None = None
    options: EpochOptions = field(default_factory=EpochOptions)
    state: StepState = field(default_factory=StepState)
    history: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    best_ap: float = -1.0
    last_good: str | None = None  # the newest checkpoint known to hold sound weights, named when the run stops


def train(config: TrainConfig, context: DistributedContext) -> dict:
    """Run the training `config` describes; returns a summary (last epoch's losses, best and last metrics,
    checkpoint path, "error" when the run had to stop). TrainingError (before any epoch) for bad settings."""
    config, resume = _read_resume(config)
    out = Path(config.run.out)
    if context.is_main:
        prepare_output_folder(out, resuming=resume is not None)
    seed_everything(config.run.seed)
    train_set, val_set = _read_datasets(config)
    run = _prepare(config, context, resume, train_set, val_set)
    start_epoch = _restore(run, resume)
    del resume  # the resumed checkpoint's tensors are in the model and optimizer now
    try:
        for epoch in range(start_epoch, config.run.epochs):
            _train_epoch(run, epoch)
    except NonFiniteLossError as error:
        where = f"The last good checkpoint is {run.last_good}" if run.last_good else "No checkpoint was saved"
        best = f"; the best by validation AP is {out / 'best.pt'}" if (out / "best.pt").is_file() else ""
        logger.error("%s %s%s.", error, where, best)
        run.summary["error"] = str(error)
    except OSError as error:  # a full disk or a folder gone: the checkpoint on disk is the previous one, intact
        message = describe_os_error(error)
        logger.error("%s. The last good checkpoint is %s.", message,
                     run.last_good or "none (no checkpoint was saved)")
        run.summary["error"] = message
    finally:
        run.log.close()
    run.summary["epochs"] = run.history.get("epochs", [])
    return run.summary


def _read_resume(config: TrainConfig) -> tuple[TrainConfig, _Reference | None]:
    """The checkpoint of --resume, parsed and checked, with its saved settings laid under the given flags."""
    source = config.run.resume
    if not source:
        return config, None
    try:
        data = read_checkpoint(source)
        model_config, weights, metadata = parse_checkpoint(data, source)
        check_finite(weights, source)
    except CheckpointError as error:
        raise TrainingError(str(error)) from None
    if not isinstance(data.get("training"), dict):
        raise TrainingError(f"{source} has no training state (a weights-only file); use it with --init to start a "
                            "new run from its weights instead of --resume")
    config, changes = resumed_config(config, data["training"].get("train_config") or {}, source)
    for line in changes:
        logger.info("resume: %s", line)
    config.data.resolve()
    check_schedule(config)
    return config, _Reference(source, model_config, weights, metadata, training=data["training"])


def _read_datasets(config: TrainConfig) -> tuple[COCODetection, COCODetection | None]:
    data = config.data
    try:
        train_set = COCODetection(data.train_annotations, data.train_images)
        val_set = COCODetection(data.val_annotations, data.val_images) if data.val_annotations else None
    except DatasetError as error:
        raise TrainingError(str(error)) from None
    if val_set is not None and val_set.class_names != train_set.class_names:
        raise TrainingError(f"{data.val_annotations} and {data.train_annotations} have different categories")
    return train_set, val_set


def _read_init(run_config) -> _Reference | None:
    """The checkpoint of --init: a model checkpoint, or torchvision's ImageNet MobileNetV2 state_dict (a backbone
    only, remapped onto ours, as the official recipe initialises the light models). A Darknet .weights file is
    read later, into the backbone."""
    path = run_config.init
    if run_config.resume or not path or path.endswith((".weights", ".conv.74")):
        return None
    try:
        data = read_checkpoint(path)
        plain = strip_prefixes(data)
        if is_torchvision_mobilenet_v2(plain):
            weights = remap_torchvision_mobilenet_v2(plain)
            check_finite(weights, path)
            return _Reference(path, None, weights, {}, backbone_only=True)
        model_config, weights, metadata = parse_checkpoint(data, path)
        check_finite(weights, path)
    except CheckpointError as error:
        raise TrainingError(str(error)) from None
    return _Reference(path, model_config, weights, metadata)


def _build_model(config: TrainConfig, class_names: list[str], resume: _Reference | None,
                 context: DistributedContext) -> tuple[nn.Module, ModelConfig]:
    """The model: its config from the resumed or initial checkpoint when there is one (else the flags),
    initialised officially, then from --init."""
    run = config.run
    init = _read_init(run)
    requested = dict(config.model)
    if init is not None and init.backbone_only:
        if requested.setdefault("backbone", "mobilenet_v2") != "mobilenet_v2":
            raise TrainingError(f"--init {init.source} holds torchvision's MobileNetV2; it initialises "
                                "--backbone mobilenet_v2, not --backbone darknet53")
    # A backbone-only --init carries no model config: the flags give it.
    reference = resume or (init if init is not None and not init.backbone_only else None)
    if resume is not None:
        check_class_names(resume.metadata.get("class_names"), class_names, resume.source, config.data.train_annotations)
    model_config = resolve_model_config(requested, len(class_names), reference and reference.config,
                                        reference and reference.source)
    if resume is not None and resume.config.num_classes != len(class_names):
        raise TrainingError(f"{resume.source} was trained on {resume.config.num_classes} classes, the data has "
                            f"{len(class_names)}; resume with the same data, or start a new run with --init.")
    model = build_model(model_config)
    initialize_weights(model)
    if config.optim.objectness_prior is not None:
        set_objectness_prior(model, config.optim.objectness_prior)  # a checkpoint given by --init overrides it
    if run.init and not run.resume:
        try:
            if init is not None and init.backbone_only:
                load_backbone_weights(model, init.weights, init.source)
            else:
                load_initial_weights(model, run.init, init and init.weights)
        except CheckpointError as error:
            raise TrainingError(str(error)) from None
        if run.reset_fusion_weights:
            try:
                logger.info("fusion weights reset to uniform at %d levels", reset_fusion_weights(model))
            except ValueError as error:
                raise TrainingError(f"--reset-fusion-weights: {error}") from None
    model.to(context.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, model_config


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    optim = config.optim
    groups = grouped_parameters(model, optim.weight_decay, optim.decay_norm_and_bias)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.momentum, 0.999))
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, dampening=0)


def _distributed_model(model: nn.Module, sync_bn: bool, context: DistributedContext) -> nn.Module:
    if not context.distributed:
        return model
    wrapped = model
    if sync_bn and context.device.type == "cuda":
        wrapped = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif sync_bn:
        warnings.warn("--sync-bn needs GPUs; using per-process BatchNorm", stacklevel=3)
    return nn.parallel.DistributedDataParallel(
        wrapped, device_ids=[context.device.index] if context.device.type == "cuda" else None)


def _prepare(config: TrainConfig, context: DistributedContext, resume: _Reference | None,
             train_set: COCODetection, val_set: COCODetection | None) -> _Run:
    """Model, data, loss, optimizer, schedule and monitors of the run."""
    from ..data.augment import TrainTransform
    from ..data.loading import TrainDataset

    data, optim, run = config.data, config.optim, config.run
    class_names = train_set.class_names
    model, model_config = _build_model(config, class_names, resume, context)
    train_dataset = TrainDataset(train_set, TrainTransform(min_box_size=data.min_box_size),
                                 input_size=data.input_size, mixup=data.mixup)
    iterations = len(build_train_loader(train_dataset, config, 0, context))
    iterations = iterations if run.max_iterations is None else min(iterations, run.max_iterations)
    if iterations == 0:
        raise TrainingError(f"{len(train_set)} training images give no full batch of {data.batch_size} per "
                            "process; lower --batch-size")
    criterion = build_criterion(model_config, ignore_threshold=optim.ignore_threshold,
                                label_smoothing=optim.label_smoothing).to(context.device)
    optimizer = _optimizer(model, config)
    amp_dtype, use_scaler = amp_settings(run.amp, context.device)
    metadata = {"class_names": class_names, "input_size": data.input_size, "variant": model_config.variant,
                "dataset": {"train_annotations": data.train_annotations, "train_images": len(train_set)}}
    options = EpochOptions(amp_dtype=amp_dtype, log_interval=run.log_interval,
                           grad_norm_interval=run.grad_norm_interval, freeze_batchnorm=run.freeze_bn,
                           clip_grad_norm=optim.clip_grad_norm, progress=run.progress,
                           channels_last=run.channels_last)
    if context.is_main:
        parameters = sum(p.numel() for p in model.parameters())
        logger.info("%s, %.2fM parameters, %d classes, %d training images, %d iterations/epoch x %d images x %d "
                    "processes, device %s", model_config.variant, parameters / 1e6, len(class_names),
                    len(train_set), iterations, data.batch_size, context.world_size, context.device)
    return _Run(config=config, context=context, out=Path(run.out), model=model,
                training_model=_distributed_model(model, run.sync_bn, context), model_config=model_config,
                train_dataset=train_dataset, val_set=val_set, criterion=criterion, optimizer=optimizer,
                schedule=LearningRateSchedule(optimizer, check_schedule(config), iterations),
                scaler=torch.amp.GradScaler("cuda") if use_scaler else None,
                ema=ModelEMA(model, optim.ema_decay) if optim.ema else None, amp_dtype=amp_dtype,
                log=ScalarLog(run.out, enabled=context.is_main),
                gradient_norms=GradientNormTracker(model) if run.grad_norm_interval > 0 else None,
                options=options, metadata=metadata, probe=weight_probe(data.min_size, context.device))


def _restore(run: _Run, resume: _Reference | None) -> int:
    """The first epoch to train: 0, or where the resumed run stopped (its state restored)."""
    start_epoch = 0
    if resume is not None:
        try:
            saved = {"training": resume.training, "model": resume.weights}
            start_epoch, run.state = restore_training_state(saved, run.model, optimizer=run.optimizer,
                                                            scaler=run.scaler, ema=run.ema)
        except (ValueError, RuntimeError) as error:
            raise TrainingError(f"cannot resume from {resume.source}: {error}") from None
        history = resume.training.get("history", {})
        for key in ("epochs", "metrics"):
            history[key] = [row for row in history.get(key, []) if row.get("epoch", 0) < start_epoch]
        run.history = history
        run.last_good = f"{resume.source} (the checkpoint this run resumed)"
        logger.info("resumed %s at epoch %d (step %d)", resume.source, start_epoch, run.state.global_step)
    if run.context.is_main:
        # An interrupted run logged the epoch it did not finish: those rows are logged again, once.
        for name in ("scalars.csv", "fusion_weights.csv", "gradient_norms.csv", "metrics.csv"):
            truncate_csv_epochs(run.out / name, start_epoch)
    run.best_ap = max((row.get("AP") or 0.0 for row in run.history.get("metrics", [])), default=-1.0)
    run.summary = {"checkpoint": str(run.out / "last.pt"), "best_ap": run.best_ap if run.best_ap >= 0 else None}
    return start_epoch


def _train_epoch(run: _Run, epoch: int) -> None:
    """One epoch: train, record, evaluate and save as scheduled."""
    config, context = run.config, run.context
    # Every source of randomness of this epoch depends on (seed, epoch, rank) only: exact resume.
    seed_everything(epoch_seed(config.run.seed, epoch, context.rank))
    set_dropblock(run.model, epoch, config.run.epochs)
    loader = build_train_loader(run.train_dataset, config, epoch, context)
    if config.run.max_iterations is not None:
        loader = LimitedLoader(loader, config.run.max_iterations)
    fusion_statistics = FusionWeightStatistics(run.model) if config.run.fusion_statistics else None
    if run.gradient_norms is not None:
        run.gradient_norms.reset()
    with fusion_statistics or contextlib.nullcontext():
        result = train_one_epoch(run.training_model, run.criterion, loader, run.optimizer, run.schedule, epoch,
                                 context=context, state=run.state, options=run.options, scaler=run.scaler,
                                 ema=run.ema, fusion_statistics=fusion_statistics if fusion_statistics and
                                 fusion_statistics.active else None,
                                 gradient_norms=run.gradient_norms if context.is_main else None, log=run.log,
                                 num_epochs=config.run.epochs)
    if fusion_statistics is not None and fusion_statistics.active:
        fusion_statistics.reduce()
    else:
        fusion_statistics = None
    _record_epoch(run, epoch, result, fusion_statistics)
    last_epoch = epoch == config.run.epochs - 1
    metrics = None
    eval_interval = config.run.eval_interval
    if run.val_set is not None and ((eval_interval > 0 and (epoch + 1) % eval_interval == 0) or last_epoch):
        metrics = _evaluate_epoch(run, epoch)
    if context.is_main and ((epoch + 1) % config.run.checkpoint_interval == 0 or last_epoch or metrics):
        _save(run, epoch, metrics, last_epoch)


def _record_epoch(run: _Run, epoch: int, result: dict, fusion_statistics: FusionWeightStatistics | None) -> None:
    if result.get("unreadable_images"):
        logger.warning("epoch %d: %d images could not be read and were replaced by others (e.g. %s)",
                       epoch, result["unreadable_images"], result.get("unreadable_example"))
    if result["steps"] == 0:
        raise NonFiniteLossError(f"epoch {epoch}: every step was skipped (non-finite losses); nothing of it is "
                                 "kept. Lower the learning rate or check the data.")
    run.history.setdefault("epochs", []).append(
        {"epoch": epoch, **{k: round(v, 5) for k, v in result.items() if isinstance(v, float)},
         "steps": result["steps"], "images": result["images"]})
    if run.context.is_main:
        if fusion_statistics is not None:
            append_csv(run.out / "fusion_weights.csv", fusion_statistics.rows(epoch))
        if run.gradient_norms is not None:
            append_csv(run.out / "gradient_norms.csv", run.gradient_norms.rows(epoch))
        logger.info("epoch %d: loss %.3f (anchor %.3f iou %.3f l1 %.3f obj %.3f cls %.3f), %.1f img/s",
                    epoch, result["total"], result["anchor"], result["iou"], result["l1"], result["obj"],
                    result["cls"], result["images"] / max(result["seconds"], 1e-9))
    run.summary["losses"] = {k: result[k] for k in ("anchor", "iou", "l1", "obj", "cls", "total")}


def _evaluate_epoch(run: _Run, epoch: int) -> dict:
    config = run.config
    eval_model = run.ema.module if run.ema is not None else run.model
    metrics = evaluate(eval_model, run.val_set, config.data.input_size, context=run.context,
                       batch_size=config.run.eval_batch_size, amp_dtype=run.amp_dtype, progress=config.run.progress)
    run.history.setdefault("metrics", []).append({"epoch": epoch, **metrics})
    run.summary["metrics"] = metrics
    if run.context.is_main:
        run.log.log(run.state.global_step, epoch, {f"val/{k}": v for k, v in metrics.items()})
        append_csv(run.out / "metrics.csv", [{"epoch": epoch, **{k: metrics[k] for k in METRIC_NAMES}}])
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))
    return metrics


def _save(run: _Run, epoch: int, metrics: dict | None, last_epoch: bool) -> None:
    """last.pt (every --checkpoint-interval epochs and at the end) and best.pt, after the weights are checked."""
    problem = unsound_weights(run.model, run.ema, run.probe)
    if problem:
        raise NonFiniteLossError(f"epoch {epoch}: {problem}; not saved, so no checkpoint holds them.")
    checkpoint = training_checkpoint(
        run.model, {**run.metadata, "epoch": epoch, "metrics": metrics}, optimizer=run.optimizer,
        schedule=run.schedule, epoch=epoch + 1, state=run.state, train_config=run.config.to_dict(),
        scaler=run.scaler, ema=run.ema, history=run.history)
    if (epoch + 1) % run.config.run.checkpoint_interval == 0 or last_epoch:
        save_training_checkpoint(run.out / "last.pt", checkpoint)
        run.last_good = f"{run.out / 'last.pt'} (epoch {epoch})"
    if metrics is not None and metrics["AP"] > run.best_ap:
        run.best_ap = metrics["AP"]
        run.summary["best_ap"] = run.best_ap
        save_training_checkpoint(run.out / "best.pt", checkpoint)
