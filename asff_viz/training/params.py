"""Parameters at the start of training: the official weight initialisation, the objectness prior and the
optimizer's parameter groups (weight decay on conv weights only)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import unwrap_model
from ..models.head import SLOTS


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
    set_objectness_bias(model, -math.log((1.0 - probability) / probability))


def set_objectness_bias(model: nn.Module, logit: float) -> None:
    """Set the objectness logit bias of every slot (`set_objectness_prior` in logit space, where priors too
    small for a float, e.g. 1e-12, stay exact)."""
    raw = unwrap_model(model)
    with torch.no_grad():
        for level in raw.head.levels:
            bias = level.predict.bias.view(SLOTS, -1)  # (slot, 5 + C) rows of the prediction conv
            bias[:, 4] = logit


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
