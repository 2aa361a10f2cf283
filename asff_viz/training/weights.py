"""The model's weights in a run: its config against the checkpoint it starts from, initial weights (Darknet-53
backbone or a checkpoint, class outputs re-initialised for another class count), the DropBlock schedule, and
the check that weights are sound before they are saved."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..checkpoint import load_state_dict_strict
from ..models import unwrap_model
from ..models.config import ModelConfig
from ..models.head import SLOTS
from ..models.official import load_darknet_weights
from .config import TrainingError
from .ema import ModelEMA

logger = logging.getLogger(__name__)


OFFICIAL_DROPBLOCK = ((5, (1, 3, 5)), (80, (3, 5, 7)), (150, (7, 7, 7)))  # (epoch of 300, block sizes)


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


def resolve_model_config(requested: dict, num_classes: int, reference: ModelConfig | None, source: str | None
                         ) -> ModelConfig:
    """The model config: command-line fields over the reference checkpoint's, class count from the data.

    A requested architecture field that contradicts the checkpoint is an error (its weights would not fit).
    """
    if reference is None:
        try:
            return ModelConfig(**{**requested, "num_classes": num_classes})
        except ValueError as error:
            raise TrainingError(str(error)) from None
    base = reference.to_dict()
    for name, value in requested.items():
        if base[name] != value:
            raise TrainingError(f"--{name} {value} contradicts {source}, which holds a model with "
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
            old_channels, new_channels = tensor.shape[0] // SLOTS, target[name].shape[0] // SLOTS
            result = target[name].clone()
            for slot in range(SLOTS):
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


def load_backbone_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load backbone weights (keys without `backbone.`), checking every key and shape."""
    load_state_dict_strict(model.backbone, state_dict, source)
    logger.info("initialized the backbone from %s (%d tensors)", source, len(state_dict))


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
