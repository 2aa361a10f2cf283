"""Exponential moving average of model weights (not in the official recipe; optional here).

Every floating-point entry of the state_dict (parameters and BatchNorm running statistics) is averaged;
integer buffers (`num_batches_tracked`) are copied. The decay ramps up as decay * (1 - exp(-updates / ramp)),
so the first updates follow the raw weights closely, as in YOLOX and timm.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..models.detector import unwrap_model


class ModelEMA:
    """Keeps `self.module`, an averaged copy of a model, in eval mode and without gradients."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp: float = 2000.0, updates: int = 0) -> None:
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = float(decay)
        self.ramp = float(ramp)
        self.updates = int(updates)

    def current_decay(self) -> float:
        return self.decay * (1.0 - math.exp(-self.updates / self.ramp))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        source = unwrap_model(model).state_dict()
        for name, average in self.module.state_dict().items():
            value = source[name].detach()
            if average.dtype.is_floating_point:
                average.mul_(decay).add_(value.to(average.dtype), alpha=1.0 - decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay, "ramp": self.ramp}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        self.decay = float(state.get("decay", self.decay))
        self.ramp = float(state.get("ramp", self.ramp))
