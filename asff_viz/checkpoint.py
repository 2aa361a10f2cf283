"""Checkpoints: the project's own format, the official ASFF layout (explicit key remap), Darknet `.weights`.

Everything is read with `torch.load(..., weights_only=True)`: a file that needs arbitrary unpickling is refused,
never loaded another way.
"""

from __future__ import annotations

import hashlib
import os
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from .data.class_names import COCO_CLASSES
from .errors import CheckpointError, summarize_keys
from .models.config import ModelConfig
from .models.official import is_official_state_dict, remap_official_state_dict
from .utils.fileio import atomic_write

FORMAT_NAME = "asff_viz"
FORMAT_VERSION = 1
OFFICIAL_INPUT_SIZE = 608  # the Darknet-53 models' test size
OFFICIAL_MOBILE_INPUT_SIZE = 416  # the MobileNetV2 models' (`config/yolov3_mobile.cfg`)


# ---------------------------------------------------------------------------------------------- reading files


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike, missing_hint: str = "Check the path.") -> dict:
    """Load a checkpoint file safely (weights_only) into a dict, with a clear error for every bad file.

    `missing_hint` ends the message for a path that does not exist (e.g. how to use the embedded default).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file. Pass the .pt/.pth file in it.")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file. {missing_hint}".rstrip())
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted download or copy?). Fetch it again.")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: cannot be read: permission denied.")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a plain pickle
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  torch.load fails in many ways; the file itself says why
        raise CheckpointError(f"{path}: {diagnose_unloadable(path, error)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict or an asff_viz checkpoint), "
                              f"found {type(data).__name__}.")
    return data


# Top-level modules a plain-weights pickle may name: torch (tensor rebuilding, storages) and collections.
_WEIGHT_MODULES = ("torch", "collections")


def _pickle_globals(payload: bytes) -> list[str]:
    """The `module.name` globals a pickle would import, read from its opcodes without running it.

    Raises (ValueError and others, from pickletools) when the bytes are not a well-formed pickle.
    """
    names, strings = [], []
    for opcode, argument, _ in pickletools.genops(payload):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(argument)
        elif opcode.name in ("GLOBAL", "INST"):
            names.append(str(argument).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
    return names


def diagnose_unloadable(path: Path, error: BaseException | None = None) -> str:
    """Why `path` does not load as plain weights, read from the file's structure (not from torch's wording of
    the error, which changes between versions): it would import code, it is a plain pickle, a damaged or
    truncated archive, or not a checkpoint at all."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    payload, kind = None, None
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                members = [name for name in archive.namelist() if name.endswith("data.pkl")]
                if not members:
                    return ("a zip archive without torch.save's data.pkl: not a PyTorch checkpoint. Pass a file "
                            "written by torch.save.")
                payload, kind = archive.read(members[0]), "archive"
        except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError, ValueError):
            return "a damaged zip archive (truncated or corrupt). Fetch or save it again."
    elif head == b"PK":
        return "a truncated or damaged zip archive (an interrupted download or copy?). Fetch or save it again."
    elif head[:1] == b"\x80":
        payload, kind = path.read_bytes(), "pickle"
    if payload is None:
        return ("not a PyTorch checkpoint: neither torch.save's zip archive nor a pickle (random bytes, or "
                "another file format?). Pass a file written by torch.save.")
    try:
        names = _pickle_globals(payload)
    except Exception:  # noqa: BLE001  pickletools raises ValueError and others on damaged pickles
        return "a damaged pickle inside the checkpoint (truncated or corrupt). Fetch or save it again."
    foreign = sorted({name for name in names if name.split(".")[0] not in _WEIGHT_MODULES})
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        return (f"refused: loading it would import and run Python code ({shown}), not just read weights. "
                "Only weights are accepted; if you trust its origin, load it yourself and re-save its "
                "state_dict with torch.save.")
    if kind == "pickle":
        return ("a plain pickle, not torch.save's format: it cannot be read safely as weights. Save the "
                "state_dict with torch.save.")
    detail = _first_line(error) if error is not None else "unknown reason"
    return f"not a readable PyTorch checkpoint (truncated or corrupt?): {detail}. Fetch or save it again."


def check_finite(state_dict: dict, source: str = "checkpoint") -> None:
    """Refuse weights holding NaN or infinity (a diverged run): every result computed from them is meaningless."""
    bad = [key for key, value in state_dict.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise CheckpointError(f"{source}: {len(bad)} of {len(state_dict)} tensors hold NaN or infinite values "
                              f"({shown}); the weights are unusable (a diverged training run?). Use an earlier "
                              "checkpoint.")


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = _ANSI_ESCAPE.sub("", str(error)).strip().splitlines()
    line = text[0].split(". ")[0] if text else ""  # torch appends paragraphs of advice after the first sentence
    line = line if len(line) <= limit else line[:limit].rstrip() + "..."
    if not isinstance(error, (RuntimeError, OSError, ValueError)) or not line:
        line = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")



def strip_prefixes(state_dict: dict) -> dict:
    """Remove wrapper prefixes left by DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`)."""
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


# ---------------------------------------------------------------------------------------------- loading


def load_state_dict_strict(model: nn.Module, state_dict: dict, source: str = "checkpoint", assign: bool = True
                           ) -> None:
    """Load with every key and shape checked; the error names missing, unexpected and mismatched keys.

    With `assign=False` only the check is made (for a model on the `meta` device).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {summarize_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {summarize_keys(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, e.g. {'; '.join(mismatched[:3])}")
    if problems:
        name = model.config.variant if hasattr(model, "config") else type(model).__name__
        raise CheckpointError(f"{source}: does not fit the model ({name}): " + "; ".join(problems)
                              + ". Is it a checkpoint of another architecture or class count?")
    if assign:
        model.load_state_dict(state_dict, strict=True)


# The largest models a checkpoint's config may ask for: the official network is width 1, depth 1, 80 classes.
MAX_WIDTH, MAX_DEPTH, MAX_CLASSES = 2.0, 2.0, 10_000


def check_config_fits(config: ModelConfig, state_dict: dict, source: str = "checkpoint") -> None:
    """Check a checkpoint's config and weights against each other before any memory is spent on the model.

    The config's ranges are checked first; then the model is built on the `meta` device (shapes only, no
    storage) and its parameter names and shapes compared with the stored tensors, so a config that asks for a
    huge model, or weights of another model, is refused in milliseconds.
    """
    from .models import build_model

    if not (0 < config.width <= MAX_WIDTH and 0 < config.depth <= MAX_DEPTH
            and 0 < config.num_classes <= MAX_CLASSES):
        raise CheckpointError(f"{source}: its config asks for width {config.width}, depth {config.depth} and "
                              f"{config.num_classes} classes; at most width {MAX_WIDTH}, depth {MAX_DEPTH} and "
                              f"{MAX_CLASSES} classes are accepted (the official model is 1, 1, 80).")
    with torch.device("meta"):
        shapes = build_model(config)
    load_state_dict_strict(shapes, state_dict, source, assign=False)


def parse_checkpoint(data: dict, source: str = "checkpoint") -> tuple[ModelConfig, dict, dict]:
    """Split a loaded checkpoint into (config, state_dict, metadata), for both formats."""
    if data.get("format") == FORMAT_NAME:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{source}: asff_viz checkpoint format version {version}, this version reads "
                                  f"{FORMAT_VERSION}. Convert it with a matching asff_viz version.")
        try:
            config = ModelConfig.from_dict(dict(data["config"]))
            state_dict = data["model"]
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: malformed asff_viz checkpoint: {error}") from None
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise CheckpointError(f"{source}: malformed asff_viz checkpoint: `model` is not a dict of tensors.")
        metadata = dict(data.get("metadata") or {})
        metadata.setdefault("variant", config.variant)
        return config, strip_prefixes(state_dict), metadata
    for wrapper in ("state_dict", "model"):  # official state_dicts saved inside a small wrapper dict
        if isinstance(data.get(wrapper), dict) and is_official_state_dict(strip_prefixes(data[wrapper])):
            data = data[wrapper]
            break
    if is_official_state_dict(strip_prefixes(data)):
        try:
            config, state_dict = remap_official_state_dict(strip_prefixes(data))
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error}") from None
        class_names = list(COCO_CLASSES) if config.num_classes == 80 else [
            f"class_{i}" for i in range(config.num_classes)]
        size = OFFICIAL_MOBILE_INPUT_SIZE if config.backbone == "mobilenet_v2" else OFFICIAL_INPUT_SIZE
        metadata = {"class_names": class_names, "input_size": size, "variant": config.variant,
                    "origin": "official"}
        return config, state_dict, metadata
    keys = list(data)[:5]
    raise CheckpointError(f"{source}: neither an asff_viz checkpoint nor an official ASFF state_dict "
                          f"(first keys: {keys}). Pass a YOLOv3-ASFF checkpoint.")


DEFAULT_WEIGHTS_ENV = "ASFF_VIZ_DEFAULT_WEIGHTS"


def default_checkpoint_path() -> Path:
    """The embedded default model: the repository's `checkpoints/asff_synthetic.pt`.

    $ASFF_VIZ_DEFAULT_WEIGHTS overrides it (e.g. for a non-editable install, whose package folder has no
    `checkpoints/` next to it; then `./checkpoints/asff_synthetic.pt` is tried too).
    """
    override = os.environ.get(DEFAULT_WEIGHTS_ENV)
    if override:
        return Path(override).expanduser()
    shipped = Path(__file__).resolve().parent.parent / "checkpoints" / "asff_synthetic.pt"
    if not shipped.is_file() and (local := Path.cwd() / "checkpoints" / "asff_synthetic.pt").is_file():
        return local
    return shipped


def load_model(weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """A YOLOv3-ASFF model in eval mode, from an official or an asff_viz checkpoint.

    `weights=None` loads the embedded default (`checkpoints/asff_synthetic.pt`). The model's `metadata`
    holds class_names, input_size, variant, and the checkpoint path and sha256.
    """
    from .models import build_model  # local: keeps `import asff_viz.checkpoint` light for tools

    path = Path(weights) if weights is not None else default_checkpoint_path()
    if weights is None and not path.is_file():
        raise CheckpointError(f"the embedded default model {path} is missing from this installation; pass "
                              "weights=PATH (an official ASFF checkpoint or an asff_viz checkpoint), or set "
                              f"${DEFAULT_WEIGHTS_ENV} to a checkpoint.")
    hint = "Check the path, or omit it to use the embedded default model." if weights is not None else ""
    config, state_dict, metadata = parse_checkpoint(read_checkpoint(path, hint), str(path))
    check_finite(state_dict, str(path))
    check_config_fits(config, state_dict, str(path))  # every key and shape, before any memory is spent
    model = build_model(config)
    model.load_state_dict(state_dict, strict=True)
    metadata.update(checkpoint=str(path), sha256=file_sha256(path))
    metadata.setdefault("class_names", [f"class_{i}" for i in range(config.num_classes)])
    metadata.setdefault("input_size", OFFICIAL_INPUT_SIZE)
    size = metadata["input_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 32 or size % 32:
        raise CheckpointError(f"{path}: its stored input size {size!r} is not a positive multiple of 32; the "
                              "file is damaged or was edited. Re-save it with a valid metadata['input_size'].")
    if not isinstance(metadata["class_names"], (list, tuple)) or not all(
            isinstance(name, str) for name in metadata["class_names"]):
        raise CheckpointError(f"{path}: its stored class names are not a list of strings.")
    if len(metadata["class_names"]) != config.num_classes:
        raise CheckpointError(f"{path}: metadata names {len(metadata['class_names'])} classes but the model "
                              f"predicts {config.num_classes}.")
    model.metadata = metadata
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- writing


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: never a half-written file."""
    atomic_write(path, lambda stream: torch.save(obj, stream))


def checkpoint_dict(model: nn.Module, metadata: dict | None = None, **extra) -> dict:
    """The asff_viz checkpoint of `model`: plain dicts and tensors only, loadable with weights_only=True."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
            "model": state_dict, "metadata": dict(metadata or {}), **extra}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: dict | None = None, **extra) -> None:
    """Write `model` (+ metadata and any extra plain-data entries) as an asff_viz checkpoint, atomically."""
    atomic_save(checkpoint_dict(model, metadata, **extra), path)


def convert_official(source: str | os.PathLike, destination: str | os.PathLike,
                     class_names: list[str] | None = None, input_size: int | None = None) -> dict:
    """Rewrite an official checkpoint in the asff_viz format. Returns the metadata written."""
    from .models import build_model

    config, state_dict, metadata = parse_checkpoint(read_checkpoint(source), str(source))
    check_finite(state_dict, str(source))
    if metadata.get("origin") != "official":
        raise CheckpointError(f"{source}: already an asff_viz checkpoint; nothing to convert.")
    model = build_model(config)
    load_state_dict_strict(model, state_dict, str(source))
    if class_names is not None:
        if len(class_names) != config.num_classes:
            raise CheckpointError(f"{source}: the model predicts {config.num_classes} classes but "
                                  f"{len(class_names)} class names were given; pass one name per class.")
        metadata["class_names"] = [str(name) for name in class_names]
    if input_size is not None:
        if int(input_size) <= 0 or int(input_size) % 32:
            raise CheckpointError(f"input size must be a positive multiple of 32, got {input_size}")
        metadata["input_size"] = int(input_size)
    metadata["converted_from"] = {"file": Path(source).name, "sha256": file_sha256(source)}
    save_checkpoint(destination, model, metadata)
    return metadata
