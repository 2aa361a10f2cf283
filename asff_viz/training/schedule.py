"""The official YOLOv3-ASFF learning-rate schedule: 4th-power warm-up, flat phase, cosine, then a floor.

The learning rate is a pure function of (epoch, iteration), so resuming from a checkpoint only needs the
epoch counter, never a stored scheduler state.

Official values (300 + 1 epochs, `while epoch < epochs + 1`): burn-in 5 epochs, flat until epoch 20, cosine
from epoch 21 to epoch 270, 1e-5 for the last 30 epochs. Here `epochs` counts the epochs run (0 .. epochs-1),
so the official run is `epochs=301`. Two small simplifications: the flat phase uses the base rate itself (the
official code keeps the last warm-up value, base * (1 - 1/(5E))^4, which differs by < 1e-3 relative for
E >= 4000 iterations), and when cosine is off, the step schedule multiplies by 0.1 at each step epoch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class ScheduleConfig:
    """Learning-rate schedule settings (epochs count from 0)."""

    base_lr: float = 0.001
    epochs: int = 301
    burn_in_epochs: int = 5
    flat_until_epoch: int = 20  # the cosine starts after this epoch
    final_epochs: int = 30  # the last epochs run at min_lr (also the official no-mixup epochs)
    min_lr: float = 1e-5
    cosine: bool = True
    steps: tuple[int, ...] = (180, 240)  # used only when cosine is False

    def __post_init__(self) -> None:
        self.steps = tuple(int(s) for s in self.steps)
        if self.epochs < 1 or self.base_lr <= 0:
            raise ValueError(f"need epochs >= 1 and base_lr > 0, got {self.epochs}, {self.base_lr}")
        if self.burn_in_epochs < 0 or self.final_epochs < 0:
            raise ValueError("burn_in_epochs and final_epochs must be >= 0")
        if self.cosine and not (self.burn_in_epochs <= self.flat_until_epoch + 1 <= self.cosine_end_epoch + 1):
            raise ValueError(
                f"schedule does not fit in {self.epochs} epochs: need burn_in_epochs ({self.burn_in_epochs}) "
                f"<= flat_until_epoch + 1 ({self.flat_until_epoch + 1}) <= epochs - final_epochs "
                f"({self.epochs - self.final_epochs}); lower --burn-in/--flat-until/--final-epochs, or raise --epochs"
            )

    @property
    def cosine_end_epoch(self) -> int:
        """Last epoch of the cosine; the learning rate is min_lr after it."""
        return self.epochs - 1 - self.final_epochs


def learning_rate(config: ScheduleConfig, epoch: int, iteration: int, iterations_per_epoch: int) -> float:
    """Learning rate for `iteration` (0-based, within the epoch) of `epoch` (0-based)."""
    if epoch < config.burn_in_epochs:
        progress = (iteration + epoch * iterations_per_epoch) / (config.burn_in_epochs * max(iterations_per_epoch, 1))
        return config.base_lr * progress**4
    if not config.cosine:
        return config.base_lr * 0.1 ** sum(epoch >= step for step in config.steps)
    if epoch <= config.flat_until_epoch:
        return config.base_lr
    if epoch <= config.cosine_end_epoch:
        span = config.cosine_end_epoch - config.flat_until_epoch
        phase = (epoch - config.flat_until_epoch) / span
        return config.min_lr + 0.5 * (config.base_lr - config.min_lr) * (1 + math.cos(math.pi * phase))
    return config.min_lr


class LearningRateSchedule:
    """Sets the optimizer's learning rate each iteration from `learning_rate`.

    `state_dict` holds only the settings (for the record in checkpoints); the rate itself is recomputed.
    """

    def __init__(self, optimizer, config: ScheduleConfig, iterations_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.config = config
        self.iterations_per_epoch = int(iterations_per_epoch)

    def step(self, epoch: int, iteration: int) -> float:
        rate = learning_rate(self.config, epoch, iteration, self.iterations_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        return rate

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "iterations_per_epoch": self.iterations_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.config = ScheduleConfig(**state["config"])
        self.iterations_per_epoch = int(state["iterations_per_epoch"])
