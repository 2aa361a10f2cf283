"""A trace of one image through YOLOv3-ASFF: fusion weights, detections with their provenance, the transform.

`trace_image(model, image)` runs pre-processing, one captured forward, decoding and NMS, and returns a
`Trace` that holds everything a figure needs, in numpy, so that figures can be rebuilt without the model:
`trace.save("x.npz")` writes a single `.npz` (arrays plus a JSON header with the checkpoint hash, the
image, the size and the library versions) and `Trace.load("x.npz")` reads it back.

Every map is on the model's input grid; `trace.transform` (an `ImageTransform`: a plain square resize, no
letterbox) places it exactly on the original image (`trace.weights_on_original(level)`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..inference.postprocess import postprocess, row_location
from ..inference.transforms import ImageTransform, preprocess, read_image
from ..utils.fileio import atomic_write
from .capture import LEVEL_NAMES, Counterfactual, as_counterfactual, capture, has_fusion_weights

TRACE_FORMAT, TRACE_FORMAT_VERSION = "asff_viz.trace", 1
DEFAULT_INPUT_SIZE = 416


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and what to do."""


@dataclass
class DetectionRecord:
    """One detection after NMS, with the place in the network that produced it.

    box_xyxy: (4,) x1, y1, x2, y2 in original image pixels; box_input_xyxy: the same in input pixels.
    score: objectness x class probability (the value NMS ranked); label: class index; class_name.
    row_index: the row of the decoded (N, 5 + C) tensor; level (0 = stride 32), slot (3 = anchor-free),
    row, col: the cell of that level that predicted it.
    weights_here: (3,) the fusion weights of `level` at (row, col), source 0 (stride 32) first.
    weights_other_levels: (3, 3) row l = the fusion weights of level l at the cell covering the centre of the
        producing cell (row `level` equals weights_here); cells_other_levels: (3, 2) those cells (row, col).
    """

    box_xyxy: np.ndarray
    score: float
    label: int
    class_name: str
    level: int
    slot: int
    row: int
    col: int
    weights_here: np.ndarray
    weights_other_levels: np.ndarray
    cells_other_levels: np.ndarray
    row_index: int
    objectness: float = float("nan")
    class_confidence: float = float("nan")
    box_input_xyxy: np.ndarray = field(default_factory=lambda: np.full(4, np.nan))

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES[self.level]

    @property
    def dominant_source(self) -> int:
        """The source level with the largest fusion weight at the producing cell."""
        return int(np.argmax(self.weights_here))

    def to_dict(self) -> dict:
        data = {}
        for name, value in self.__dict__.items():
            data[name] = value.tolist() if isinstance(value, np.ndarray) else value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DetectionRecord:
        arrays = {"box_xyxy": np.float64, "weights_here": np.float32, "weights_other_levels": np.float32,
                  "cells_other_levels": np.int64, "box_input_xyxy": np.float64}
        values = {name: (np.asarray(value, dtype=arrays[name]) if name in arrays else value)
                  for name, value in data.items()}
        return cls(**values)


@dataclass
class Trace:
    """Everything observed for one image; numpy only, so it outlives the model.

    image: (H, W, 3) RGB uint8 original image. transform: the input <-> original geometry.
    fusion_weights: 3 float32 arrays (3, H_l, W_l), level 0 (stride 32) first, channel k = source level k;
        the weights the fusion used (a counterfactual's, if one was set).
    learned_weights: the model's own weights when a counterfactual replaced them, else None.
    decoded: (N, 5 + C) float32 rows cx, cy, w, h (input pixels), objectness, class probabilities.
    detections: `DetectionRecord`s after NMS, by decreasing score. class_names: per class index.
    metadata: checkpoint and sha256, variant, size, image name, strides, thresholds, counterfactual, versions.
    resized_maps[l][k], fused_maps[l]: (H_l, W_l) root-mean-square over channels of R_{k->l}(x^k) and of the
        fused map, when traced with keep_maps. raw_predictions[l] (4, 5 + C, H_l, W_l) and
        raw_anchor_logwh[l] (4, 2, H_l, W_l): the model's raw outputs, when traced with keep_maps.
    """

    image: np.ndarray
    transform: ImageTransform
    fusion_weights: list
    decoded: np.ndarray
    detections: list
    class_names: list
    metadata: dict
    learned_weights: list | None = None
    resized_maps: list | None = None
    fused_maps: list | None = None
    raw_predictions: list | None = None
    raw_anchor_logwh: list | None = None

    # ----------------------------------------------------------------------------------------- geometry

    @property
    def size(self) -> int:
        return self.transform.size

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.metadata.get("strides") or (self.size // w.shape[1] for w in self.fusion_weights))

    @property
    def grid_sizes(self) -> list[tuple[int, int]]:
        return [(int(w.shape[1]), int(w.shape[2])) for w in self.fusion_weights]

    @property
    def counterfactual(self) -> Counterfactual:
        return Counterfactual.from_dict(self.metadata.get("counterfactual"))

    def weights_on_original(self, level: int, interpolation: str = "nearest") -> np.ndarray:
        """(3, H, W) fusion weights of `level` over the original image (nearest: sharp cells, exact edges)."""
        return self.transform.map_to_original(self.fusion_weights[level], interpolation)

    def entropy(self, level: int) -> np.ndarray:
        """(H_l, W_l) entropy of the fusion weights in units of log 3: 0 = one source, 1 = all equal."""
        return fusion_entropy(self.fusion_weights[level])

    def cells_at(self, x: float, y: float, original: bool = True) -> np.ndarray:
        """(3, 2) the (row, col) of each level's cell covering point (x, y) (original pixels by default)."""
        if original:
            x, y = self.transform.points_to_input(x, y)
        return cells_covering(x, y, self.strides, self.grid_sizes)

    def weights_at(self, x: float, y: float, original: bool = True) -> np.ndarray:
        """(3, 3) fusion weights at point (x, y): row = target level, column = source level."""
        cells = self.cells_at(x, y, original)
        return np.stack([self.fusion_weights[level][:, r, c] for level, (r, c) in enumerate(cells)])

    # ----------------------------------------------------------------------------------------- files

    def header(self) -> dict:
        return {
            "format": TRACE_FORMAT, "format_version": TRACE_FORMAT_VERSION,
            "transform": self.transform.to_dict(), "class_names": list(self.class_names),
            "metadata": self.metadata, "detections": [record.to_dict() for record in self.detections],
        }

    def save(self, path: str | os.PathLike, *, compressed: bool = True, durable: bool = True) -> Path:
        """Write the trace to one `.npz` file (atomically). Returns the path.

        compressed=False and durable=False (no fsync, `atomic_write`) are for cache entries, which are checked
        when read and rebuilt when damaged."""
        path = Path(path)
        arrays = {"header": np.frombuffer(json.dumps(self.header()).encode("utf-8"), dtype=np.uint8),
                  "image": self.image, "decoded": self.decoded}
        for level in range(3):
            arrays[f"fusion_weights_{level}"] = self.fusion_weights[level]
            if self.learned_weights is not None:
                arrays[f"learned_weights_{level}"] = self.learned_weights[level]
            if self.fused_maps is not None:
                arrays[f"fused_map_{level}"] = self.fused_maps[level]
            if self.resized_maps is not None:
                for source in range(3):
                    arrays[f"resized_map_{level}_{source}"] = self.resized_maps[level][source]
            if self.raw_predictions is not None:
                arrays[f"raw_prediction_{level}"] = self.raw_predictions[level]
                arrays[f"raw_anchor_logwh_{level}"] = self.raw_anchor_logwh[level]
        write = np.savez_compressed if compressed else np.savez
        return atomic_write(path, lambda stream: write(stream, **arrays), durable=durable)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace written by `save`; TraceError names the file when it is missing or not a trace."""
        path = Path(path)
        if not path.is_file():
            raise TraceError(f"{path}: no such trace file. Write one with Trace.save (or trace_image(...).save).")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError) as error:
            raise TraceError(f"{path}: not a readable .npz trace ({error}). Save the trace again.") from None
        if "header" not in arrays:
            raise TraceError(f"{path}: an .npz without a trace header; not written by Trace.save.")
        try:
            header = json.loads(arrays["header"].tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TraceError(f"{path}: corrupt trace header ({error}). Save the trace again.") from None
        if header.get("format") != TRACE_FORMAT:
            raise TraceError(f"{path}: not an asff_viz trace (format {header.get('format')!r}).")
        if header.get("format_version") != TRACE_FORMAT_VERSION:
            raise TraceError(f"{path}: trace format version {header.get('format_version')}, this version reads "
                             f"{TRACE_FORMAT_VERSION}; rebuild the trace with this asff_viz version.")
        missing = [name for name in ("image", "decoded", *(f"fusion_weights_{l}" for l in range(3)))
                   if name not in arrays]
        if missing:
            raise TraceError(f"{path}: trace lacks arrays {missing}; the file is incomplete. Save it again.")

        def levels(prefix: str) -> list | None:
            if f"{prefix}_0" not in arrays:
                return None
            return [arrays[f"{prefix}_{level}"] for level in range(3)]

        resized = None
        if "resized_map_0_0" in arrays:
            resized = [[arrays[f"resized_map_{l}_{k}"] for k in range(3)] for l in range(3)]
        return cls(
            image=arrays["image"], transform=ImageTransform(**header["transform"]),
            fusion_weights=levels("fusion_weights"), decoded=arrays["decoded"],
            detections=[DetectionRecord.from_dict(record) for record in header["detections"]],
            class_names=list(header["class_names"]), metadata=header["metadata"],
            learned_weights=levels("learned_weights"), resized_maps=resized, fused_maps=levels("fused_map"),
            raw_predictions=levels("raw_prediction"), raw_anchor_logwh=levels("raw_anchor_logwh"),
        )


# --------------------------------------------------------------------------------------------- helpers


def fusion_entropy(weights: np.ndarray) -> np.ndarray:
    """(3, H, W) weights -> (H, W) entropy / log(3), in [0, 1]: 0 = fully decided, 1 = uniform."""
    weights = np.asarray(weights, dtype=np.float64)
    terms = np.where(weights > 0, weights * np.log(np.clip(weights, 1e-300, None)), 0.0)
    return np.clip(-terms.sum(axis=0) / math.log(weights.shape[0]), 0.0, 1.0).astype(np.float32)


def cells_covering(x: float, y: float, strides, grid_sizes) -> np.ndarray:
    """(L, 2) (row, col) of the cell of each level covering input-pixel point (x, y), clamped to the grid."""
    cells = []
    for stride, (height, width) in zip(strides, grid_sizes, strict=True):
        cells.append((min(max(int(math.floor(y / stride)), 0), height - 1),
                      min(max(int(math.floor(x / stride)), 0), width - 1)))
    return np.asarray(cells, dtype=np.int64)


@functools.cache
def library_versions() -> dict:
    """Versions of what computed a trace; captum's from its metadata (importing it would cost a trace its time)."""
    from importlib.metadata import PackageNotFoundError, version

    import cv2

    from .. import __version__
    try:
        captum_version = version("captum")
    except PackageNotFoundError:
        captum_version = None
    return {"asff_viz": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "captum": captum_version, "python": platform.python_version()}


def _channel_rms(tensor: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W) float32 root mean square over channels."""
    return tensor.detach().float().pow(2).mean(dim=0).sqrt().cpu().numpy()


def detection_records(detections, fusion_weights: list, strides, transform: ImageTransform,
                      class_names: list) -> list[DetectionRecord]:
    """`Detections` of one image (boxes in input pixels) -> DetectionRecords with their cell and weights.

    fusion_weights: 3 arrays (3, H_l, W_l). The producing cell comes from `row_location` of each kept row.
    """
    grid_sizes = [(int(w.shape[1]), int(w.shape[2])) for w in fusion_weights]
    records = []
    boxes_input = detections.boxes.detach().cpu().double().numpy()
    boxes_original = transform.boxes_to_original(boxes_input)
    for i in range(len(detections)):
        location = row_location(int(detections.indices[i]), grid_sizes)
        stride = strides[location.level]
        cells = cells_covering((location.col + 0.5) * stride, (location.row + 0.5) * stride, strides, grid_sizes)
        label = int(detections.labels[i])
        records.append(DetectionRecord(
            box_xyxy=np.asarray(boxes_original[i], dtype=np.float64),
            score=float(detections.scores[i]), label=label,
            class_name=class_names[label] if label < len(class_names) else f"class_{label}",
            level=location.level, slot=location.slot, row=location.row, col=location.col,
            weights_here=np.asarray(fusion_weights[location.level][:, location.row, location.col], np.float32),
            weights_other_levels=np.stack([fusion_weights[l][:, r, c] for l, (r, c) in enumerate(cells)]
                                          ).astype(np.float32),
            cells_other_levels=cells, row_index=int(detections.indices[i]),
            objectness=float(detections.objectness[i]), class_confidence=float(detections.class_confidence[i]),
            box_input_xyxy=np.asarray(boxes_input[i], dtype=np.float64),
        ))
    return records


def trace_image(model: nn.Module, image_rgb, *, size: int | None = None, conf_threshold: float = 0.01,
                nms_threshold: float = 0.65, counterfactual: Counterfactual | str | dict | None = None,
                keep_maps: bool = False, image_name: str | None = None) -> Trace:
    """Run `model` on one image and trace it.

    Args:
        model: a YOLOv3-ASFF model with ASFF fusion (eval mode is expected; the mode is not changed, since the
            model may be shared).
        image_rgb: (H, W, 3) RGB uint8 array, or a path to an image file.
        size: the square input size (multiple of 32); default `model.metadata["input_size"]`, else 416.
        conf_threshold, nms_threshold: as `asff_viz.inference.postprocess.postprocess`.
        counterfactual: replace the learned fusion weights (see `Counterfactual`); recorded in the metadata.
        keep_maps: also keep channel-RMS maps of the resized sources and fused maps, and the raw predictions.
        image_name: stored in the metadata (defaults to the file name when a path is given).
    Returns:
        a `Trace`.
    """
    if isinstance(image_rgb, (str, os.PathLike)):
        image_name = image_name or Path(image_rgb).name
        image_rgb = read_image(image_rgb)
    image_rgb = np.ascontiguousarray(image_rgb)
    size = traced_size(model, size)
    tensor, transform = preprocess(image_rgb, size)
    [trace] = trace_batch(model, tensor.unsqueeze(0), [transform], image_shapes=[image_rgb.shape],
                          image_names=[image_name], conf_threshold=conf_threshold, nms_threshold=nms_threshold,
                          counterfactual=counterfactual, keep_maps=keep_maps, light=False)
    trace.image = image_rgb
    return trace


def traced_size(model: nn.Module, size: int | None) -> int:
    """The input size a trace uses: `size`, else the checkpoint's, else 416."""
    return int(size or (getattr(model, "metadata", None) or {}).get("input_size") or DEFAULT_INPUT_SIZE)


def trace_batch(model: nn.Module, batch: torch.Tensor, transforms: list, *, image_shapes: list,
                image_names: list, conf_threshold: float = 0.01, nms_threshold: float = 0.65,
                counterfactual: Counterfactual | str | dict | None = None, keep_maps: bool = False,
                light: bool = True) -> list[Trace]:
    """Trace a batch of preprocessed images in one captured forward (what dataset statistics run).

    batch: (B, 3, S, S) normalized images (`preprocess`); transforms, image_shapes, image_names: per image.
    light: leave the decoded rows out of the traces (the statistics need the weights and the detections);
    the traces hold no image pixels either way (`trace_image` adds them). Each image's trace equals its
    `trace_image` trace to float round-off (a batch computes the same convolutions, summed in another order).
    """
    if not has_fusion_weights(model):
        raise ValueError(f"the {model.config.variant!r} model has no ASFF fusion weights to trace; load an ASFF "
                         "checkpoint (fusion 'asff').")
    # A fast CPU model runs large batches a few images at a time; its hooked forward does not split, so split here.
    per_chunk = model.images_per_chunk(batch) if hasattr(model, "images_per_chunk") else None
    if per_chunk is not None:
        return [trace for start in range(0, len(transforms), per_chunk) for trace in trace_batch(
            model, batch[start:start + per_chunk], transforms[start:start + per_chunk],
            image_shapes=image_shapes[start:start + per_chunk], image_names=image_names[start:start + per_chunk],
            conf_threshold=conf_threshold, nms_threshold=nms_threshold, counterfactual=counterfactual,
            keep_maps=keep_maps, light=light)]
    counterfactual = as_counterfactual(counterfactual)
    metadata_in = dict(getattr(model, "metadata", {}) or {})
    size = int(batch.shape[-1])
    device = next(model.parameters()).device
    with torch.no_grad(), capture(model, resized=keep_maps, fused=keep_maps,
                                  counterfactual=counterfactual) as recorder:
        outputs = model(batch.to(device))
    with torch.no_grad():
        decoded = model.decode(outputs).float()
        detections = postprocess(decoded, conf_threshold, nms_threshold)
    strides = tuple(int(s) for s in model.strides)
    class_names = list(metadata_in.get("class_names") or [f"class_{i}" for i in range(model.num_classes)])
    shared = {"checkpoint": metadata_in.get("checkpoint"), "checkpoint_sha256": metadata_in.get("sha256"),
              "variant": model.config.variant, "size": size, "strides": list(strides),
              "conf_threshold": conf_threshold, "nms_threshold": nms_threshold,
              "counterfactual": counterfactual.to_dict(), "counterfactual_label": counterfactual.describe(),
              "versions": dict(library_versions())}
    all_weights = [w.detach().float().cpu().numpy() for w in recorder.fusion_weights]
    learned = (None if counterfactual.is_learned else
               [w.detach().float().cpu().numpy() for w in recorder.learned_weights])
    traces = []
    for index, transform in enumerate(transforms):
        fusion_weights = [w[index] for w in all_weights]
        metadata = {**shared, "image_name": image_names[index], "image_shape": list(image_shapes[index])}
        if light:
            metadata["light"] = True
        trace = Trace(
            image=np.zeros((0, 0, 3), dtype=np.uint8), transform=transform, fusion_weights=fusion_weights,
            decoded=(np.zeros((0, decoded.shape[-1]), dtype=np.float32) if light
                     else decoded[index].detach().cpu().numpy()),
            detections=detection_records(detections[index].to("cpu"), fusion_weights, strides, transform,
                                         class_names),
            class_names=class_names, metadata=metadata,
            learned_weights=None if learned is None else [w[index] for w in learned])
        if keep_maps:
            trace.resized_maps = [[_channel_rms(recorder.resized[l][k][index]) for k in range(3)] for l in range(3)]
            trace.fused_maps = [_channel_rms(recorder.fused[l][index]) for l in range(3)]
            trace.raw_predictions = [out.prediction[index].float().cpu().numpy() for out in outputs]
            trace.raw_anchor_logwh = [out.anchor_logwh[index].float().cpu().numpy() for out in outputs]
        traces.append(trace)
    return traces
