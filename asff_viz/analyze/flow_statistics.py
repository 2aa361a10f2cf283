"""Streaming statistics of gradient flow over a dataset (pure numpy, no model): per-image summaries of each
target-source path by region, accumulated with per-image counts for bootstrap and paired intervals."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.fileio import atomic_write
from .cells import LEVELS

# Regions of a source grid, from the ground-truth assignment (see gradflow.ground_truth_cells):
# the first three are disjoint; the per-level ones may overlap each other.
REGIONS = ("positive", "object background", "background",
           "positive of s32", "positive of s16", "positive of s8",
           "object background of s32", "object background of s16", "object background of s8")


MAIN_REGIONS = 3


def region_masks(positives_at_source, background_at_source, shape) -> np.ndarray:
    """(R, H_k, W_k) bool masks of REGIONS on one source grid.

    positives_at_source, background_at_source: (3, H_k, W_k) target level l's positive / object-background
    cells mapped onto the source grid (None without ground truth: everything is background).
    """
    height, width = shape
    if positives_at_source is None:
        positives = np.zeros((LEVELS, height, width), dtype=bool)
        background = np.zeros((LEVELS, height, width), dtype=bool)
    else:
        positives = np.asarray(positives_at_source, dtype=bool)
        background = np.asarray(background_at_source, dtype=bool)
    positive = positives.any(axis=0)
    object_background = background.any(axis=0) & ~positive
    rest = ~positive & ~object_background
    return np.concatenate([np.stack([positive, object_background, rest]), positives, background])


def summarize_flow(flow) -> dict:
    """One image's `GradientFlow` -> the few arrays the dataset statistics need (what the cache stores).

    value_norms, weight_branch_norms: (3, 3) Frobenius norms (target, source); neck_norms, total_norms,
    fusion_total_norms: (3,) per source; region_energy: (3, 3, R) sum of squared value-path norms over each
    region of source k; active, conflicting: (3, R) counts of locations; cancellation: (3, R) summed over active
    locations; weighted_cancellation, gradient_weight: (3, R) sums over active locations of cancellation x
    sum_l |g_l| and of sum_l |g_l| (for the gradient-weighted mean); objective: the objective's value.
    """
    regions = len(REGIONS)
    energy = np.zeros((LEVELS, LEVELS, regions))
    active = np.zeros((LEVELS, regions), dtype=np.int64)
    conflicting = np.zeros((LEVELS, regions), dtype=np.int64)
    cancellation = np.zeros((LEVELS, regions))
    weighted_cancellation = np.zeros((LEVELS, regions))
    gradient_weight = np.zeros((LEVELS, regions))
    for source in range(LEVELS):
        shape = flow.maps[0][source].shape
        masks = region_masks(None if flow.positives_at_source is None else flow.positives_at_source[source],
                             None if flow.background_at_source is None else flow.background_at_source[source],
                             shape)
        statistics = flow.conflict[source]
        for target in range(LEVELS):
            squared = np.asarray(flow.maps[target][source], dtype=np.float64) ** 2
            energy[target, source] = (masks * squared[None]).sum(axis=(1, 2))
        on = masks & statistics.active[None]
        active[source] = on.sum(axis=(1, 2))
        conflicting[source] = (on & statistics.conflicting[None]).sum(axis=(1, 2))
        location_cancellation = np.asarray(statistics.cancellation, dtype=np.float64)
        location_weight = np.asarray(statistics.norms, dtype=np.float64).sum(axis=0)  # sum_l |g_l|, (H, W)
        cancellation[source] = (on * location_cancellation[None]).sum(axis=(1, 2))
        weighted_cancellation[source] = (on * (location_cancellation * location_weight)[None]).sum(axis=(1, 2))
        gradient_weight[source] = (on * location_weight[None]).sum(axis=(1, 2))
    return {"value_norms": np.asarray(flow.matrix, dtype=np.float64),
            "weight_branch_norms": np.asarray(flow.weight_branch_matrix, dtype=np.float64),
            "neck_norms": np.asarray(flow.neck_path_norms, dtype=np.float64),
            "total_norms": np.asarray(flow.total_norms, dtype=np.float64),
            "fusion_total_norms": np.asarray(flow.fusion_total_norms, dtype=np.float64),
            "region_energy": energy, "active": active, "conflicting": conflicting, "cancellation": cancellation,
            "weighted_cancellation": weighted_cancellation, "gradient_weight": gradient_weight,
            "objective": np.float64(flow.objective_value)}


@dataclass
class GradientFlowStatistics:
    """Dataset statistics of the gradient decomposition for several fusion modes (learned, uniform, sum).

    Per mode: sums over images of squared norms (for root-mean-square norms and energy shares), pooled
    location counts per region, and the per-image counts that bootstrap confidence intervals resample.
    """

    modes: list
    images: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)

    def add(self, mode: str, summary: dict, image: str = "") -> None:
        if mode not in self.modes:
            raise ValueError(f"unknown mode {mode!r}; expected one of {self.modes}")
        squares = {"value_norms": summary["value_norms"] ** 2,
                   "weight_branch_norms": summary["weight_branch_norms"] ** 2,
                   "neck_norms": summary["neck_norms"] ** 2, "total_norms": summary["total_norms"] ** 2,
                   "fusion_total_norms": summary["fusion_total_norms"] ** 2,
                   "region_energy": summary["region_energy"], "active": summary["active"],
                   "conflicting": summary["conflicting"], "cancellation": summary["cancellation"],
                   "weighted_cancellation": summary["weighted_cancellation"],
                   "gradient_weight": summary["gradient_weight"]}
        totals = self.sums.setdefault(mode, {})
        for name, value in squares.items():
            totals[name] = totals.get(name, 0) + np.asarray(value, dtype=np.float64)
        self.images[mode] = self.images.get(mode, 0) + 1
        self.per_image.setdefault(mode, []).append(
            {"image": image, "objective": float(summary["objective"]),
             "active": np.asarray(summary["active"], dtype=np.int64),
             "conflicting": np.asarray(summary["conflicting"], dtype=np.int64),
             "cancellation": np.asarray(summary["cancellation"], dtype=np.float64)})

    def rms_norms(self, mode: str) -> dict:
        """Root-mean-square over images of each norm: value (3, 3), weight_branch (3, 3), neck/total (3,)."""
        count = max(self.images.get(mode, 0), 1)
        sums = self.sums[mode]
        return {name: np.sqrt(sums[f"{name}_norms"] / count)
                for name in ("value", "weight_branch", "neck", "total", "fusion_total")}

    def energy_shares(self, mode: str, region: int | None = None) -> np.ndarray:
        """(3, 3) share of source k's value-path gradient energy that comes from target l (columns sum to 1).

        region: an index into REGIONS, or None for every location.
        """
        energy = self.sums[mode]["region_energy"]
        energy = energy[..., :MAIN_REGIONS].sum(axis=-1) if region is None else energy[..., region]
        column = energy.sum(axis=0, keepdims=True)
        return np.where(column > 0, energy / np.where(column > 0, column, 1.0), np.nan)

    def weighted_cancellation(self, mode: str) -> np.ndarray:
        """(3 sources, R regions) mean cancellation over active locations, weighted by their gradient sum_l |g_l|."""
        sums = self.sums[mode]
        weight = sums["gradient_weight"]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(weight > 0, sums["weighted_cancellation"] / weight, np.nan)

    def conflict_rates(self, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pooled (3 sources, R regions) conflict rate, mean cancellation, active and conflicting counts."""
        sums = self.sums[mode]
        active, conflicting = sums["active"], sums["conflicting"]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(active > 0, conflicting / active, np.nan)
            cancellation = np.where(active > 0, sums["cancellation"] / active, np.nan)
        return rate, cancellation, active.astype(np.int64), conflicting.astype(np.int64)

    def bootstrap_interval(self, mode: str, samples: int = 1000, seed: int = 0,
                           level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """(3, R) lower and upper percentile-bootstrap bounds of the pooled conflict rate, resampling images."""
        records = self.per_image.get(mode, [])
        if not records:
            nan = np.full((LEVELS, len(REGIONS)), np.nan)
            return nan, nan.copy()
        active = np.stack([r["active"] for r in records]).astype(np.float64)  # (N, 3, R)
        conflicting = np.stack([r["conflicting"] for r in records]).astype(np.float64)
        count = len(records)
        rng = np.random.default_rng(seed)
        rates = []
        for start in range(0, samples, 100):  # chunks keep the (chunk, N) weight matrix small
            chunk = min(100, samples - start)
            weights = rng.multinomial(count, np.full(count, 1.0 / count), size=chunk).astype(np.float64)
            pooled_active = np.einsum("bn,nsr->bsr", weights, active)
            pooled_conflicting = np.einsum("bn,nsr->bsr", weights, conflicting)
            with np.errstate(invalid="ignore", divide="ignore"):
                rates.append(np.where(pooled_active > 0, pooled_conflicting / pooled_active, np.nan))
        rates = np.concatenate(rates)
        tail = (1.0 - level) / 2 * 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN regions (no such location anywhere) stay NaN
            return np.nanpercentile(rates, tail, axis=0), np.nanpercentile(rates, 100 - tail, axis=0)

    def paired_difference(self, mode: str, control: str, samples: int = 1000, seed: int = 0, level: float = 0.95
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(3 sources, R regions) pooled conflict rate of `mode` minus that of `control`, with the percentile
        bootstrap interval of the *paired* difference: each resample draws images, and both modes are pooled
        over the same draw. (Two intervals computed apart may overlap while the paired one excludes zero.)

        Both modes must hold the same images in the same order (the analysis adds them so).
        """
        first, second = self.per_image.get(mode, []), self.per_image.get(control, [])
        if [r["image"] for r in first] != [r["image"] for r in second]:
            raise ValueError(f"{mode!r} and {control!r} do not hold the same images; a paired difference needs them")
        if not first:
            nan = np.full((LEVELS, len(REGIONS)), np.nan)
            return nan, nan.copy(), nan.copy()
        counts = [np.stack([r[name] for r in records]).astype(np.float64)
                  for records in (first, second) for name in ("active", "conflicting")]  # 4 x (N, 3, R)
        with np.errstate(invalid="ignore", divide="ignore"):
            estimate = (counts[1].sum(0) / counts[0].sum(0)) - (counts[3].sum(0) / counts[2].sum(0))
        rng = np.random.default_rng(seed)
        count = len(first)
        differences = []
        for start in range(0, samples, 100):
            chunk = min(100, samples - start)
            weights = rng.multinomial(count, np.full(count, 1.0 / count), size=chunk).astype(np.float64)
            pooled = [np.einsum("bn,nsr->bsr", weights, c) for c in counts]
            with np.errstate(invalid="ignore", divide="ignore"):
                differences.append(pooled[1] / pooled[0] - pooled[3] / pooled[2])
        differences = np.concatenate(differences)
        tail = (1.0 - level) / 2 * 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return (estimate, np.nanpercentile(differences, tail, axis=0),
                    np.nanpercentile(differences, 100 - tail, axis=0))

    PER_IMAGE_ARRAYS = ("active", "conflicting", "cancellation")

    def save(self, path: str | os.PathLike) -> Path:
        """Everything `write_figures` needs, as one .npz (no pickles): re-plotting needs no model."""
        header = {"modes": list(self.modes), "images": self.images,
                  "per_image": {mode: [{"image": r["image"], "objective": r["objective"]} for r in records]
                                for mode, records in self.per_image.items()}}
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
        for index, mode in enumerate(self.modes):
            for name, value in self.sums.get(mode, {}).items():
                arrays[f"sum/{index}/{name}"] = np.asarray(value, dtype=np.float64)
            records = self.per_image.get(mode, [])
            for name in self.PER_IMAGE_ARRAYS:
                if records:
                    arrays[f"per_image/{index}/{name}"] = np.stack([r[name] for r in records])
        atomic_write(path, lambda stream: np.savez_compressed(stream, **arrays))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GradientFlowStatistics:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode())
            statistics = cls(list(header["modes"]))
            statistics.images = {mode: int(count) for mode, count in header["images"].items()}
            for index, mode in enumerate(statistics.modes):
                prefix = f"sum/{index}/"
                sums = {name[len(prefix):]: data[name] for name in data.files if name.startswith(prefix)}
                if sums:
                    statistics.sums[mode] = sums
                described = header["per_image"].get(mode, [])
                if described:
                    arrays = {name: data[f"per_image/{index}/{name}"] for name in cls.PER_IMAGE_ARRAYS}
                    statistics.per_image[mode] = [
                        {**entry, **{name: arrays[name][position] for name in cls.PER_IMAGE_ARRAYS}}
                        for position, entry in enumerate(described)]
        return statistics

    def per_image_rows(self) -> list[dict]:
        rows = []
        for mode in self.modes:
            for record in self.per_image.get(mode, []):
                row = {"image": record["image"], "mode": mode, "loss": record["objective"]}
                active, conflicting = record["active"], record["conflicting"]
                total_active = active[:, :MAIN_REGIONS].sum()
                row["conflict_rate"] = (conflicting[:, :MAIN_REGIONS].sum() / total_active
                                        if total_active else math.nan)
                for source in range(LEVELS):
                    for region in range(MAIN_REGIONS):
                        name = f"source_{source}_{REGIONS[region].replace(' ', '_')}"
                        row[f"{name}_active"] = int(active[source, region])
                        row[f"{name}_conflicting"] = int(conflicting[source, region])
                rows.append(row)
        return rows
