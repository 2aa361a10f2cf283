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

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ..analyze.cells import FINE_SIZE_EDGES
from ..analyze.fusion_statistics import WeightSummary
from .palette import OKABE_ITO, SOURCE_COLORS, WEIGHT_CMAP, category_color
from .style import COLUMN_WIDTH, LEVEL_LABELS, SHORT_LEVEL_LABELS, new_figure

LABEL_FONTSIZE = 6.0  # detection labels: the smallest size a printed figure stays readable at

WEIGHT_AXIS_LABEL = "fusion weight"



LINE_STYLES = ("-", "--", ":", "-.")


def _log_axis(axis) -> None:
    """Log ticks at 1, 2, 5 x 10^n labelled as plain numbers (no '6 x 10^0' minor labels)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


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


__all__ = ["class_heatmap", "composition_bars", "evolution_grid", "fine_size_lines", "grouped_bars", "line_panels",
           "violin_grid"]
