"""Publication figures of the gradient-flow analysis: energy shares, conflict rates with their controls, paired
differences and path norms. Pure functions of arrays returning matplotlib Figures (see `plots`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..analyze.flow_statistics import REGIONS
from .palette import MAGNITUDE_CMAP, OKABE_ITO, category_color
from .plots import _log_axis
from .style import COLUMN_WIDTH, LEVEL_LABELS, SHORT_LEVEL_LABELS, new_figure


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
                       height: float = 2.0, other: str = "control", colors: Sequence | None = None) -> Figure:
    """Conflict rate of `reference` minus each control (or other mode: `other` names them on the axis), per
    region (panel) and source level (group), with the 95 % paired bootstrap interval; below zero = fewer
    conflicts than the control. A region with no location on a grid (object background at stride 32) is marked
    n/a.

    estimates, lower, upper: (M controls, 3 sources, R regions). colors: one per control (default: categories).
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
                        markersize=2.2, color=category_color(index) if colors is None else colors[index],
                        elinewidth=0.6, capsize=1.0,
                        label=control.replace("_", " "))
        for source in range(3):
            if not np.isfinite(estimates[:, source, region]).any():
                ax.text(source, 0.0, "n/a", ha="center", va="bottom", fontsize=5, color=OKABE_ITO["grey"])
        ax.set_xticks(positions, [SHORT_LEVEL_LABELS[source] for source in range(3)])
        ax.set_title(_region_short(REGIONS[region]))
    axes[0].set_ylabel(f"{reference} $-$ {other}\nconflict rate")
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
