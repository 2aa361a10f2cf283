"""Pictures of one `Trace` (fusion weights, Figure 3, composites, entropy, detections, counterfactuals): pure
functions returning figures; gradient flows and attributions are drawn by `asff_viz.figures.gradients`.

They build a `matplotlib.figure.Figure` directly (never `pyplot`): nothing is shown, no global figure state is
left behind, and a figure is freed as soon as the caller drops it. `figure_to_png` renders one to PNG bytes.
The app's interactive charts are `asff_viz.app.charts`.

Conventions:
* Fusion weights are probabilities: always drawn on a fixed 0..1 scale with a colorbar, never stretched to
  each map's own minimum and maximum. The default colormap, viridis, is perceptually uniform and
  colour-blind safe; any matplotlib / plotly name can be passed instead.
* Images are RGB (as `asff_viz.inference.transforms.read_image` returns them); nothing here reorders channels,
  except for the one PNG encoding through OpenCV, which expects BGR and is converted explicitly.
* Coordinates are original-image pixels with pixel i spanning [i, i + 1], the convention of the boxes; maps
  are placed with `ImageTransform.map_to_original`, so each cell covers exactly its footprint on the image.
* Level 0 is stride 32; in a 3x3 grid rows are target levels and columns source levels (the paper's Figure 3).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

import cv2
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..inference.transforms import ImageTransform
from ..introspection.capture import LEVEL_NAMES
from ..introspection.trace import Trace, fusion_entropy
from .palette import (
    ENTROPY_CMAP,
    WEIGHT_CMAP,
    class_color,
    label_text_color,
)

SOURCE_COLOR_NAMES = ("red", "green", "blue")
WEIGHT_LABEL = "fusion weight (0..1)"




def composite_rgb(weights: np.ndarray) -> np.ndarray:
    """(3, H, W) weights -> (H, W, 3) float in [0, 1]: red = source stride 32, green = 16, blue = 8."""
    return np.clip(np.moveaxis(np.asarray(weights, dtype=np.float32), 0, -1), 0.0, 1.0)


def weight_overlay_array(image: np.ndarray, weight_map: np.ndarray, alpha: float = 0.5,
                         cmap: str = WEIGHT_CMAP) -> np.ndarray:
    """Blend a (H, W) map in [0, 1] (fixed scale) over an RGB uint8 image -> RGB uint8 (H, W, 3)."""
    colored = _colormap(cmap)(np.clip(np.asarray(weight_map, dtype=np.float64), 0.0, 1.0))[..., :3]
    blended = (1.0 - alpha) * (image.astype(np.float64) / 255.0) + alpha * colored
    return np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8)


def figure_to_png(figure: Figure, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _colormap(name):
    from matplotlib import colormaps

    return colormaps[name] if isinstance(name, str) else name


def _image_extent(image: np.ndarray) -> tuple[float, float, float, float]:
    height, width = image.shape[:2]
    return (0.0, float(width), float(height), 0.0)


def _figure_for(image: np.ndarray, rows: int = 1, cols: int = 1, panel_inches: float = 4.0,
                extra_width: float = 1.0) -> Figure:
    height, width = image.shape[:2]
    aspect = height / width
    return Figure(figsize=(cols * panel_inches + extra_width, rows * panel_inches * aspect + 0.6),
                  layout="constrained")


def _show_image(ax, image: np.ndarray) -> None:
    ax.imshow(image, extent=_image_extent(image), interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _overlay(ax, image: np.ndarray, values: np.ndarray, *, cmap, vmin: float, vmax: float, alpha: float):
    return ax.imshow(values, extent=_image_extent(image), cmap=_colormap(cmap), vmin=vmin, vmax=vmax,
                     alpha=alpha, interpolation="nearest")


def _check_level(level: int, name: str = "level") -> int:
    if level not in (0, 1, 2):
        raise ValueError(f"{name} must be 0 (stride 32), 1 (stride 16) or 2 (stride 8), got {level!r}")
    return int(level)


def _trace_title(trace: Trace) -> str:
    counterfactual = trace.counterfactual
    return "" if counterfactual.is_learned else f" [{counterfactual.describe()}]"




def drawable_box(box_xyxy, image_shape: tuple[int, ...] | None = None) -> tuple[float, float, float, float] | None:
    """A box clipped to a margin of one image size around the image (None if it has NaN coordinates).

    Untrained or diverging models can predict boxes millions of pixels wide (or infinite, when exp()
    overflows); drawing them as they are breaks the figure's transforms.
    """
    box = np.asarray(box_xyxy, dtype=np.float64)
    if np.isnan(box).any():
        return None
    if image_shape is None:
        limit_x = limit_y = 1e6
    else:
        limit_y, limit_x = float(image_shape[0]), float(image_shape[1])
    x1, x2 = np.clip(box[[0, 2]], -limit_x, 2 * limit_x)
    y1, y2 = np.clip(box[[1, 3]], -limit_y, 2 * limit_y)
    return float(x1), float(y1), float(x2), float(y2)


def drawable_records(records: Sequence, score_threshold: float, max_detections: int | None,
                     image_shape: tuple[int, ...] | None) -> Iterator[tuple[object, tuple[float, float, float, float]]]:
    """(record, drawable box) of the records at or above `score_threshold`, at most `max_detections` of them."""
    yielded = 0
    for record in records:
        if record.score < score_threshold:
            continue
        if max_detections is not None and yielded >= max_detections:
            return
        box = drawable_box(record.box_xyxy, image_shape)
        if box is None:
            continue
        yielded += 1
        yield record, box


def draw_detections_on(ax, records: Sequence, *, max_detections: int | None = None, score_threshold: float = 0.0,
                       show_level: bool = True, linewidth: float = 2.0, fontsize: float = 8.0,
                       image_shape: tuple[int, ...] | None = None) -> int:
    """Draw `DetectionRecord` boxes (original pixels) with class, score and level on a matplotlib axes.

    image_shape: (H, W, ...) of the image under the boxes, so that labels of boxes reaching past its top or
    right edge are drawn inside it. Labels read on their class colour (black or white text); a label that would
    cover one already drawn goes just inside its box's top edge instead, and is left out (the box stays) when
    that overlaps too. Returns the number of boxes drawn.
    """
    height, width = (image_shape[0], image_shape[1]) if image_shape is not None else (math.inf, math.inf)
    drawn, placed = 0, []
    points_to_data = _points_to_data(ax)
    for record, (x1, y1, x2, y2) in drawable_records(records, score_threshold, max_detections, image_shape):
        color = class_color(record.label)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth))
        drawn += 1
        text = f"{record.class_name} {record.score:.2f}"
        if show_level:
            text += f" | s{LEVEL_NAMES[record.level].split()[-1]}"
        # From the box's left edge, or ending at its right edge in the right part of the image.
        right_side = math.isfinite(width) and x1 > 0.55 * width
        label_x = min(max(x2 if right_side else x1, 0.0), max(width, 0.0))
        label_w = 0.6 * fontsize * len(text) * points_to_data[0]
        label_h = 1.5 * fontsize * points_to_data[1]
        left = label_x - label_w if right_side else label_x
        # Above the box's top edge, or just inside it when that edge is at the top of the image or taken.
        candidates = [] if y1 < label_h else [(y1 - label_h, "bottom")]
        candidates.append((min(max(y1, 0.0), max(height - label_h, 0.0)), "top"))
        for top, anchor in candidates:
            rectangle = (left, top, left + label_w, top + label_h)
            if not any(_overlap(rectangle, other) for other in placed):
                placed.append(rectangle)
                ax.text(label_x, top + (label_h if anchor == "bottom" else 0.0), text, fontsize=fontsize,
                        color=label_text_color(color), va=anchor, ha="right" if right_side else "left",
                        clip_on=True, bbox={"facecolor": color, "edgecolor": "none", "pad": 0.8, "alpha": 0.9})
                break
    return drawn


def _points_to_data(ax) -> tuple[float, float]:
    """Data units per typographic point along x and y on `ax` (its current size and limits)."""
    figure = ax.get_figure()
    box = ax.get_position()
    width_points = max(box.width * figure.get_figwidth() * 72, 1e-9)
    height_points = max(box.height * figure.get_figheight() * 72, 1e-9)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    return abs(x1 - x0) / width_points, abs(y1 - y0) / height_points


def _overlap(first: tuple, second: tuple) -> bool:
    return first[0] < second[2] and second[0] < first[2] and first[1] < second[3] and second[1] < first[3]


def draw_detections(image: np.ndarray, records: Sequence, *, max_detections: int | None = 50,
                    score_threshold: float = 0.0, title: str | None = None, panel_inches: float = 6.0) -> Figure:
    """The RGB image with boxes and labels of `DetectionRecord`s (by decreasing score, up to max_detections)."""
    figure = _figure_for(image, panel_inches=panel_inches, extra_width=0.0)
    ax = figure.add_subplot()
    _show_image(ax, image)
    count = draw_detections_on(ax, records, max_detections=max_detections, score_threshold=score_threshold,
                               image_shape=image.shape)
    ax.set_xlim(0, image.shape[1])
    ax.set_ylim(image.shape[0], 0)
    ax.set_title(title if title is not None else f"{count} detections")
    return figure




def draw_detections_side_by_side(image: np.ndarray, panels: Sequence[tuple[str, Sequence]], *,
                                 max_detections: int | None = 50, panel_inches: float = 4.0) -> Figure:
    """The same image once per (title, `DetectionRecord`s) panel, side by side: two models on one image."""
    figure = _figure_for(image, cols=len(panels), panel_inches=panel_inches, extra_width=0.0)
    for index, (title, records) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), index + 1)
        _show_image(ax, image)
        count = draw_detections_on(ax, records, max_detections=max_detections, image_shape=image.shape)
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
        ax.set_title(f"{title}: {count} detections")
    return figure


def _draw_records(ax, trace: Trace, records: Sequence | None, show_detections: bool) -> None:
    """The detections of a fusion figure: `records` when given (what a view shows), else with
    `show_detections` the trace's best 20 of every level."""
    if records is None and not show_detections:
        return
    draw_detections_on(ax, trace.detections if records is None else records,
                       max_detections=20 if records is None else None, image_shape=trace.image.shape)
    ax.set_xlim(0, trace.image.shape[1])
    ax.set_ylim(trace.image.shape[0], 0)


def downscaled_for_export(trace: Trace, records: Sequence | None = None, max_side: int = 2048
                          ) -> tuple[Trace, list | None, float]:
    """A copy of `trace` (and `records`) whose image is at most `max_side` pixels on its long side, for figures.

    Drawing an 8000 x 8000 photo with cell-exact maps takes minutes and gives a file no page can show; the
    maps keep their cells (they are mapped onto the smaller image exactly), boxes are scaled. Returns
    (trace, records, factor): factor 1.0 when nothing changed, else the original / shown size.
    """
    height, width = trace.image.shape[:2]
    factor = max(height, width) / max_side
    if factor <= 1.0:
        return trace, None if records is None else list(records), 1.0
    new_width, new_height = max(1, round(width / factor)), max(1, round(height / factor))
    image = cv2.resize(trace.image, (new_width, new_height), interpolation=cv2.INTER_AREA)
    scale = np.array([new_width / width, new_height / height] * 2)

    def scaled(record):
        return replace(record, box_xyxy=np.asarray(record.box_xyxy, dtype=np.float64) * scale)

    transform = ImageTransform(new_height, new_width, trace.transform.size)
    view = replace(trace, image=image, transform=transform, detections=[scaled(r) for r in trace.detections])
    return view, None if records is None else [scaled(r) for r in records], factor


def note_scale(figure: Figure, factor: float, original_shape: tuple[int, ...]) -> None:
    """State on `figure` that its image was drawn downscaled (`downscaled_for_export`)."""
    if factor > 1.0:
        figure.text(0.01, 0.005, f"image shown at 1/{factor:.2g} of its {original_shape[1]}x{original_shape[0]} px",
                    fontsize=7, ha="left", va="bottom", color="0.3")


def weight_overlay(trace: Trace, level: int, source: int, alpha: float = 0.5, cmap: str = WEIGHT_CMAP, *,
                   show_detections: bool = False, records: Sequence | None = None, interpolation: str = "nearest",
                   panel_inches: float = 5.0) -> Figure:
    """One fusion weight map alpha^level_source over the original image, fixed 0..1 scale, with colorbar.

    `records` draws those detections (of every level); `show_detections` without records draws the best 20.
    """
    level, source = _check_level(level), _check_level(source, "source")
    figure = _figure_for(trace.image, panel_inches=panel_inches)
    ax = figure.add_subplot()
    _show_image(ax, trace.image)
    weights = trace.weights_on_original(level, interpolation)[source]
    mappable = _overlay(ax, trace.image, weights, cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha)
    _draw_records(ax, trace, records, show_detections)
    figure.colorbar(mappable, ax=ax, label=WEIGHT_LABEL, fraction=0.046, pad=0.02)
    ax.set_title(f"level {LEVEL_NAMES[level]}: weight of source {LEVEL_NAMES[source]}{_trace_title(trace)}")
    return figure


def figure3_grid(trace: Trace, alpha: float = 0.5, cmap: str = WEIGHT_CMAP, *, weights: list | None = None,
                 panel_inches: float = 3.0) -> Figure:
    """The paper's Figure 3: 3x3 weight overlays, row = target level, column = source level, one 0..1 colorbar.

    weights: 3 arrays (3, H_l, W_l) to draw instead of `trace.fusion_weights` (e.g. `trace.learned_weights`).
    """
    weights = trace.fusion_weights if weights is None else weights
    figure = _figure_for(trace.image, 3, 3, panel_inches=panel_inches)
    axes = figure.subplots(3, 3, squeeze=False)
    mappable = None
    for level in range(3):
        on_image = trace.transform.map_to_original(weights[level], "nearest")
        for source in range(3):
            ax = axes[level][source]
            _show_image(ax, trace.image)
            mappable = _overlay(ax, trace.image, on_image[source], cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha)
            if level == 0:
                ax.set_title(f"source {LEVEL_NAMES[source]}", fontsize=10)
            if source == 0:
                ax.set_ylabel(f"target {LEVEL_NAMES[level]}", fontsize=10)
    figure.colorbar(mappable, ax=axes, label=WEIGHT_LABEL, shrink=0.8)
    figure.suptitle(f"ASFF fusion weights{_trace_title(trace)}")
    return figure


def rgb_composite(trace: Trace, level: int, *, alpha: float = 0.75, records: Sequence | None = None,
                  panel_inches: float = 5.0) -> Figure:
    """The three weights of `level` as one RGB picture (red = stride 32, green = 16, blue = 8 source).

    Pure red/green/blue = one source chosen; mixed colours = a blend. `alpha` blends it over the image
    (1.0 = the composite alone). Red/green is hard for some readers: `figure3_grid` shows the same data.
    """
    level = _check_level(level)
    composite = composite_rgb(trace.weights_on_original(level, "nearest"))
    blended = (1.0 - alpha) * trace.image.astype(np.float32) / 255.0 + alpha * composite
    figure = _figure_for(trace.image, panel_inches=panel_inches, extra_width=0.0)
    ax = figure.add_subplot()
    ax.imshow(np.clip(blended, 0.0, 1.0), extent=_image_extent(trace.image), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    handles = [Patch(facecolor=color, label=f"source {name}")
               for color, name in zip(SOURCE_COLOR_NAMES, LEVEL_NAMES, strict=True)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    _draw_records(ax, trace, records, False)
    ax.set_title(f"level {LEVEL_NAMES[level]}: weights as RGB{_trace_title(trace)}")
    return figure


def entropy_map(trace: Trace, level: int, *, alpha: float = 0.6, cmap: str = ENTROPY_CMAP,
                records: Sequence | None = None, panel_inches: float = 5.0) -> Figure:
    """How decided the fusion of `level` is: entropy of its weights / log 3 (0 = one source, 1 = uniform)."""
    level = _check_level(level)
    entropy = trace.transform.map_to_original(fusion_entropy(trace.fusion_weights[level]), "nearest")
    figure = _figure_for(trace.image, panel_inches=panel_inches)
    ax = figure.add_subplot()
    _show_image(ax, trace.image)
    mappable = _overlay(ax, trace.image, entropy, cmap=cmap, vmin=0.0, vmax=1.0, alpha=alpha)
    _draw_records(ax, trace, records, False)
    figure.colorbar(mappable, ax=ax, label="entropy / log 3 (0 = one source, 1 = uniform)", fraction=0.046, pad=0.02)
    ax.set_title(f"level {LEVEL_NAMES[level]}: fusion entropy{_trace_title(trace)}")
    return figure


def counterfactual_comparison(traces: Sequence[Trace], *, max_detections: int = 20,
                              score_threshold: float = 0.1, panel_inches: float = 4.0) -> Figure:
    """Detections of the same image under several counterfactuals, side by side (titles name each)."""
    if not traces:
        raise ValueError("counterfactual_comparison needs at least one trace")
    image = traces[0].image
    figure = _figure_for(image, 1, len(traces), panel_inches=panel_inches, extra_width=0.0)
    axes = figure.subplots(1, len(traces), squeeze=False)[0]
    for ax, trace in zip(axes, traces, strict=True):
        _show_image(ax, trace.image)
        count = draw_detections_on(ax, trace.detections, max_detections=max_detections,
                                   score_threshold=score_threshold, image_shape=trace.image.shape)
        ax.set_xlim(0, image.shape[1])
        ax.set_ylim(image.shape[0], 0)
        ax.set_title(f"{trace.counterfactual.describe()}\n{count} boxes >= {score_threshold:g}", fontsize=9)
    return figure






