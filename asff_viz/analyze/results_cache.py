"""Per-image results of the model, cached on disk so that re-plotting never re-runs it.

Every entry is one `.npz` file named by the sha256 of what determines it: the checkpoint file's sha256, the
image file's sha256, the input size, the fusion mode (counterfactual), the thresholds, and the cache format
version, the version of the statistic (`STATISTIC_VERSIONS`) and the code that computed it (`source_sha256`, a
hash of the package's sources: any code change, committed or not, is a new key). Change any of them and the
entry is a different file; a stale entry is never read. Kinds:

* `trace`: an `asff_viz.Trace` (`Trace.save` / `Trace.load`). Figure 3 keeps the whole trace; dataset
  statistics store a *light* trace without the image pixels and without the decoded rows (a few MB per
  COCO image otherwise), i.e. the fusion weights, the detections after NMS and the geometry.
* `detections`: boxes, scores, labels and producing level for models without fusion weights (sum fusion).
* `gradflow`: the per-image gradient-flow summary (`flow_statistics.summarize_flow`).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..inference.transforms import ImageError, ImageTransform, read_image
from ..introspection.capture import Counterfactual, as_counterfactual
from ..introspection.controls import image_control_seed
from ..introspection.trace import Trace, TraceError, trace_image
from ..utils.codeversion import source_sha256
from ..utils.fileio import atomic_write
from . import batches
from .flow_statistics import summarize_flow
from .sources import AnalysedModel, AnalysisError, file_sha256

CACHE_FORMAT_VERSION = 1
# The version of each statistic a cache entry holds: raise one when its definition changes (what a conflict is,
# which cells a box covers, ...), and every entry computed the old way becomes a miss. Entries are also keyed on
# the code that computed them (`source_sha256`).
STATISTIC_VERSIONS = {"trace": 1, "detections": 1, "gradflow": 3}


@dataclass
class ImageResult:
    """One image under one model and fusion mode: what the statistics need (numpy only).

    fusion_weights: 3 arrays (3, H_l, W_l) (level 0 = stride 32 first, channel = source level), or None for
    models without ASFF weights. boxes: (K, 4) xyxy in original pixels; scores, labels, levels: (K,) (level
    of the producing cell). transform: the input <-> original geometry.
    """

    fusion_weights: list | None
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    levels: np.ndarray
    transform: ImageTransform
    strides: tuple

    @classmethod
    def from_trace(cls, trace: Trace) -> ImageResult:
        records = trace.detections
        return cls(
            fusion_weights=[np.asarray(w, dtype=np.float32) for w in trace.fusion_weights],
            boxes=np.asarray([r.box_xyxy for r in records], dtype=np.float64).reshape(-1, 4),
            scores=np.asarray([r.score for r in records], dtype=np.float64),
            labels=np.asarray([r.label for r in records], dtype=np.int64),
            levels=np.asarray([r.level for r in records], dtype=np.int64),
            transform=trace.transform, strides=tuple(int(s) for s in trace.strides))


class AnalysisCache:
    """A folder of cached per-image results (None: no caching). Counts hits and misses."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.directory = None if directory is None else Path(directory)
        self.hits = 0
        self.misses = 0
        self._image_hashes: dict[str, str] = {}

    def image_sha256(self, path: str | os.PathLike) -> str:
        key = str(Path(path).resolve())
        if key not in self._image_hashes:
            self._image_hashes[key] = file_sha256(path)
        return self._image_hashes[key]

    @staticmethod
    def key(**parts) -> str:
        kind = parts.get("kind")
        text = json.dumps({"cache_format": CACHE_FORMAT_VERSION, "statistic_version": STATISTIC_VERSIONS.get(kind),
                           "code": source_sha256(), **parts}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path(self, kind: str, key: str) -> Path | None:
        return None if self.directory is None else self.directory / kind / key[:2] / f"{key}.npz"

    def _load(self, path: Path | None, reader):
        """reader(path) of a cached entry, or None (a miss) when absent or unreadable (then recomputed)."""
        if path is not None and path.is_file():
            try:
                value = reader(path)
            except (TraceError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                path.unlink(missing_ok=True)  # a damaged entry (a killed run, a full disk) is rebuilt, not fatal
            else:
                self.hits += 1
                return value
        self.misses += 1
        return None

    # ------------------------------------------------------------------------------------------- traces

    def trace(self, model: AnalysedModel, image_path: str | os.PathLike, *, size: int,
              counterfactual: Counterfactual | str | None = None, conf_threshold: float = 0.01,
              nms_threshold: float = 0.65, light: bool = False) -> Trace:
        """The (cached) trace of one image; `light` drops the image pixels and the decoded rows."""
        counterfactual = as_counterfactual(counterfactual)
        path = self.path("trace", self._trace_key(model, image_path, size, counterfactual, conf_threshold,
                                                  nms_threshold, light))
        cached = self._load(path, Trace.load)
        if cached is not None:
            return cached
        image = _read(image_path)
        trace = trace_image(model.model, image, size=size, conf_threshold=conf_threshold,
                            nms_threshold=nms_threshold, counterfactual=counterfactual,
                            image_name=Path(image_path).name)
        trace.metadata["image_sha256"] = self.image_sha256(image_path)
        if light:
            trace.image = np.zeros((0, 0, 3), dtype=np.uint8)
            trace.decoded = np.zeros((0, trace.decoded.shape[1]), dtype=np.float32)
            trace.metadata["light"] = True
        if path is not None:
            # Full traces hold the image pixels, which compress well; light ones hold float maps, which do not.
            trace.save(path, compressed=not light, durable=False)
        return trace

    def image_result(self, model: AnalysedModel, image_path: str | os.PathLike, *, size: int,
                     counterfactual: Counterfactual | str | None = None, conf_threshold: float = 0.01,
                     nms_threshold: float = 0.65) -> ImageResult:
        """Detections (and fusion weights, for ASFF models) of one image, cached."""
        return next(iter(self.image_results(model, [image_path], size=size, counterfactual=counterfactual,
                                            conf_threshold=conf_threshold, nms_threshold=nms_threshold)))

    def image_results(self, model: AnalysedModel, image_paths: Sequence, *, size: int,
                      counterfactual: Counterfactual | str | None = None, conf_threshold: float = 0.01,
                      nms_threshold: float = 0.65, batch_size: int = batches.DEFAULT_BATCH_SIZE,
                      workers: int = 0) -> Iterator[ImageResult]:
        """`image_result` of each path, in order: cached entries are read; the others run through the model in
        batches of `batch_size` while `workers` processes read the next images (`asff_viz.analyze.batches`)."""
        counterfactual = as_counterfactual(counterfactual)
        options = {"size": size, "conf_threshold": conf_threshold, "nms_threshold": nms_threshold,
                   "batch_size": batch_size, "workers": workers}
        if model.has_fusion_weights:
            keys = [self._trace_key(model, path, size, counterfactual, conf_threshold, nms_threshold, True)
                    for path in image_paths]

            def compute(indices: list) -> Iterator[ImageResult]:
                paths = [image_paths[index] for index in indices]
                traces = batches.light_traces(model, paths, counterfactual=counterfactual, **options)
                for index, trace in zip(indices, traces, strict=True):
                    trace.metadata["image_sha256"] = self.image_sha256(image_paths[index])
                    self._store(self.path("trace", keys[index]),
                                lambda target, trace=trace: trace.save(target, compressed=False, durable=False))
                    yield ImageResult.from_trace(trace)

            yield from self._merged("trace", keys, compute, lambda path: ImageResult.from_trace(Trace.load(path)))
            return
        if not counterfactual.is_learned:
            raise AnalysisError(f"{model.path}: a {model.fusion_mode!r}-fusion model has no fusion weights to "
                                "replace; counterfactuals need an ASFF checkpoint.")
        keys = [self.key(kind="detections", checkpoint=model.sha256, image=self.image_sha256(path), size=size,
                         conf=conf_threshold, nms=nms_threshold) for path in image_paths]

        def compute_detections(indices: list) -> Iterator[ImageResult]:
            found_all = batches.detections(model, [image_paths[index] for index in indices], **options)
            for index, found in zip(indices, found_all, strict=True):
                transform = found["transform"]
                arrays = {name: found[name] for name in ("boxes", "scores", "labels", "levels")}
                arrays["transform"] = np.array([transform.original_height, transform.original_width, transform.size])
                arrays["strides"] = np.array(found["strides"])
                self._store(self.path("detections", keys[index]),
                            lambda target, arrays=arrays: _save_npz(target, **arrays))
                yield ImageResult(None, found["boxes"], found["scores"], found["labels"], found["levels"],
                                  transform, found["strides"])

        yield from self._merged("detections", keys, compute_detections, _read_detections)

    def _merged(self, kind: str, keys: list, compute, read) -> Iterator:
        """Each image's cached entry (read), or its computed one: the images without an entry run through
        `compute(indices)` (a generator, in order) only when the iteration reaches them."""
        paths = [self.path(kind, key) for key in keys]
        missing = [index for index, path in enumerate(paths) if path is None or not path.is_file()]
        computed = compute(missing)
        pending = set(missing)
        for index, path in enumerate(paths):
            if index in pending:
                self.misses += 1
                yield next(computed)
                continue
            value = self._load(path, read)
            yield value if value is not None else next(compute([index]))

    @staticmethod
    def _store(path: Path | None, write) -> None:
        if path is not None:
            write(path)

    # ------------------------------------------------------------------------------------ gradient flow

    def gradient_summary(self, model: AnalysedModel, image_path: str | os.PathLike, boxes_xyxy, labels, *,
                         size: int, counterfactual: Counterfactual | str | None = None,
                         significance: float = 0.1, active_fraction: float = 1e-3,
                         cosine_threshold: float = 0.0, controls: bool = False, control_seed: int = 0,
                         sweep: tuple = ()) -> dict:
        """The (cached) `summarize_flow` of the training loss of one image against its ground truth.

        boxes_xyxy: (M, 4) ground truth in original pixels; labels: (M,) class indices. With `controls`, the
        summary also holds "controls": {name: summary} of each control of the conflict metric (`ALL_CONTROLS`).
        """
        return next(iter(self.gradient_summaries(
            model, [(image_path, boxes_xyxy, labels)], size=size, counterfactual=counterfactual,
            significance=significance, active_fraction=active_fraction, cosine_threshold=cosine_threshold,
            controls=controls, control_seed=control_seed, sweep=sweep)))

    def gradient_summaries(self, model: AnalysedModel, images: Sequence[tuple], *, size: int,
                           counterfactual: Counterfactual | str | None = None, significance: float = 0.1,
                           active_fraction: float = 1e-3, cosine_threshold: float = 0.0, controls: bool = False,
                           control_seed: int = 0, sweep: tuple = (), batch_size: int = batches.DEFAULT_BATCH_SIZE,
                           workers: int = 0) -> Iterator[dict]:
        """`gradient_summary` of each (image path, boxes_xyxy, labels), in order, computed in batches."""
        counterfactual = as_counterfactual(counterfactual)
        settings = {"significance": significance, "active_fraction": active_fraction,
                    "cosine_threshold": cosine_threshold, "controls": controls, "control_seed": control_seed,
                    "sweep": tuple(sweep)}
        paths = [path for path, _, _ in images]
        truths = [(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64).reshape(-1))
                  for _, boxes, labels in images]
        keys = [self._flow_key(model, path, size, counterfactual, *truth, settings)
                for path, truth in zip(paths, truths, strict=True)]

        def compute(indices: list) -> Iterator[dict]:
            # Each image's controls are drawn from its own seed (the run's and the image's sha256): independent
            # between images, and the same whichever batch or order computes them.
            seeds = [image_control_seed(control_seed, self.image_sha256(paths[index])) for index in indices]
            flows = batches.flows(model, [paths[index] for index in indices], [truths[index] for index in indices],
                                  size=size, counterfactual=counterfactual, batch_size=batch_size, workers=workers,
                                  control_seeds=seeds, **{k: v for k, v in settings.items() if k != "control_seed"})
            for index, flow in zip(indices, flows, strict=True):
                summary, flat = _flow_entries(flow, controls)
                self._store(self.path("gradflow", keys[index]), lambda target, flat=flat: _save_npz(target, **flat))
                yield summary

        yield from self._merged("gradflow", keys, compute, lambda path: _unflatten_controls(_read_npz(path)))

    def _trace_key(self, model: AnalysedModel, image_path, size: int, counterfactual: Counterfactual,
                   conf_threshold: float, nms_threshold: float, light: bool) -> str:
        return self.key(kind="trace", checkpoint=model.sha256, image=self.image_sha256(image_path), size=size,
                        counterfactual=counterfactual.to_dict(), conf=conf_threshold, nms=nms_threshold, light=light)

    def _flow_key(self, model: AnalysedModel, image_path, size: int, counterfactual: Counterfactual, boxes, labels,
                  settings: dict) -> str:
        truth_digest = hashlib.sha256(np.ascontiguousarray(boxes).tobytes() + labels.tobytes()).hexdigest()
        return self.key(kind="gradflow", checkpoint=model.sha256, image=self.image_sha256(image_path), size=size,
                        counterfactual=counterfactual.to_dict(), truth=truth_digest,
                        significance=settings["significance"], active_fraction=settings["active_fraction"],
                        cosine_threshold=settings["cosine_threshold"],
                        objective="training loss (total), all levels", controls=settings["controls"],
                        control_seed=settings["control_seed"] if settings["controls"] else None,
                        sweep=[list(pair) for pair in settings["sweep"]])


def _flow_entries(flow, controls: bool) -> tuple[dict, dict]:
    """(summary, flat arrays for the cache file) of a `GradientFlow`: `summarize_flow`, with the controls' and the
    sweep's summaries nested in the summary and stored as `control:<name>:<field>` / `sweep:<name>:<field>`."""
    summary = summarize_flow(flow)
    flat = dict(summary)
    if controls:
        summary["controls"] = {name: summarize_flow(control) for name, control in flow.controls.items()}
        flat.update({f"control:{name}:{field}": value for name, control in summary["controls"].items()
                     for field, value in control.items()})
    if flow.sweep:
        summary["sweep"] = {sweep_key(*key): summarize_flow(swept) for key, swept in flow.sweep.items()}
        flat.update({f"sweep:{name}:{field}": value for name, swept in summary["sweep"].items()
                     for field, value in swept.items()})
    return summary, flat


def _read_detections(path: Path) -> ImageResult:
    data = _read_npz(path)
    return ImageResult(None, data["boxes"], data["scores"], data["labels"], data["levels"],
                       ImageTransform(*(int(v) for v in data["transform"])), tuple(int(s) for s in data["strides"]))


def _read(path) -> np.ndarray:
    try:
        return read_image(path)
    except ImageError as error:
        raise AnalysisError(str(error)) from None


def sweep_key(weights: str, significance: float, cosine: float) -> str:
    """The name of one threshold-sweep entry: `learned @ sig=0.05, cos=0`."""
    return f"{weights} @ sig={significance:g}, cos={cosine:g}"


def _unflatten_controls(entry: dict) -> dict:
    """A cached gradient summary: the control and sweep summaries stored as `control:<name>:<field>` and
    `sweep:<name>:<field>` back into dicts."""
    summary = {key: value for key, value in entry.items() if not key.startswith(("control:", "sweep:"))}
    for prefix, target in (("control", "controls"), ("sweep", "sweep")):
        nested: dict = {}
        for key, value in entry.items():
            if key.startswith(prefix + ":"):
                _, name, field = key.split(":", 2)
                nested.setdefault(name, {})[field] = value
        if nested:
            summary[target] = nested
    return summary


def _read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _save_npz(path: Path, **arrays) -> None:
    """Write atomically: a run killed mid-write leaves no half entry that a later run would trust. Uncompressed
    (float maps compress by a tenth, at 2.5x the time) and not fsynced: an entry that cannot be read is rebuilt
    (`AnalysisCache._load`), so the cache never needs the disk round trip that results do."""
    atomic_write(path, lambda stream: np.savez(stream, **arrays), durable=False)


__all__ = ["AnalysisCache", "CACHE_FORMAT_VERSION", "ImageResult"]
