"""The fusion-weights view: Figure 3 grid, one (target, source) map over the image, RGB composite, entropy;
a pixel readout of the three source weights. Everything here reads the cached trace: no model call.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from ...figures import traces
from .. import cached, charts
from ..explorer import KEY as EXPLORER_KEY
from ..explorer import MODES, FusionState, apply_browser_value, explorer_arguments, fusion_explorer
from ..widgets import (
    PICKED_POINT,
    SELECTED_DETECTION,
    Analysis,
    cell_at,
    detection_caption,
    download_row,
    level_name,
    plotly_chart,
    point_picker,
    selected_detection,
)

VIEWS = MODES  # the view modes: Overlay, RGB composite, Entropy, Figure 3 grid


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
    # The explorer's last report first: the readout, the exports and the next drawing all use that state.
    click = apply_browser_value(st.session_state.get(EXPLORER_KEY))
    if click is not None:
        if "detection" in click:
            st.session_state[SELECTED_DETECTION] = int(click["detection"])
        elif "x" in click and "y" in click:
            st.session_state[PICKED_POINT] = (float(click["x"]), float(click["y"]))
    state = FusionState.from_session()
    state.to_session()
    if getattr(analysis.model.config, "fusion", "asff") == "weighted":
        weighted_fusion_table(trace)

    image_column, readout_column = st.columns([3, 1.25], gap="medium")
    with readout_column:
        st.markdown("**Weights at a pixel**")
        st.caption("Click a cell of the map, or type a pixel.")
        point = point_picker(analysis)
        readout_table(analysis, point, state.target)

    with image_column:
        records = analysis.records
        picked_cells = [list(cell_at(analysis, level, point)) for level in range(3)]
        fusion_explorer(explorer_arguments(analysis, state, records, selected_detection(analysis), picked_cells,
                                           [detection_caption(r) for r in records]))
        st.caption("View, levels, opacity, colormap and boxes change here in the browser, without re-running "
                   "anything; hover a cell for its three weights, click it to read them on the right.")

    download_row([
        ("Figure PNG", lambda: cached.figure_bytes(static_figure(analysis, state.mode, state.target, state.source,
                                                                state.opacity, state.colormap, state.show_boxes),
                                                  "png"),
         f"fusion_{_slug(state.mode)}_L{state.target}.png", "image/png"),
        ("Figure PDF", lambda: cached.figure_bytes(static_figure(analysis, state.mode, state.target, state.source,
                                                                state.opacity, state.colormap, state.show_boxes),
                                                  "pdf"),
         f"fusion_{_slug(state.mode)}_L{state.target}.pdf", "application/pdf"),
        ("Trace .npz", lambda: cached.trace_npz_bytes(trace), "trace.npz", "application/octet-stream"),
        ("Detections JSON", lambda: cached.detections_json(trace, analysis.image_choice.name), "detections.json",
         "application/json"),
    ], key="fusion_download")


def weighted_fusion_table(trace) -> None:
    """A weighted-fusion model (BiFPN's fast normalized fusion) learns one scalar per target and source level:
    shown as the 3 x 3 table it is; the maps below are those scalars, constant over the image."""
    rows = [{"target": level_name(level), **{f"from L{k}": float(np.asarray(trace.fusion_weights[level])[k, 0, 0])
                                             for k in range(3)}} for level in range(3)]
    st.info("This model fuses by **learned per-level scalars** (BiFPN's fast normalized fusion), not per-pixel "
            "weights: each target level takes a fixed share of each source everywhere, so the maps below are flat.",
            icon=":material/info:")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={f"from L{k}": st.column_config.NumberColumn(f"from L{k}", format="%.3f")
                                for k in range(3)})


def _slug(text: str) -> str:
    return text.lower().replace(" ", "_")


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
    plotly_chart(charts.weights_bar([rows[target][f"from L{k}"] for k in range(3)],
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
    trace, records, factor = traces.downscaled_for_export(analysis.trace, records)
    if mode == "Figure 3 grid":
        figure = traces.figure3_grid(trace, alpha=opacity, cmap=colormap)
    elif mode == "RGB composite":
        figure = traces.rgb_composite(trace, target, alpha=opacity, records=records)
    elif mode == "Entropy":
        figure = traces.entropy_map(trace, target, alpha=opacity, cmap=colormap, records=records)
    else:
        figure = traces.weight_overlay(trace, target, source, alpha=opacity, cmap=colormap, records=records)
    traces.note_scale(figure, factor, analysis.trace.image.shape)
    return figure
