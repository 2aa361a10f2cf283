"""The paper's Figure 3 for print: the 3 x 3 fusion-weight maps of one image, the dominant-source overview of
several, and a grid of detections. Pure functions returning matplotlib Figures (see `plots`)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .palette import OKABE_ITO, SOURCE_COLORS, WEIGHT_CMAP
from .plots import LABEL_FONTSIZE
from .style import DOUBLE_WIDTH, LEVEL_LABELS, SHORT_LEVEL_LABELS, new_figure
from .traces import draw_detections_on


def _outline_level_boxes(ax, records, level: int, width: float, height: float, *, color: str,
                         linewidth: float) -> None:
    """Outline the boxes of the detections made at `level` on a map drawn over the image; no axes."""
    for record in records:
        if record.level == level:
            x1, y1, x2, y2 = (float(v) for v in record.box_xyxy)
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=linewidth))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    _hide_axes(ax)


def _hide_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(0.4)


def figure3(trace, *, score_threshold: float = 0.3, max_detections: int = 20, map_width: float | None = None
            ) -> Figure:
    """The paper's Figure 3 for one image: detections (left) and the 3 x 3 fusion weight maps (right).

    Maps are drawn on the original image's extent, one cell per rectangle (nearest), fixed 0..1 scale, one
    colorbar; row = target level, column = source level. The boxes a target level produced are outlined in
    white on that level's row, so each detection can be traced to the weights that fed it.
    """
    image = trace.image
    height, width = image.shape[:2]
    aspect = height / width
    map_width = map_width or (DOUBLE_WIDTH - 0.75) / 6
    map_height = map_width * aspect
    figure = new_figure(6 * map_width + 0.75, 3 * map_height + 0.35)
    grid = figure.add_gridspec(3, 7, width_ratios=[1, 1, 1, 1, 1, 1, 0.12])
    detections_ax = figure.add_subplot(grid[:, 0:3])
    detections_ax.imshow(image, extent=(0, width, height, 0), interpolation="antialiased")
    kept = [r for r in trace.detections if r.score >= score_threshold][:max_detections]
    draw_detections_on(detections_ax, kept, linewidth=0.8, fontsize=LABEL_FONTSIZE, image_shape=image.shape)
    detections_ax.set_xlim(0, width)
    detections_ax.set_ylim(height, 0)
    _hide_axes(detections_ax)
    detections_ax.set_title(f"detections (score $\\geq$ {score_threshold:g})")
    mappable = None
    for target in range(3):
        on_image = trace.transform.map_to_original(trace.fusion_weights[target], "nearest")
        for source in range(3):
            ax = figure.add_subplot(grid[target, 3 + source])
            mappable = ax.imshow(on_image[source], extent=(0, width, height, 0), cmap=WEIGHT_CMAP, vmin=0.0,
                                 vmax=1.0, interpolation="nearest")
            _outline_level_boxes(ax, kept, target, width, height, color="white", linewidth=0.6)
            if target == 0:
                ax.set_title(f"source {SHORT_LEVEL_LABELS[source]}", color=SOURCE_COLORS[source])
            if source == 0:
                ax.set_ylabel(f"target {SHORT_LEVEL_LABELS[target]}")
    colorbar_ax = figure.add_subplot(grid[:, 6])
    figure.colorbar(mappable, cax=colorbar_ax, label="fusion weight", ticks=[0, 0.25, 0.5, 0.75, 1])
    return figure


def dominant_source_image(weights: np.ndarray) -> np.ndarray:
    """(3, H, W) weights -> (H, W, 3) RGB: the colour of the largest-weight source, faded to white as the
    weights approach uniform (max weight 1/3 = white, 1 = full colour)."""
    weights = np.asarray(weights, dtype=np.float64)
    dominant = weights.argmax(axis=0)
    strength = np.clip((weights.max(axis=0) - 1 / 3) / (2 / 3), 0.0, 1.0)[..., None]
    palette = np.array([mcolors.to_rgb(c) for c in SOURCE_COLORS])
    return (1 - strength) * 1.0 + strength * palette[dominant]


def figure3_overview(traces, names: Sequence[str], *, score_threshold: float = 0.3, max_detections: int = 20,
                     width: float = DOUBLE_WIDTH) -> Figure:
    """Several images, one per row: detections, then the dominant source of each target level.

    A cell's colour is the source level with the largest weight; its saturation grows with that weight (white
    = all three equal, full colour = one source only). The full 3 x 3 maps of each image are in its own
    `figure3` figure.
    """
    columns = 4
    panel = (width - 0.1) / columns
    heights = [panel * t.image.shape[0] / t.image.shape[1] for t in traces]
    figure = new_figure(width, sum(heights) + 0.55)
    grid = figure.add_gridspec(len(traces), columns, height_ratios=heights)
    for row, (trace, name) in enumerate(zip(traces, names, strict=True)):
        image = trace.image
        height, image_width = image.shape[:2]
        ax = figure.add_subplot(grid[row, 0])
        ax.imshow(image, extent=(0, image_width, height, 0), interpolation="antialiased")
        kept = [r for r in trace.detections if r.score >= score_threshold][:max_detections]
        draw_detections_on(ax, kept, linewidth=0.7, fontsize=LABEL_FONTSIZE, show_level=False,
                           image_shape=image.shape)
        ax.set_xlim(0, image_width)
        ax.set_ylim(height, 0)
        _hide_axes(ax)
        ax.set_ylabel(name, fontsize=6)
        if row == 0:
            ax.set_title("detections")
        for target in range(3):
            ax = figure.add_subplot(grid[row, 1 + target])
            on_image = trace.transform.map_to_original(trace.fusion_weights[target], "nearest")
            ax.imshow(dominant_source_image(on_image), extent=(0, image_width, height, 0), interpolation="nearest")
            _outline_level_boxes(ax, kept, target, image_width, height, color="black", linewidth=0.5)
            if row == 0:
                ax.set_title(f"target {LEVEL_LABELS[target]}: dominant source")
    handles = [Patch(facecolor=c, label=f"source {n}") for c, n in zip(SOURCE_COLORS, LEVEL_LABELS, strict=True)]
    handles.append(Patch(facecolor="white", edgecolor=OKABE_ITO["grey"], label="uniform (1/3 each)"))
    figure.legend(handles=handles, loc="outside lower center", ncol=4, handlelength=1.0,
                  title="colour = largest weight, saturation = its size (1/3 to 1)")
    return figure


def detections_grid(images: Sequence[np.ndarray], ground_truths: Sequence, results: Sequence[Sequence],
                    variant_labels: Sequence[str], *, class_names: Sequence[str], score_threshold: float = 0.3,
                    max_detections: int = 20, width: float | None = None, max_panel: float = 2.35) -> Figure:
    """Rows = images, columns = models or fusion modes: detections (coloured by class) over dashed ground truth.

    ground_truths: per image a `GroundTruth` (original pixels); results[i][j]: the `ImageResult` of image i
    under variant j. Panels are at most `max_panel` inches wide, so two variants fit a column and a half.
    """
    columns = len(variant_labels)
    width = width or min(DOUBLE_WIDTH, columns * max_panel + 0.1)
    panel = (width - 0.1) / max(columns, 1)
    heights = [panel * image.shape[0] / image.shape[1] for image in images]
    figure = new_figure(width, sum(heights) + 0.3)
    grid = figure.add_gridspec(len(images), columns, height_ratios=heights)
    for row, (image, truth) in enumerate(zip(images, ground_truths, strict=True)):
        height, image_width = image.shape[:2]
        for column in range(columns):
            ax = figure.add_subplot(grid[row, column])
            ax.imshow(image, extent=(0, image_width, height, 0), interpolation="antialiased")
            for box in truth.boxes:
                x1, y1, x2, y2 = (float(v) for v in box)
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=0.6,
                                       linestyle=(0, (2, 1.5))))
            result = results[row][column]
            order = np.argsort(-result.scores, kind="stable")
            # The same drawing (class colours, readable and non-overlapping labels) as every other figure.
            records = [SimpleNamespace(box_xyxy=result.boxes[i], score=float(result.scores[i]),
                                       label=int(result.labels[i]), level=int(result.levels[i]),
                                       class_name=class_names[int(result.labels[i])]
                                       if int(result.labels[i]) < len(class_names) else str(int(result.labels[i])))
                       for i in order if np.isfinite(result.boxes[i]).all()]
            draw_detections_on(ax, records, max_detections=max_detections, score_threshold=score_threshold,
                               show_level=False, linewidth=0.8, fontsize=LABEL_FONTSIZE, image_shape=image.shape)
            ax.set_xlim(0, image_width)
            ax.set_ylim(height, 0)
            _hide_axes(ax)
            if row == 0:
                ax.set_title(variant_labels[column])
    return figure
