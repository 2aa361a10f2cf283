"""Reproducible, resumable training state: seeding (per run, epoch and rank), the RNG states, and the
training checkpoint (model, EMA, optimizer, scaler, RNG, step counters) with its restore."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_save, checkpoint_dict
from ..models import unwrap_model
from .ema import ModelEMA
from .schedule import LearningRateSchedule


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


@dataclass
class StepState:
    """Counters carried across epochs: optimizer steps done and the current run of non-finite losses."""

    global_step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
