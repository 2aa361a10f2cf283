"""Figures of gradient flow and attributions over one image (matplotlib, no pyplot): the target x source
matrix, where the gradient goes, conflict maps, learned vs counterfactual, and captum attributions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..introspection.capture import LEVEL_NAMES
from ..introspection.trace import Trace
from .palette import CONFLICT_CMAP, ENTROPY_CMAP, MAGNITUDE_CMAP, SIGNED_CMAP, WEIGHT_CMAP
from .traces import (
    _check_level,
    _colormap,
    _figure_for,
    _image_extent,
    _overlay,
    _show_image,
    drawable_box,
)


def finite_max(arrays) -> float:
    """The largest finite value of some arrays, for a shared colour scale (1.0 when there is none or it is 0):
    a NaN in one flow's gradient must not blank the scale of the others."""
    values = [np.asarray(a, dtype=np.float64) for a in arrays]
    largest = max((float(v[np.isfinite(v)].max()) for v in values if np.isfinite(v).any()), default=0.0)
    return largest or 1.0


def rate_text(rate: float, spec: str = ".1%") -> str:
    """A conflict rate for a title or label: 'n/a' when it is undefined (no active location), never '0.0%'."""
    return format(rate, spec) if math.isfinite(rate) else "n/a"


def conflict_undefined(flow) -> str | None:
    """Why `flow`'s conflict rates are no measurement, or None: a gradient that is not finite, or one that reaches
    a single target level (no two levels can disagree, so its 0 says nothing)."""
    if not flow.finite:
        return "gradient not finite"
    if flow.targets_reached < 2:
        return "one target level"
    return None


def conflict_text(flow, rate: float, spec: str = ".1%") -> str:
    """One of `flow`'s conflict rates as text, or 'n/a (why)' (`conflict_undefined`)."""
    reason = conflict_undefined(flow)
    return rate_text(rate, spec) if reason is None else f"n/a ({reason})"


def gradient_flow_matrix(flow, *, cmap: str = MAGNITUDE_CMAP, log_scale: bool = False,
                         include_weight_branch: bool = False) -> Figure:
    """The 3x3 matrix of value-path gradient norms (row = target level, column = source level), annotated.

    With include_weight_branch, a second panel shows the weight-branch norms on the same colour scale.
    """
    matrices = [("value path", flow.matrix)]
    if include_weight_branch:
        matrices.append(("weight branch", flow.weight_branch_matrix))
    figure = Figure(figsize=(4.2 * len(matrices) + 0.8, 4.0), layout="constrained")
    axes = figure.subplots(1, len(matrices), squeeze=False)[0]
    top = max(float(np.max(m)) for _, m in matrices) or 1.0
    positive = [float(v) for _, m in matrices for v in np.ravel(m) if v > 0]
    norm = (mcolors.LogNorm(vmin=min(positive), vmax=top) if log_scale and positive
            else mcolors.Normalize(vmin=0.0, vmax=top))
    mappable = None
    for ax, (name, matrix) in zip(axes, matrices, strict=True):
        mappable = ax.imshow(matrix, cmap=_colormap(cmap), norm=norm)
        for (row, col), value in np.ndenumerate(matrix):
            shade = norm(value) if value > 0 or not log_scale else 0.0
            ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=9,
                    color="black" if shade > 0.6 else "white")
        ax.set_xticks(range(3), [f"src {n}" for n in LEVEL_NAMES], fontsize=8)
        ax.set_yticks(range(3), [f"tgt {n}" for n in LEVEL_NAMES], fontsize=8)
        ax.set_title(name, fontsize=10)
    figure.colorbar(mappable, ax=list(axes), label="gradient norm")
    figure.suptitle(f"{flow.objective} ({flow.counterfactual_label})", fontsize=10)
    return figure


def gradient_flow_maps(flow, *, trace: Trace | None = None, cmap: str = MAGNITUDE_CMAP, alpha: float = 0.6,
                       panel_inches: float = 3.0) -> Figure:
    """3x3 maps of value-path gradient norms at each source's resolution (row = target, column = source).

    Each column (one source) shares its colour scale, 0 to that source's largest value, so the three target
    levels' contributions to one source compare directly. With `trace`, the maps lie on its image.
    """
    image = trace.image if trace is not None else None
    reference = image if image is not None else np.zeros((1, 1, 3), np.uint8)
    figure = _figure_for(reference, 3, 3, panel_inches=panel_inches)
    axes = figure.subplots(3, 3, squeeze=False)
    for source in range(3):
        top = max(float(flow.maps[level][source].max()) for level in range(3)) or 1.0
        mappable = None
        for level in range(3):
            ax = axes[level][source]
            values = flow.maps[level][source]
            if trace is not None:
                _show_image(ax, image)
                mappable = _overlay(ax, image, trace.transform.map_to_original(values, "nearest"), cmap=cmap,
                                    vmin=0.0, vmax=top, alpha=alpha)
            else:
                mappable = ax.imshow(values, cmap=_colormap(cmap), vmin=0.0, vmax=top, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            if level == 0:
                ax.set_title(f"source {LEVEL_NAMES[source]}", fontsize=10)
            if source == 0:
                ax.set_ylabel(f"from target {LEVEL_NAMES[level]}", fontsize=10)
        figure.colorbar(mappable, ax=axes[:, source].tolist(), location="bottom", shrink=0.8, label="gradient norm")
    figure.suptitle(f"value-path gradient: {flow.objective} ({flow.counterfactual_label})", fontsize=10)
    return figure


_POSITIVE_MARKERS = ("s", "^", "o")


def conflict_maps(flows: Sequence, *, trace: Trace | None = None, cmap: str = CONFLICT_CMAP, alpha: float = 0.7,
                  panel_inches: float = 3.0) -> Figure:
    """Conflict (cancellation, fixed 0..1 scale) per source for one or more flows (e.g. learned, uniform).

    Rows are flows, columns sources; each title gives the conflict rate and the gradient-weighted mean
    cancellation. Ground-truth positives of each target level, mapped onto the source's grid, are marked
    (square = stride 32, triangle = 16, circle = 8) when the flow has ground truth. With `trace`, the maps
    lie on its image (flows and trace must come from the same image and input size).
    """
    if not isinstance(flows, (list, tuple)):
        flows = [flows]
    reference = trace.image if trace is not None else np.zeros((1, 1, 3), np.uint8)
    figure = _figure_for(reference, len(flows), 3, panel_inches=panel_inches)
    axes = figure.subplots(len(flows), 3, squeeze=False)
    mappable = None
    for row, flow in enumerate(flows):
        for source in range(3):
            ax = axes[row][source]
            conflict = flow.conflict[source]
            cells = conflict.cancellation.shape[0]
            if trace is not None:
                _show_image(ax, trace.image)
                mappable = _overlay(ax, trace.image, trace.transform.map_to_original(conflict.cancellation, "nearest"),
                                    cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha)
                cell_w, cell_h = trace.image.shape[1] / cells, trace.image.shape[0] / cells
            else:
                mappable = ax.imshow(conflict.cancellation, cmap=_colormap(cmap), vmin=0.0, vmax=1.0,
                                     interpolation="nearest", extent=(0, cells, cells, 0))
                cell_w = cell_h = 1.0
                ax.set_xticks([])
                ax.set_yticks([])
            if flow.positives_at_source is not None:
                for level in range(3):
                    ys, xs = np.nonzero(flow.positives_at_source[source][level])
                    if len(xs):
                        ax.scatter((xs + 0.5) * cell_w, (ys + 0.5) * cell_h, marker=_POSITIVE_MARKERS[level], s=18,
                                   facecolors="none", edgecolors="#56B4E9", linewidths=1.0,
                                   label=f"positive at {LEVEL_NAMES[level]}")
            ax.set_title(f"source {LEVEL_NAMES[source]}: conflict {conflict_text(flow, conflict.rate, '.0%')}, "
                         f"cancel {conflict.mean_cancellation:.2f}", fontsize=8)
            if source == 0:
                ax.set_ylabel(flow.counterfactual_label, fontsize=9)
    handles, labels = [], []
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    figure.colorbar(mappable, ax=axes, label="cancellation 1 - |sum g| / sum |g|", shrink=0.8)
    figure.suptitle(f"gradient conflict: {flows[0].objective}", fontsize=10)
    return figure


def gradient_flow_comparison(flows: Mapping[str, object], trace: Trace, target: int, source: int, *,
                             alpha: float = 0.75, map_cmap: str = ENTROPY_CMAP, conflict_cmap: str = CONFLICT_CMAP,
                             panel_inches: float = 3.2) -> Figure:
    """The app's gradient-flow view as one figure: a row per flow (e.g. learned, uniform), with its 3x3 matrix,
    the value-path gradient from `target` into `source` over the image, and the conflict map of `source`.

    Matrices share one colour scale, and so do the gradient maps (relative to their common largest value; under
    1 % is left clear, as on screen); conflict is on its fixed 0..1 scale.
    """
    target, source = _check_level(target, "target"), _check_level(source)
    names = list(flows)
    image = trace.image
    figure = _figure_for(image, len(names), 3, panel_inches=panel_inches, extra_width=1.6)
    axes = figure.subplots(len(names), 3, squeeze=False)
    matrix_top = finite_max(flows[name].matrix for name in names)
    map_top = finite_max(flows[name].maps[target][source] for name in names)
    matrix_image = map_image = conflict_image = None
    for row, name in enumerate(names):
        flow = flows[name]
        ax = axes[row][0]
        matrix_image = ax.imshow(flow.matrix, cmap=_colormap(MAGNITUDE_CMAP), vmin=0.0, vmax=matrix_top)
        for (i, j), value in np.ndenumerate(flow.matrix):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                    color="black" if value / matrix_top > 0.6 else "white")
        short = [name.replace("stride ", "s") for name in LEVEL_NAMES]  # "src stride 32" overlapped its neighbour
        ax.set_xticks(range(3), [f"src {n}" for n in short], fontsize=7)
        ax.set_yticks(range(3), [f"tgt {n}" for n in short], fontsize=7)
        ax.set_ylabel(f"{name} ({flow.counterfactual_label})", fontsize=8)
        ax.set_title(f"conflict rate {conflict_text(flow, flow.overall_conflict_rate)}", fontsize=8)
        relative = flow.maps[target][source] / map_top
        ax = axes[row][1]
        _show_image(ax, image)
        map_image = _overlay(ax, image, trace.transform.map_to_original(
            np.where(relative >= 0.01, relative, np.nan), "nearest"), cmap=map_cmap, vmin=0.0, vmax=1.0, alpha=alpha)
        ax.set_title(f"gradient {LEVEL_NAMES[target]} -> {LEVEL_NAMES[source]}", fontsize=8)
        ax = axes[row][2]
        _show_image(ax, image)
        conflict = flow.conflict[source]
        conflict_image = _overlay(ax, image, trace.transform.map_to_original(
            np.where(conflict.active, conflict.cancellation, np.nan), "nearest"), cmap=conflict_cmap, vmin=0.0,
            vmax=1.0, alpha=alpha)
        ax.set_title(f"conflict at {LEVEL_NAMES[source]}: {conflict_text(flow, conflict.rate)}", fontsize=8)
    figure.colorbar(matrix_image, ax=axes[:, 0].tolist(), location="bottom", shrink=0.8, label="gradient norm")
    figure.colorbar(map_image, ax=axes[:, 1].tolist(), location="bottom", shrink=0.8,
                    label="norm / largest (clear < 1 %)")
    figure.colorbar(conflict_image, ax=axes[:, 2].tolist(), location="bottom", shrink=0.8,
                    label="cancellation (blank = no gradient)")
    figure.suptitle(f"gradient flow: {flows[names[0]].objective}", fontsize=9)
    return figure


def attribution_overlay(image: np.ndarray, attribution, transform, *, alpha: float = 0.8, cmap: str | None = None,
                        clip_percentile: float | None = 99.5, box_xyxy=None, title: str | None = None,
                        panel_inches: float = 5.0) -> Figure:
    """An `Attribution` over the original image, opaque where it is strong and clear where it is near zero.

    Signed maps (integrated gradients) use a diverging colormap symmetric about 0; non-negative maps
    (saliency, Grad-CAM) go from 0. Attributions are not probabilities: the scale is the `clip_percentile`
    percentile of |value| (None: the maximum), stated on the colorbar; pixel attributions are spiky, and the
    maximum alone would leave almost every pixel invisible. The cell of a fusion-weight attribution
    (`attribution.cell`) and an optional box (original pixels, e.g. the detection's) are outlined.
    """
    values = attribution.to_original(transform, "nearest" if attribution.grid is not None else "linear")
    magnitude = np.abs(values)
    scale = float(np.percentile(magnitude, clip_percentile) if clip_percentile is not None else magnitude.max())
    scale = scale or float(magnitude.max()) or 1.0
    signed = attribution.signed
    norm = mcolors.Normalize(-scale, scale) if signed else mcolors.Normalize(0.0, scale)
    colormap = _colormap(cmap or (SIGNED_CMAP if signed else WEIGHT_CMAP))
    overlay = colormap(norm(values))
    overlay[..., 3] = alpha * np.clip(magnitude / scale, 0.0, 1.0)
    figure = _figure_for(image, panel_inches=panel_inches)
    ax = figure.add_subplot()
    _show_image(ax, image)
    ax.imshow(overlay, extent=_image_extent(image), interpolation="nearest")
    clipped = "" if clip_percentile is None else f", clipped at the {clip_percentile:g}th percentile of |value|"
    figure.colorbar(ScalarMappable(norm, colormap), ax=ax, label=f"{attribution.method}{clipped}", fraction=0.046,
                    pad=0.02)
    outline = {"fill": False, "linewidth": 1.5, "edgecolor": "black"}
    cell = getattr(attribution, "cell", None)
    if cell is not None and attribution.stride is not None:
        stride = attribution.stride
        row, col = cell
        ax.add_patch(Rectangle((col * stride * transform.scale_x, row * stride * transform.scale_y),
                               stride * transform.scale_x, stride * transform.scale_y, **outline))
    if box_xyxy is not None:
        box = drawable_box(box_xyxy, image.shape)
        if box is not None:
            ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], linestyle="--", **outline))
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_title(title if title is not None else attribution.target, fontsize=9)
    return figure


def grad_cam_figure(image: np.ndarray, attributions: Sequence, transform, *, alpha: float = 0.55,
                    cmap: str = WEIGHT_CMAP, panel_inches: float = 3.5) -> Figure:
    """Grad-CAM of each level side by side, on one colour scale (0 to the largest value of all levels)."""
    figure = _figure_for(image, 1, len(attributions), panel_inches=panel_inches)
    axes = figure.subplots(1, len(attributions), squeeze=False)[0]
    top = max(float(a.grid.max()) for a in attributions) or 1.0
    mappable = None
    for ax, attribution in zip(axes, attributions, strict=True):
        _show_image(ax, image)
        mappable = _overlay(ax, image, attribution.to_original(transform, "nearest"), cmap=cmap, vmin=0.0, vmax=top,
                            alpha=alpha)
        ax.set_title(f"Grad-CAM {LEVEL_NAMES[attribution.level]}", fontsize=9)
    figure.colorbar(mappable, ax=list(axes), label=f"Grad-CAM (max {top:.3g})", shrink=0.8)
    return figure
