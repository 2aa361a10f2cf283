"""The fusion-weights view: Figure 3 grid, one (target, source) map over the image, RGB composite, entropy;
a pixel readout of the three source weights. Everything here reads the cached trace: no model call.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from .. import render
from . import cache, figures
from .common import (
    Analysis,
    cell_at,
    detection_caption,
    download_row,
    initial,
    level_control,
    level_name,
    on_chart_select,
    plotly_chart,
    point_picker,
    selected_detection,
)

VIEWS = ("Overlay", "RGB composite", "Entropy", "Figure 3 grid")
VIEW_HELP = ("Overlay: the weight one target level gives one source level, over the image. RGB composite: the "
             "three weights of a target level as red (L0), green (L1), blue (L2). Entropy: how mixed the weights "
             "are, 0 = one source only, 1 = uniform. Figure 3 grid: all nine (target, source) maps, as in the paper.")


HOW_TO_READ = """
- Each pyramid level builds its fused feature map from **all three levels**, resized to its own grid:
  L0 (stride 32, coarse, large objects), L1 (stride 16), L2 (stride 8, fine, small objects).
- At every cell the three **weights** come from a softmax, so they **sum to 1**: they say how much the
  *target* level took from each *source* level there.
- **Overlay** shows one weight (target, source); **RGB composite** all three at once (pure red = only L0,
  green = only L1, blue = only L2, mixed colours = a blend); **Entropy** how mixed they are.
- Each detection comes from one cell of one level: click its dot (or use the Detections tab) to see the
  weights that fed it. Click any cell to read its weights on the right.
"""


@st.fragment
def fusion_view(analysis: Analysis) -> None:
    trace = analysis.trace
    with st.expander("How to read these maps", icon=":material/help:"):
        st.markdown(HOW_TO_READ)
    top = st.columns([3, 1], vertical_alignment="bottom")
    with top[0]:
        mode = st.segmented_control("View", VIEWS, key="fusion_mode", default=initial("fusion_mode", VIEWS[0], VIEWS),
                                    required=True, help=VIEW_HELP) or VIEWS[0]
    with top[1]:
        show_boxes = st.toggle("Show detections", value=True, key="fusion_boxes",
                               help="Draw the detections' boxes over the maps (click a dot to select one).")
    controls = st.columns([1.3, 1.3, 1.2, 1])
    # A control that does nothing in the current view is shown disabled, not silently ignored.
    with controls[0]:
        target = level_control("Target level", "fusion_target", 1, disabled=mode == "Figure 3 grid",
                               help="The pyramid level whose fused feature map is shown (rows of Figure 3). The "
                                    "grid shows all three.")
    with controls[1]:
        source = level_control("Source level", "fusion_source", 0, disabled=mode != "Overlay",
                               help="The level whose resized features the weight multiplies (columns of Figure 3). "
                                    "Used by the Overlay view only.")
    with controls[2]:
        opacity = st.slider("Opacity", 0.0, 1.0, 0.6, 0.05, key="fusion_opacity",
                            help="Opacity of the map over the image (the model is not re-run).")
    with controls[3]:
        colormap = st.selectbox("Colormap", figures.COLORMAPS, key="fusion_colormap",
                                disabled=mode == "RGB composite",
                                help="Colour scale of the weight map, always on the fixed 0..1 range (the RGB "
                                     "composite has its own colours).")

    image_column, readout_column = st.columns([3, 1.25], gap="medium")
    with readout_column:
        st.markdown("**Weights at a pixel**")
        st.caption("Click a cell of the map, or type a pixel.")
        point = point_picker(analysis)
        readout_table(analysis, point, target)

    with image_column:
        if mode == "Figure 3 grid":
            plotly_chart(figures.figure3_mosaic(analysis.image, trace.fusion_weights, opacity=opacity,
                                                colormap=colormap),
                         key="fusion_grid", config={"displayModeBar": False}, width="stretch")
            st.caption("Rows: target level (the fused map being built); columns: source level. Each panel is the "
                       "softmax weight over the image, fixed 0..1 scale.")
        else:
            figure = overlay_figure(analysis, mode, target, source, opacity, colormap, point, show_boxes)
            plotly_chart(figure, key="fusion_chart", on_select=lambda: on_chart_select("fusion_chart"),
                         selection_mode="points", config={"displaylogo": False, "scrollZoom": False},
                         width="stretch")
            st.caption(caption_for(mode, target, source, analysis))

    download_row([
        ("Figure PNG", lambda: cache.figure_bytes(static_figure(analysis, mode, target, source, opacity, colormap,
                                                                show_boxes), "png"),
         f"fusion_{_slug(mode)}_L{target}.png", "image/png"),
        ("Figure PDF", lambda: cache.figure_bytes(static_figure(analysis, mode, target, source, opacity, colormap,
                                                                show_boxes), "pdf"),
         f"fusion_{_slug(mode)}_L{target}.pdf", "application/pdf"),
        ("Trace .npz", lambda: cache.trace_npz_bytes(trace), "trace.npz", "application/octet-stream"),
        ("Detections JSON", lambda: cache.detections_json(trace, analysis.image_choice.name), "detections.json",
         "application/json"),
    ], key="fusion_download")


def _slug(text: str) -> str:
    return text.lower().replace(" ", "_")


def caption_for(mode: str, target: int, source: int, analysis: Analysis) -> str:
    grid = analysis.trace.fusion_weights[target].shape[-2:]
    where = f"target {level_name(target)}, a {grid[0]}x{grid[1]} grid of cells"
    if mode == "Overlay":
        return f"Weight of source {level_name(source)} in the fusion for {where}. Fixed scale 0..1."
    if mode == "RGB composite":
        return f"Red = L0 (stride 32), green = L1 (16), blue = L2 (8) weights for {where}; they sum to 1."
    return f"Normalised entropy of the three weights for {where}: 0 = one source only, 1 = all equal."


def overlay_figure(analysis: Analysis, mode: str, target: int, source: int, opacity: float, colormap: str,
                   point: tuple[float, float], show_boxes: bool):
    trace = analysis.trace
    weights = np.asarray(trace.fusion_weights[target])  # (3, H_l, W_l)
    cell = analysis.cell(target)
    height, width = analysis.image.shape[:2]
    figure = figures.image_figure(analysis.image, height=580)
    if mode == "Overlay":
        figures.add_weight_map(figure, weights[source], cell, colormap=colormap, opacity=opacity,
                               title=f"weight of {level_name(source).split(' ·')[0]}")
    elif mode == "RGB composite":
        figures.add_rgb_map(figure, weights, cell, opacity=opacity)
    else:
        figures.add_weight_map(figure, trace.entropy(target), cell, colormap=colormap,
                               opacity=opacity, title="entropy / ln 3")
    if show_boxes:
        records = analysis.records
        figures.add_boxes(figure, np.array([r.box_xyxy for r in records]).reshape(-1, 4),
                          [r.label for r in records], [detection_caption(r) for r in records],
                          selected=selected_detection(analysis))
    # Screen pixels per original pixel, for the click targets' size (the chart is about 580 px tall).
    display_scale = min(580 / height, 900 / width)
    figures.add_cell_picker(figure, weights, cell, target, display_scale)
    row, col = cell_at(analysis, target, point)
    figures.add_cell_outline(figure, row, col, cell)
    figure.update_layout(uirevision=analysis.image_choice.key, dragmode="zoom")
    return figure


def readout_table(analysis: Analysis, point: tuple[float, float], target: int) -> None:
    """The three source weights at the picked pixel: a bar chart for the shown target level, a table for all."""
    trace = analysis.trace
    rows = []
    for level in range(3):
        row, col = cell_at(analysis, level, point)
        values = np.asarray(trace.fusion_weights[level])[:, row, col]
        rows.append({"target": f"{level_name(level).split(' ·')[0]} ({row}, {col})",
                     "from L0": float(values[0]), "from L1": float(values[1]), "from L2": float(values[2])})
    row, col = cell_at(analysis, target, point)
    plotly_chart(figures.weights_bar([rows[target][f"from L{k}"] for k in range(3)],
                                     title=f"{level_name(target)}, cell ({row}, {col})"),
                 key="readout_bar", config={"displayModeBar": False}, width="stretch")
    table = pd.DataFrame(rows)
    st.caption("All three target levels at this pixel (cell row, col):")
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"target": st.column_config.TextColumn("target (cell)", width="small"),
                                **{f"from L{k}": st.column_config.NumberColumn(f"from L{k}", format="%.3f")
                                   for k in range(3)}})


def static_figure(analysis: Analysis, mode: str, target: int, source: int, opacity: float, colormap: str,
                  show_boxes: bool = True):
    """The matplotlib figure of what the view shows, for the PNG/PDF downloads: the same map, level, source,
    opacity and colormap, and the same detections when they are shown. A large image is drawn downscaled (long
    side 2048 px; the figure says so), so an 8000 x 8000 photo exports in seconds."""
    records = analysis.records if show_boxes and mode != "Figure 3 grid" else None
    trace, records, factor = render.downscaled_for_export(analysis.trace, records)
    if mode == "Figure 3 grid":
        figure = render.figure3_grid(trace, alpha=opacity, cmap=colormap)
    elif mode == "RGB composite":
        figure = render.rgb_composite(trace, target, alpha=opacity, records=records)
    elif mode == "Entropy":
        figure = render.entropy_map(trace, target, alpha=opacity, cmap=colormap, records=records)
    else:
        figure = render.weight_overlay(trace, target, source, alpha=opacity, cmap=colormap, records=records)
    render.note_scale(figure, factor, analysis.trace.image.shape)
    return figure
