"""argparse value types shared by the command-line tools: a bad flag value is refused before any work starts.

Each type raises `argparse.ArgumentTypeError`, so argparse prints one line (`error: argument --size: ...`) and
exits with status 2; no tool reaches a traceback or fails after minutes of work on a value it could have checked.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import torch


def _number(text: str, kind: type) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not (value == value and abs(value) != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _at_least(kind: type, minimum: float, strict: bool):
    """An argparse type: a number of `kind` that is > minimum (`strict`) or >= minimum."""
    def parse(text: str):
        value = _number(text, kind)
        if value < minimum or (strict and value == minimum):
            bound = f"more than {minimum:g}" if strict else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


positive_int = _at_least(int, 1, strict=False)
non_negative_int = _at_least(int, 0, strict=False)
positive_float = _at_least(float, 0.0, strict=True)
non_negative_float = _at_least(float, 0.0, strict=False)


def unit_interval(text: str) -> float:
    """A probability or threshold in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def input_size(text: str) -> int:
    """A square network input size: a positive multiple of 32 (the largest stride)."""
    value = _number(text, int)
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 32 (e.g. 320, 416, 608), got {value}")
    return value


def device(text: str) -> str:
    """`cpu`, `cuda` or `cuda:N`, refused when this machine does not have it."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def output_folder(text: str) -> str:
    """A folder that exists or can be created, and can be written: checked before the work, not after it."""
    problem = output_folder_problem(Path(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_folder_problem(path: Path) -> str | None:
    """Why results cannot be written under `path` (None when they can)."""
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder; pass a folder for the results"
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{path}: {existing} is a file, so the folder cannot be created there"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{path}: no permission to write in {existing}"
    return None


def output_file(text: str) -> str:
    """A file to write: not a folder, in a folder that exists or can be created and can be written."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; pass a file name (e.g. {path / 'model.pt'})")
    problem = output_folder_problem(path.parent)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def describe_os_error(error: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for a failed write or read: the file and the reason (disk full, permission denied, ...)."""
    target = path or error.filename or "file"
    reason = error.strerror or str(error)
    if getattr(error, "errno", None) == errno.ENOSPC:
        reason = "no space left on the device"
    return f"cannot write {target}: {reason}"


def cosine_value(text: str) -> float:
    """A cosine similarity threshold in [-1, 1]."""
    value = _number(text, float)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between -1 and 1, got {value}")
    return value
