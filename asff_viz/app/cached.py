"""Cached calls into the public API, shared by every browser session of one server process.

- Models: `st.cache_resource`, one per (checkpoint path, content sha256, device). The model object is shared
  by all sessions and never modified: capture hooks are per call and per thread, so nothing of one session
  lives on it.
- Traces, gradient flows, attributions: `st.cache_data`, keyed by the image bytes' sha256, the checkpoint's
  sha256 and the settings. Changing a view, an opacity or a level reads the cache and never runs the model.

Functions take the keys as their hashed arguments and the big objects (image arrays) as `_`-prefixed
arguments, which Streamlit does not hash: the key already says which image they are.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import numpy as np
import streamlit as st

from .. import load_model
from ..checkpoint import file_sha256 as _file_sha256
from ..inference.transforms import decode_image as _decode_image
from ..inference.transforms import preprocess

# (kind, source level, target levels) of a fusion counterfactual, hashable (see `Counterfactual`);
# LEARNED is the model as trained.
CounterfactualKey = tuple[str, int | None, tuple[int, ...] | None]
LEARNED: CounterfactualKey = ("learned", None, None)


@st.cache_data(show_spinner=False, max_entries=64)
def file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a file, recomputed only when its modification time or size changes."""
    return _file_sha256(path)


@st.cache_resource(show_spinner=False, max_entries=4)
def model(path: str, sha256: str, device: str):
    """The model of a checkpoint, in eval mode, loaded once per (path, content, device)."""
    return load_model(path, device=device)


# Byte budgets: a trace holds its original image, so a few large uploads must not fill the memory.
@st.cache_data(show_spinner=False, max_entries=16, max_size="512MB")
def decode_image(image_key: str, name: str, _data: bytes) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3); raises `asff_viz.inference.transforms.ImageError` with a clear message."""
    return _decode_image(_data, name)


@st.cache_data(show_spinner=False, max_entries=16)
def display_image(image_key: str, _image: np.ndarray) -> str:
    """The image as the JPEG data URI the browser shows (downscaled for display), encoded once per image: the
    fusion explorer sends it on every run."""
    from .charts import _data_uri

    return _data_uri(_image)[0]


def counterfactual_object(key: CounterfactualKey):
    """`Counterfactual` for a key, or None for the learned weights."""
    from ..introspection import Counterfactual

    kind, source, levels = key
    return None if kind == "learned" else Counterfactual(kind, source, levels)


@st.cache_data(show_spinner=False, max_entries=48, max_size="1GB")
def timed_trace(image_key: str, weights: tuple[str, str], size: int, conf_threshold: float, nms_threshold: float,
                device: str, counterfactual: CounterfactualKey, _image: np.ndarray, image_name: str = "image"):
    """(`asff_viz.trace_image` of the image for (path, sha256) weights and the settings, seconds it took)."""
    from ..introspection import trace_image

    started = time.perf_counter()
    result = trace_image(model(*weights, device), _image, size=size, conf_threshold=conf_threshold,
                         nms_threshold=nms_threshold, counterfactual=counterfactual_object(counterfactual),
                         image_name=image_name)
    return result, time.perf_counter() - started


def trace(image_key: str, weights: tuple[str, str], size: int, conf_threshold: float, nms_threshold: float,
          device: str, counterfactual: CounterfactualKey, image: np.ndarray, image_name: str = "image"):
    """The cached trace alone (see `timed_trace`)."""
    return timed_trace(image_key, weights, size, conf_threshold, nms_threshold, device, counterfactual, image,
                       image_name)[0]


@st.cache_data(show_spinner=False, max_entries=16)
def gradient_flow(image_key: str, weights: tuple[str, str], size: int, device: str, objective: tuple,
                  counterfactual: CounterfactualKey, _image: np.ndarray, _ground_truth: np.ndarray | None = None):
    """`gradient_flow` for an objective key: ("score", row_index), ("sum",) or ("loss", annotations key).

    _ground_truth: (M, 5) [class, cx, cy, w, h] in input pixels (`ground_truth_labels`), for the loss objective
    and to mark positives and background; part of the key through the objective's annotations key.
    """
    from ..introspection import decomposition, objectives

    network = model(*weights, device)
    tensor, _ = preprocess(_image, size)
    kind = objective[0]
    if kind == "score":
        target = objectives.DetectionScore(int(objective[1]))
    elif kind == "sum":
        target = objectives.SumOfScores()
    else:
        target = objectives.TrainingLoss(_ground_truth)
    return decomposition.gradient_flow(network, tensor, target, counterfactual_object(counterfactual),
                                       ground_truth=_ground_truth)


@st.cache_data(show_spinner=False, max_entries=32)
def attribution(image_key: str, weights: tuple[str, str], size: int, device: str, row_index: int, method: str,
                _image: np.ndarray, steps: int = 16) -> list:
    """Attributions of a detection (its decoded row): a list of `Attribution` (one, or one per level).

    method: "integrated_gradients" (with `steps` interpolation steps), "saliency" or "grad_cam" (one per
    pyramid level).
    """
    from ..introspection import attribution as attributions

    network = model(*weights, device)
    tensor, _ = preprocess(_image, size)
    if method == "integrated_gradients":
        return [attributions.integrated_gradients(network, tensor, int(row_index), n_steps=int(steps))]
    if method == "saliency":
        return [attributions.saliency(network, tensor, int(row_index))]
    return attributions.grad_cam_per_level(network, tensor, int(row_index))


@st.cache_data(show_spinner=False, max_entries=32, max_size="256MB")
def detections_only(image_key: str, weights: tuple[str, str], size: int, conf_threshold: float,
                    nms_threshold: float, device: str, _image: np.ndarray):
    """`asff_viz.Detector` results for models without fusion weights (sum, concat, baseline)."""
    from ..inference.detector import Detector

    detector = Detector(model(*weights, device), device=device, size=size, conf_threshold=conf_threshold,
                        nms_threshold=nms_threshold)
    return detector(_image)


# ---------------------------------------------------------------------------------------------- exports


def figure_bytes(figure, file_format: str) -> bytes:
    """A matplotlib Figure (from `asff_viz.figures.traces`, never pyplot-managed) as PNG or PDF bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=file_format, dpi=150 if file_format == "png" else None, bbox_inches="tight")
    return buffer.getvalue()


def trace_npz_bytes(trace_object) -> bytes:
    """The trace as its `.npz` file (`Trace.save`), in memory."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.npz")
        trace_object.save(path)
        with open(path, "rb") as handle:
            return handle.read()


def detections_json(trace_object, image_name: str) -> str:
    """The trace's detections as JSON: boxes xyxy in original pixels, scores, classes, level, slot, cell."""
    rows = []
    for index, record in enumerate(trace_object.detections):
        rows.append({
            "index": index,
            "box_xyxy": [round(float(value), 2) for value in record.box_xyxy],
            "score": round(float(record.score), 5),
            "label": int(record.label),
            "class_name": record.class_name,
            "level": int(record.level),
            "stride": int(trace_object.strides[int(record.level)]),
            "slot": int(record.slot),
            "row": int(record.row),
            "col": int(record.col),
            "fusion_weights_here": [round(float(value), 5) for value in record.weights_here],
        })
    document = {"image": image_name, "metadata": _jsonable(trace_object.metadata), "detections": rows}
    return json.dumps(document, indent=1)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
