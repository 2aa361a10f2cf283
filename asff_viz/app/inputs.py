"""Sidebar controls: which image, which weights, which settings. Each `*_ui()` draws its controls and returns a
small value object; reading files goes through the public API (`asff_viz.inference.transforms`, `asff_viz.load_model`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from ..checkpoint import default_checkpoint_path
from ..inference.transforms import IMAGE_SUFFIXES
from ..samples import (
    AnnotationError,
    SampleAnnotations,
    annotations_from_coco,
    list_samples,
    sample_annotations,
    sample_path,
)
from . import cached

IMAGE_SOURCES = ("Sample", "Upload", "Server path")
WEIGHT_SOURCES = ("Embedded default", "checkpoints/ folder", "Path", "Upload")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Uploads larger than this are refused by the uploader itself, before any bytes are decoded.
MAX_IMAGE_UPLOAD_MB = 50
MAX_CHECKPOINT_UPLOAD_MB = 1024
UPLOAD_CACHE_FILES = 8  # uploaded checkpoints kept on disk (the most recently used)
INPUT_SIZES = tuple(range(128, 1024 + 1, 32))


@dataclass(frozen=True)
class ImageChoice:
    """The chosen image: its bytes' key (sha256), a display name and its ground truth when it has any.

    `data` holds the encoded file; the decoded RGB uint8 (H, W, 3) array comes from `cached.decode_image`.
    """

    key: str
    name: str
    data: bytes
    annotations: SampleAnnotations | None


@dataclass(frozen=True)
class WeightsChoice:
    """A checkpoint file on the server and its content hash (the model cache key)."""

    path: str
    sha256: str
    label: str


@dataclass(frozen=True)
class Settings:
    """Inference settings: input size (pixels, multiple of 32), thresholds and device."""

    size: int
    conf_threshold: float
    nms_threshold: float
    device: str


class InputError(ValueError):
    """A choice in the sidebar that cannot be used; the message says what to do."""


SERVER_ROOT_ENV = "ASFF_VIZ_SERVER_ROOT"


def server_root() -> Path:
    """The folder whose files the app may read by server path: $ASFF_VIZ_SERVER_ROOT, else the folder the app
    was started from. Anyone who reaches the app can type a path, so nothing outside it is opened."""
    return Path(os.environ.get(SERVER_ROOT_ENV) or Path.cwd()).expanduser().resolve()


def _server_path(text: str) -> tuple[Path, Path]:
    """(the typed path, its resolved form), refused (InputError) when it is outside `server_root()`."""
    root = server_root()
    path = Path(text).expanduser()
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not resolved.is_relative_to(root):
        raise InputError(f"{path}: outside {root}, the folder this app may read. Upload the file instead, or "
                         f"start the app with {SERVER_ROOT_ENV} set to a folder that holds it.")
    return path, resolved


def server_file(text: str, what: str) -> Path:
    """A typed server path -> the file, refused (InputError) when it is outside `server_root()` or missing."""
    path, resolved = _server_path(text)
    if not resolved.is_file():
        raise InputError(f"{path}: no such {what} on the server. Check the path.")
    return resolved


def server_folder(text: str) -> Path:
    """A typed server folder -> the folder, refused (InputError) outside `server_root()` or when missing."""
    path, resolved = _server_path(text)
    if not resolved.is_dir():
        raise InputError(f"{path}: no such folder on the server. Check the path.")
    return resolved


def checkpoints_folder() -> Path:
    return default_checkpoint_path().parent


def list_checkpoints() -> list[Path]:
    """Checkpoint files under the repository's `checkpoints/` folder (recursively), sorted by path."""
    folder = checkpoints_folder()
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES)


def pretty_sample_name(name: str) -> str:
    return Path(name).stem.replace("_", " ")


# ---------------------------------------------------------------------------------------------- image


def image_ui() -> ImageChoice | None:
    """Image source controls; returns the chosen image, or None (with a message shown) when there is none yet."""
    source = st.radio("Image source", IMAGE_SOURCES, key="image_source", horizontal=True,
                      help="A bundled sample (with ground truth), a file from your computer, or a file on the "
                           "machine that runs the app.")
    if source == "Sample":
        samples = list_samples()
        if not samples:
            raise InputError("No bundled sample images are installed; upload an image instead.")
        name = st.selectbox("Sample image", samples, key="sample_name", format_func=pretty_sample_name,
                            help="Synthetic shapes images that ship with the project, with their annotations.")
        path = sample_path(name)
        data = path.read_bytes()
        return ImageChoice(hashlib.sha256(data).hexdigest(), name, data, sample_annotations(name))
    if source == "Upload":
        upload = st.file_uploader(
            "Upload an image", type=[suffix.lstrip(".") for suffix in IMAGE_SUFFIXES], key="image_upload",
            max_upload_size=MAX_IMAGE_UPLOAD_MB,
            help="JPEG, PNG, BMP, WebP or TIFF. Grayscale, RGBA and 16-bit images are converted to 8-bit RGB "
                 "and EXIF orientation is applied.")
        if upload is None:
            st.info("Upload an image to analyse it.")
            return None
        data = upload.getvalue()
        return ImageChoice(hashlib.sha256(data).hexdigest(), upload.name, data, ground_truth_ui(upload.name))
    text = st.text_input("Image path on the server", key="image_path", placeholder="/data/images/0001.jpg",
                         help="A file under the folder the app was started from (or $ASFF_VIZ_SERVER_ROOT), on the "
                              "machine that runs the app.").strip()
    if not text:
        st.info("Type the path of an image on the server.")
        return None
    path = server_file(text, "image file")
    size = path.stat().st_size
    if size > MAX_IMAGE_UPLOAD_MB * 1024 * 1024:
        raise InputError(f"{path}: {size / 2**20:.0f} MB, more than the {MAX_IMAGE_UPLOAD_MB} MB this app reads; "
                         "downscale it first.")
    data = path.read_bytes()
    return ImageChoice(hashlib.sha256(data).hexdigest(), path.name, data, ground_truth_ui(path.name))


def ground_truth_ui(image_name: str) -> SampleAnnotations | None:
    """An optional COCO-style annotation file for the chosen image (for the loss objective of the gradient flow)."""
    upload = st.file_uploader("Ground truth (optional)", type=["json"], key="annotations_upload", max_upload_size=50,
                              help="COCO-style JSON (images, categories, annotations with bbox [x, y, w, h]) that "
                                   "lists this image by file name, or lists one image only. Enables the training-"
                                   "loss objective of the gradient-flow view.")
    if upload is None:
        return None
    try:
        document = json.loads(upload.getvalue())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{upload.name}: not a JSON file ({error}).") from None
    if not isinstance(document, dict):
        raise InputError(f"{upload.name}: expected a COCO-style JSON object, found a {type(document).__name__}.")
    try:
        annotations = annotations_from_coco(document, image_name, upload.name)
    except AnnotationError as error:
        raise InputError(str(error)) from None
    if annotations is None:
        st.caption(f"{upload.name} lists no image named {image_name}: no ground truth for it.")
    else:
        st.caption(f"Ground truth: {len(annotations.class_indices)} boxes.")
    return annotations


# ---------------------------------------------------------------------------------------------- weights


def weights_ui(key_prefix: str = "", label: str = "Weights", default_source: str = WEIGHT_SOURCES[0],
               avoid: str | None = None) -> WeightsChoice | None:
    """Weights source controls; returns the chosen checkpoint, or None when none is chosen yet.

    `key_prefix` separates the widgets of a second weights choice (the comparison) from the main one; the
    checkpoints/ list then starts with a file other than `avoid` (the first choice's path).
    """
    source = st.radio(label, WEIGHT_SOURCES, key=f"{key_prefix}weights_source",
                      index=WEIGHT_SOURCES.index(default_source), horizontal=bool(key_prefix),
                      help="The embedded default model; a checkpoint in the repository's checkpoints/ folder; an "
                           "official ASFF checkpoint or an asff_viz checkpoint by server path or upload.")
    if source == "Embedded default":
        path = default_checkpoint_path()
        if not path.is_file():
            raise InputError(f"The embedded default model {path.name} is not installed in checkpoints/. Choose "
                             "another checkpoint (official or asff_viz) by path or upload.")
        return _weights_from_path(path, "embedded default")
    if source == "checkpoints/ folder":
        found = list_checkpoints()
        if not found:
            raise InputError(f"No checkpoint files (*.pt, *.pth) under {checkpoints_folder()}.")
        folder = checkpoints_folder()
        if avoid is not None:  # the other checkpoint first: comparing a model with itself is not a default
            found = sorted(found, key=lambda path: str(path) == str(avoid))
        choice = st.selectbox("Checkpoint", found, key=f"{key_prefix}weights_file",
                              format_func=lambda path: str(path.relative_to(folder)),
                              help="Every .pt/.pth file under checkpoints/.")
        return _weights_from_path(choice, str(choice.relative_to(folder)))
    if source == "Path":
        text = st.text_input("Checkpoint path on the server", key=f"{key_prefix}weights_path",
                             placeholder="/models/yolov3_asff.pth",
                             help="An official ASFF checkpoint (.pth) or an asff_viz checkpoint (.pt).").strip()
        if not text:
            st.info("Type the path of a checkpoint on the server.")
            return None
        path = server_file(text, "checkpoint file")
        return _weights_from_path(path, path.name)
    upload = st.file_uploader("Upload a checkpoint", type=[s.lstrip(".") for s in CHECKPOINT_SUFFIXES],
                              key=f"{key_prefix}weights_upload", max_upload_size=MAX_CHECKPOINT_UPLOAD_MB,
                              help="Loaded with torch.load(weights_only=True): files that need arbitrary "
                                   "unpickling are refused.")
    if upload is None:
        st.info("Upload a checkpoint file.")
        return None
    data = upload.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    # load_model reads a path: keep one copy per content hash, so sessions uploading the same file share it.
    path = store_upload(Path(tempfile.gettempdir()) / "asff_viz_uploads", data, digest,
                        Path(upload.name).suffix or ".pt")
    return WeightsChoice(str(path), digest, upload.name)


def store_upload(folder: Path, data: bytes, digest: str, suffix: str, keep: int = UPLOAD_CACHE_FILES) -> Path:
    """Write `data` once as folder/<digest><suffix> and keep only the `keep` most recently used uploads."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}{suffix}"
    if path.is_file():
        path.touch()  # used again: the newest
    else:
        partial = path.with_suffix(path.suffix + f".{os.getpid()}.part")
        partial.write_bytes(data)
        partial.replace(path)
    others = [p for p in folder.iterdir() if p.is_file() and p != path and not p.name.endswith(".part")]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in others[max(keep - 1, 0):]:
        stale.unlink(missing_ok=True)  # a model already loaded from it stays in the resource cache
    return path


def _weights_from_path(path: Path, label: str) -> WeightsChoice:
    stat = path.stat()
    digest = cached.file_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return WeightsChoice(str(path.resolve()), digest, label)


# ---------------------------------------------------------------------------------------------- settings


def available_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def initial(key: str, value: Any, valid: Any = None) -> Any:
    """The default to give a keyed widget: always `value` (dropping a stored state that is not in `valid`).

    Defaults go through the widget's own parameter, the same on every run, never through
    `st.session_state[key] = ...` before it: a rerun that interrupts the first run (a click while the page
    loads) can lose such a value, and a default that changes between runs lets the browser reset the widget
    to it.
    """
    if valid is not None and key in st.session_state and st.session_state[key] not in valid:
        del st.session_state[key]
    return value


def settings_ui(default_size: int, device: str) -> Settings:
    """Input size and thresholds (and the chosen device); the size starts at the model's own input size."""
    default_size = min(INPUT_SIZES, key=lambda size: abs(size - default_size))
    size = st.select_slider("Input size", options=INPUT_SIZES, key="input_size",
                            value=initial("input_size", default_size, INPUT_SIZES),
                            help="The image is resized to this square size (a multiple of 32) before the model. "
                                 "Larger sizes find smaller objects and take longer.")
    conf = st.slider("Confidence threshold", 0.01, 0.95, 0.25, 0.01, key="conf_threshold",
                     help="Keep detections whose score (objectness x class probability) is at least this.")
    nms = st.slider("NMS IoU threshold", 0.1, 0.95, 0.65, 0.05, key="nms_threshold",
                    help="Two boxes of one class overlapping more than this are one object: the weaker goes.")
    return Settings(int(size), float(conf), float(nms), device)


def device_ui() -> str:
    """Where the model runs: the CPU or one of the accelerators this machine has."""
    return str(st.selectbox("Device", available_devices(), key="device",
                            help="Where the model runs. Each device holds its own copy of the model."))
