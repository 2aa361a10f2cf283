"""Publication figures of the analyses: pure functions of summaries and arrays returning matplotlib Figures.

Call them inside `style.publication_style()` (the commands do), then `style.save_figure`. No function touches
pyplot, so nothing is shown and no global figure state is left behind.

Conventions: level 0 = stride 32; in 3 x 3 layouts rows are target levels and columns source levels (the
paper's Figure 3); fusion weights are always on the fixed scale 0..1; each source level keeps its colour
(`palette.SOURCE_COLORS`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ..analyze.cells import FINE_SIZE_EDGES
from ..analyze.flow_statistics import REGIONS
from ..analyze.fusion_statistics import WeightSummary
from .palette import MAGNITUDE_CMAP, OKABE_ITO, SOURCE_COLORS, WEIGHT_CMAP, category_color
from .style import COLUMN_WIDTH, DOUBLE_WIDTH, LEVEL_LABELS, SHORT_LEVEL_LABELS, new_figure
from .traces import draw_detections_on

LABEL_FONTSIZE = 6.0  # detection labels: the smallest size a printed figure stays readable at

WEIGHT_AXIS_LABEL = "fusion weight"


# -------------------------------------------------------------------------------------------- helpers

LINE_STYLES = ("-", "--", ":", "-.")


def _log_axis(axis) -> None:
    """Log ticks at 1, 2, 5 x 10^n labelled as plain numbers (no '6 x 10^0' minor labels)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


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


def _integer_axis(axis) -> None:
    axis.set_major_locator(MaxNLocator(nbins=5, integer=True))  # few enough to stay apart on narrow panels


def _violin_stats(summary: WeightSummary, target: int, source: int) -> dict | None:
    """matplotlib `violin` statistics of one (target, source) weight distribution from its histogram."""
    histogram = summary.histogram[target, source].astype(np.float64)
    total = histogram.sum()
    if total <= 0:
        return None
    bins = len(histogram)
    # The outline is lightly smoothed (Gaussian, sigma = 1 bin = 0.02) so that a few boxes do not draw a comb;
    # the quartiles drawn on top come from the unsmoothed histogram.
    offsets = np.arange(-3, 4)
    kernel = np.exp(-0.5 * offsets.astype(np.float64) ** 2)
    padded = np.pad(histogram, 3, mode="reflect")
    density = np.convolve(padded, kernel / kernel.sum(), mode="valid") / total * bins
    centres = (np.arange(bins) + 0.5) / bins
    filled = np.nonzero(histogram)[0]
    low, high = filled[0] / bins, (filled[-1] + 1) / bins
    # Close the outline at the data's extent so that a one-bin distribution (one-hot) is a flat disc.
    coords = np.concatenate([[low], centres[filled[0]:filled[-1] + 1], [high]])
    values = np.concatenate([[density[filled[0]]], density[filled[0]:filled[-1] + 1], [density[filled[-1]]]])
    q = summary.quantiles[target, source]
    return {"coords": coords, "vals": values, "mean": float(summary.mean[target, source]), "median": float(q[2]),
            "min": low, "max": high}


def violin_grid(groups: Sequence[tuple[str, WeightSummary]], *, tick_labels: Sequence[str] | None = None,
                xlabel: str = "", width: float = COLUMN_WIDTH, height: float = 3.1) -> Figure:
    """3 x 3 panels (row = target level, column = source level) of weight distributions, one violin per group.

    Each violin is the histogram of the per-box mean weights of a group (density scaled to the violin's
    width); the black bar spans the quartiles, the thin line the 5-95 % range, the white dot is the median.
    """
    figure = new_figure(width, height)
    axes = figure.subplots(3, 3, sharex=True, sharey=True)
    labels = list(tick_labels) if tick_labels is not None else [label for label, _ in groups]
    positions = np.arange(len(groups))
    for target in range(3):
        for source in range(3):
            ax = axes[target][source]
            for position, (_, summary) in zip(positions, groups, strict=True):
                stats = _violin_stats(summary, target, source)
                if stats is None:
                    continue
                parts = ax.violin([stats], positions=[position], widths=0.8, showmeans=False, showextrema=False,
                                  showmedians=False)
                for body in parts["bodies"]:
                    body.set_facecolor(SOURCE_COLORS[source])
                    body.set_edgecolor(SOURCE_COLORS[source])
                    body.set_alpha(0.55)
                    body.set_linewidth(0.5)
                q = summary.quantiles[target, source]
                ax.vlines(position, q[0], q[4], color="black", linewidth=0.5)
                ax.vlines(position, q[1], q[3], color="black", linewidth=2.0)
                ax.plot(position, q[2], "o", color="white", markersize=1.8, markeredgewidth=0)
            ax.set_ylim(-0.03, 1.03)
            ax.set_yticks([0, 0.5, 1])
            ax.set_xticks(positions, labels)
            ax.set_xlim(-0.6, len(groups) - 0.4)
            ax.axhline(1 / 3, color=OKABE_ITO["grey"], linewidth=0.4, linestyle=":", zorder=0)
            if target == 0:
                ax.set_title(f"source {SHORT_LEVEL_LABELS[source]}", color=SOURCE_COLORS[source])
            if source == 0:
                ax.set_ylabel(f"target {SHORT_LEVEL_LABELS[target]}\n{WEIGHT_AXIS_LABEL}")
    if xlabel:
        figure.supxlabel(xlabel, fontsize=7)
    return figure


def composition_bars(rows: Sequence[tuple[str, Sequence[tuple[str, WeightSummary]]]], *, xlabel: str = "",
                     tick_labels: Sequence[str] | None = None, width: float = COLUMN_WIDTH,
                     row_height: float = 1.25, min_count: int = 1) -> Figure:
    """Stacked bars of the mean weight of each source (summing to 1) per group, one panel per target level.

    rows: [(row label, [(group label, WeightSummary)])]: several rows compare models or fusion modes; each row
    is titled with its label. The number of boxes of each group is written above its bar.
    """
    titled = len(rows) > 1 or bool(rows[0][0])
    figure = new_figure(width, (row_height + (0.15 if titled else 0.0)) * len(rows) + 0.45)
    subfigures = figure.subfigures(len(rows), 1, squeeze=False)[:, 0] if len(rows) > 1 else [figure]
    for (row_label, groups), subfigure in zip(rows, subfigures, strict=True):
        axes = subfigure.subplots(1, 3, sharey=True)
        if titled:
            subfigure.suptitle(row_label, fontweight="bold", x=0.02, ha="left")
        positions = np.arange(len(groups))
        for target in range(3):
            ax = axes[target]
            bottom = np.zeros(len(groups))
            for source in range(3):
                heights = np.array([s.mean[target, source] if s.count >= min_count else 0.0 for _, s in groups])
                heights = np.nan_to_num(heights)
                ax.bar(positions, heights, bottom=bottom, width=0.75, color=SOURCE_COLORS[source],
                       edgecolor="white", linewidth=0.3, label=f"source {LEVEL_LABELS[source]}")
                bottom += heights
            for position, (_, summary) in zip(positions, groups, strict=True):
                ax.text(position, 1.01, f"{summary.count}", ha="center", va="bottom", fontsize=5.5,
                        color=OKABE_ITO["black"] if summary.count >= min_count else OKABE_ITO["grey"])
            ax.set_xticks(positions, list(tick_labels) if tick_labels is not None else [label for label, _ in groups])
            ax.set_ylim(0, 1.12)
            ax.set_yticks([0, 0.5, 1])
            ax.set_title(f"target {LEVEL_LABELS[target]}", pad=7)
            if target == 0:
                ax.set_ylabel("mean weight")
    handles = [Patch(facecolor=c, label=f"source {n}") for c, n in zip(SOURCE_COLORS, LEVEL_LABELS, strict=True)]
    figure.legend(handles=handles, loc="outside upper center", ncol=3, handlelength=1.0, columnspacing=1.0)
    if xlabel:
        figure.supxlabel(xlabel, fontsize=7)
    return figure


def _fine_size_centres() -> np.ndarray:
    """Geometric centres of the sqrt(area) bins, for a log axis (open ends get one half-octave)."""
    centres = []
    for low, high in zip(FINE_SIZE_EDGES[:-1], FINE_SIZE_EDGES[1:], strict=True):
        if low == 0:
            centres.append(high / math.sqrt(2))
        elif math.isinf(high):
            centres.append(low * math.sqrt(2))
        else:
            centres.append(math.sqrt(low * high))
    return np.asarray(centres)


def fine_size_lines(groups: Sequence[tuple[str, WeightSummary]], *, min_count: int = 5,
                    width: float = COLUMN_WIDTH, height: float = 1.55) -> Figure:
    """Mean weight of each source against object size (sqrt(area), log axis), one panel per target level.

    The band is the interquartile range; bins with fewer than `min_count` boxes are left out (gaps).
    Dotted lines mark COCO's small / medium / large boundaries (32 and 96 px).
    """
    figure = new_figure(width, height)
    axes = figure.subplots(1, 3, sharey=True)
    centres = _fine_size_centres()
    counts = np.array([s.count for _, s in groups])
    for target, ax in enumerate(axes):
        for source in range(3):
            mean = np.array([s.mean[target, source] for _, s in groups])
            low = np.array([s.quantiles[target, source, 1] for _, s in groups])
            high = np.array([s.quantiles[target, source, 3] for _, s in groups])
            shown = counts >= min_count
            mean, low, high = (np.where(shown, v, np.nan) for v in (mean, low, high))
            ax.fill_between(centres, low, high, color=SOURCE_COLORS[source], alpha=0.18, linewidth=0)
            ax.plot(centres, mean, marker="o", linestyle=LINE_STYLES[source], color=SOURCE_COLORS[source],
                    markersize=2.0, label=f"source {LEVEL_LABELS[source]}")
        for boundary in (32, 96):
            ax.axvline(boundary, color=OKABE_ITO["grey"], linewidth=0.5, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks([16, 64, 256], ["16", "64", "256"])
        ax.set_xticks([], minor=True)
        ax.set_xlim(centres[0] / 1.3, centres[-1] * 1.3)
        ax.set_ylim(0, 1)
        ax.set_yticks([0, 0.5, 1])
        ax.set_title(f"target {LEVEL_LABELS[target]}")
    axes[0].set_ylabel("mean weight")
    figure.supxlabel("object size $\\sqrt{\\mathrm{area}}$ (px)", fontsize=7)
    handles = [Line2D([], [], color=c, marker="o", linestyle=style, markersize=2.0, label=f"source {n}")
               for c, n, style in zip(SOURCE_COLORS, LEVEL_LABELS, LINE_STYLES, strict=False)]
    figure.legend(handles=handles, loc="outside upper center", ncol=3, handlelength=1.5, columnspacing=1.0)
    return figure


def class_heatmap(groups: Sequence[tuple[str, WeightSummary]], *, width: float = COLUMN_WIDTH,
                  annotate_limit: int = 24) -> Figure:
    """Mean weight per class (rows) and (target, source) pair (columns), fixed 0..1 scale.

    Classes without boxes are left out; the number of boxes follows each class name.
    """
    shown = [(name, s) for name, s in groups if s.count > 0]
    if not shown:
        shown = list(groups[:1])
    values = np.stack([s.mean.reshape(9) for _, s in shown])  # (classes, 9): target-major
    height = 0.55 + 0.16 * len(shown) + 0.35
    figure = new_figure(width, height)
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap=WEIGHT_CMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    if len(shown) <= annotate_limit:
        for (row, column), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=5.0,
                        color="black" if value > 0.6 else "white")
    ax.set_yticks(range(len(shown)), [f"{name} ({s.count})" for name, s in shown])
    ax.set_xticks(range(9), [SHORT_LEVEL_LABELS[k] for _ in range(3) for k in range(3)])
    ax.set_xlabel("source level")
    for boundary in (2.5, 5.5):
        ax.axvline(boundary, color="white", linewidth=1.5)
    for target in range(3):
        ax.text(target * 3 + 1, -0.7, f"target {LEVEL_LABELS[target]}", ha="center", va="bottom", fontsize=6.5)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    figure.colorbar(image, ax=ax, label="mean fusion weight", fraction=0.05, pad=0.02, ticks=[0, 0.5, 1])
    return figure


# --------------------------------------------------------------------------------------------- Figure 3


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


# ----------------------------------------------------------------------------------------- gradient flow


def share_matrices(shares: Sequence[tuple[str, np.ndarray]], *, width: float = COLUMN_WIDTH) -> Figure:
    """One 3 x 3 panel per fusion mode: the share of source k's value-path gradient energy from target l.

    Columns sum to 1; fixed 0..1 scale, annotated.
    """
    figure = new_figure(width, 1.45 if len(shares) <= 3 else 1.3)
    axes = figure.subplots(1, len(shares), squeeze=False)[0]
    image = None
    for ax, (label, matrix) in zip(axes, shares, strict=True):
        image = ax.imshow(matrix, cmap=MAGNITUDE_CMAP, vmin=0.0, vmax=1.0)
        for (row, column), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=5.5,
                        color="black" if value > 0.55 else "white")
        ax.set_xticks(range(3), SHORT_LEVEL_LABELS)
        ax.set_yticks(range(3), SHORT_LEVEL_LABELS)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(label)
        ax.set_xlabel("source")
    axes[0].set_ylabel("target")
    figure.colorbar(image, ax=list(axes), label="share of gradient energy", ticks=[0, 0.5, 1], fraction=0.05,
                    pad=0.03)
    return figure


def conflict_bars(modes: Sequence[str], rates: np.ndarray, lower: np.ndarray, upper: np.ndarray, *,
                  regions: Sequence[int] = (0, 1, 2), colors: Sequence[str] | None = None,
                  width: float = COLUMN_WIDTH, height: float = 1.7) -> Figure:
    """Conflict rate per source level (panel) and region (group), one bar per fusion mode, 95 % bootstrap CI.

    rates, lower, upper: (M modes, 3 sources, R regions).
    """
    colors = list(colors or [category_color(i) for i in range(len(modes))])
    figure = new_figure(width, height)
    axes = figure.subplots(1, 3, sharey=True)
    bar_width = 0.8 / len(modes)
    positions = np.arange(len(regions))
    for source, ax in enumerate(axes):
        for index, mode in enumerate(modes):
            values = rates[index, source, list(regions)]
            errors = np.stack([values - lower[index, source, list(regions)],
                               upper[index, source, list(regions)] - values])
            errors = np.nan_to_num(np.clip(errors, 0, None))
            offset = (index - (len(modes) - 1) / 2) * bar_width
            ax.bar(positions + offset, np.nan_to_num(values), width=bar_width, color=colors[index], label=mode,
                   yerr=errors, error_kw={"elinewidth": 0.5, "capsize": 1.0, "capthick": 0.5})
            for position, value in zip(positions + offset, values, strict=True):
                if not np.isfinite(value):  # a region with no location on this grid (see docs/analysis.md)
                    ax.text(position, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=4.5,
                            color=OKABE_ITO["grey"])
        ax.set_xticks(positions, [_region_short(REGIONS[r]) for r in regions])
        ax.set_title(f"source {LEVEL_LABELS[source]}")
        ax.set_ylim(0, 1)
        ax.set_yticks([0, 0.5, 1])
    axes[0].set_ylabel("conflict rate")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=len(modes),
                  handlelength=1.0)
    return figure


def paired_differences(controls: Sequence[str], estimates: np.ndarray, lower: np.ndarray, upper: np.ndarray, *,
                       reference: str = "learned", regions: Sequence[int] = (0, 1, 2), width: float = COLUMN_WIDTH,
                       height: float = 2.0) -> Figure:
    """Conflict rate of `reference` minus each control, per region (panel) and source level (group), with the
    95 % paired bootstrap interval; below zero = fewer conflicts than the control. A region with no location on
    a grid (object background at stride 32) is marked n/a.

    estimates, lower, upper: (M controls, 3 sources, R regions).
    """
    figure = new_figure(width, height)
    axes = np.atleast_1d(figure.subplots(1, len(regions), sharey=True))
    bar_width = 0.8 / max(len(controls), 1)
    positions = np.arange(3)
    for ax, region in zip(axes, regions, strict=True):
        ax.axhline(0.0, color=OKABE_ITO["grey"], linewidth=0.5)
        for index, control in enumerate(controls):
            values = estimates[index, :, region]
            shown = np.isfinite(values)
            errors = np.clip(np.stack([values - lower[index, :, region], upper[index, :, region] - values]), 0, None)
            offset = (index - (len(controls) - 1) / 2) * bar_width
            ax.errorbar((positions + offset)[shown], values[shown], yerr=np.nan_to_num(errors[:, shown]), fmt="o",
                        markersize=2.2, color=category_color(index), elinewidth=0.6, capsize=1.0,
                        label=control.replace("_", " "))
        for source in range(3):
            if not np.isfinite(estimates[:, source, region]).any():
                ax.text(source, 0.0, "n/a", ha="center", va="bottom", fontsize=5, color=OKABE_ITO["grey"])
        ax.set_xticks(positions, [SHORT_LEVEL_LABELS[source] for source in range(3)])
        ax.set_title(_region_short(REGIONS[region]))
    axes[0].set_ylabel(f"{reference} $-$ control\nconflict rate")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=3, handlelength=1.0,
                  columnspacing=0.8)
    return figure


def _region_short(name: str) -> str:
    return {"positive": "pos.", "object background": "obj. bg", "background": "bg"}.get(name, name)


def path_norms(modes: Sequence[str], norms: Sequence[dict], *, colors: Sequence[str] | None = None,
               width: float = COLUMN_WIDTH, height: float = 1.8) -> Figure:
    """Root-mean-square gradient norm reaching each source level by path, one bar per fusion mode (log axis).

    Paths: the value path from each target level, the whole fusion (value paths + weight branches), the
    neck's own top-down path, and the total.
    """
    colors = list(colors or [category_color(i) for i in range(len(modes))])
    labels = [f"from {s}" for s in SHORT_LEVEL_LABELS] + ["fusion", "neck", "total"]
    figure = new_figure(width, height)
    axes = figure.subplots(1, 3, sharey=True)
    bar_width = 0.8 / len(modes)
    positions = np.arange(len(labels))
    floor = None
    zeros, zero_marks = [], []  # a log axis cannot show 0 (the neck path into stride 8): it is written instead
    for source, ax in enumerate(axes):
        for index, (mode, norm) in enumerate(zip(modes, norms, strict=True)):
            values = np.concatenate([norm["value"][:, source], [norm["fusion_total"][source], norm["neck"][source],
                                                                norm["total"][source]]])
            positive = values[values > 0]
            if positive.size:
                floor = positive.min() if floor is None else min(floor, positive.min())
            offset = (index - (len(modes) - 1) / 2) * bar_width
            ax.bar(positions + offset, values, width=bar_width, color=colors[index], label=mode)
            zeros.extend(positions[values == 0])
        ax.set_xticks(positions, labels, rotation=60, ha="right", rotation_mode="anchor")
        zero_marks.append(zeros)
        zeros = []
        ax.set_title(f"source {LEVEL_LABELS[source]}")
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
    if floor is not None:
        axes[0].set_ylim(bottom=floor / 3)
        for ax, marks in zip(axes, zero_marks, strict=True):
            for position in sorted(set(marks)):
                ax.text(position, floor / 2.5, "0", ha="center", va="bottom", fontsize=5)
    axes[0].set_ylabel("RMS gradient norm")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", ncol=len(modes),
                  handlelength=1.0)
    return figure


# --------------------------------------------------------------------------------------------- evolution


def evolution_grid(epochs: Sequence[float], mean: np.ndarray, *, low: np.ndarray | None = None,
                   high: np.ndarray | None = None, size_labels: Sequence[str] = ("small", "medium", "large"),
                   xlabel: str = "epoch", width: float = COLUMN_WIDTH, height: float = 2.8) -> Figure:
    """Mean weight of each source over training: rows = target level, columns = object size.

    mean, low, high: (E epochs, 3 targets, S sizes, 3 sources); low/high (optional) draw a band (quartiles).
    """
    epochs = np.asarray(epochs, dtype=np.float64)
    figure = new_figure(width, height)
    axes = figure.subplots(3, len(size_labels), sharex=True, sharey=True, squeeze=False)
    for target in range(3):
        for size, label in enumerate(size_labels):
            ax = axes[target][size]
            for source in range(3):
                color = SOURCE_COLORS[source]
                if low is not None and high is not None:
                    ax.fill_between(epochs, low[:, target, size, source], high[:, target, size, source],
                                    color=color, alpha=0.18, linewidth=0)
                ax.plot(epochs, mean[:, target, size, source], marker="o", linestyle=LINE_STYLES[source],
                        color=color, markersize=1.8, label=f"source {LEVEL_LABELS[source]}")
            if not np.isfinite(mean[:, target, size]).any():
                ax.text(0.5, 0.5, "no boxes", transform=ax.transAxes, ha="center", va="center",
                        color=OKABE_ITO["grey"])
            ax.set_ylim(0, 1)
            ax.set_yticks([0, 0.5, 1])
            _integer_axis(ax.xaxis)
            if target == 0:
                ax.set_title(label)
            if size == 0:
                ax.set_ylabel(f"target {SHORT_LEVEL_LABELS[target]}\nmean weight")
    figure.supxlabel(xlabel, fontsize=7)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="outside upper center", ncol=3, handlelength=1.5)
    return figure


def line_panels(panels: Sequence[tuple[str, Sequence[tuple[str, np.ndarray, np.ndarray]]]], *, ylabel: str,
                xlabel: str = "epoch", log_y: bool = False, width: float = COLUMN_WIDTH, height: float = 1.7,
                colors: dict | None = None) -> Figure:
    """Side-by-side panels of labelled lines: panels = [(title, [(label, x, y)])]; one legend per panel."""
    figure = new_figure(width, height)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for index, (label, x, y) in enumerate(lines):
            color = (colors or {}).get(label, category_color(index))
            # Line styles as well as colours: lines that coincide stay distinguishable, also in grey print.
            ax.plot(x, y, marker="o", linestyle=LINE_STYLES[index % len(LINE_STYLES)], color=color,
                    markersize=1.8, label=label)
        if log_y:
            ax.set_yscale("log")
            _log_axis(ax.yaxis)
        _integer_axis(ax.xaxis)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend(loc="best", handlelength=1.2, fontsize=5.5)
    axes[0].set_ylabel(ylabel)
    return figure


# ----------------------------------------------------------------------------------------------- compare


def grouped_bars(categories: Sequence[str], series: Sequence[tuple[str, Sequence[float]]], *, ylabel: str,
                 xlabel: str = "", ylim: tuple[float, float] | None = (0, 1), width: float = COLUMN_WIDTH,
                 height: float = 1.6) -> Figure:
    """Bars per category, one per series (Okabe-Ito colours); missing values (None/NaN) are marked 'n/a'."""
    figure = new_figure(width, height)
    ax = figure.add_subplot()
    bar_width = 0.8 / max(len(series), 1)
    positions = np.arange(len(categories))
    for index, (label, values) in enumerate(series):
        values = np.array([np.nan if v is None else float(v) for v in values])
        offset = (index - (len(series) - 1) / 2) * bar_width
        ax.bar(positions + offset, np.nan_to_num(values), width=bar_width, color=category_color(index), label=label)
        for position, value in zip(positions + offset, values, strict=True):
            if not np.isfinite(value):
                ax.text(position, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=5)
    ax.set_xticks(positions, categories)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    figure.legend(*ax.get_legend_handles_labels(), loc="outside upper center", ncol=min(len(series), 3),
                  handlelength=1.0)
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


__all__ = ["class_heatmap", "composition_bars", "conflict_bars", "detections_grid", "dominant_source_image",
           "evolution_grid", "figure3", "figure3_overview", "fine_size_lines", "grouped_bars", "line_panels",
           "path_norms", "share_matrices", "violin_grid"]
