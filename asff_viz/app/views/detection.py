"""The detections view: boxes and a table, the picked detection's origin (level, cell, slot), its three fusion
weights, a zoomed crop with the maps, and attributions computed on demand.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import streamlit as st

from ...figures import gradients, traces
from .. import cached, charts
from ..widgets import (
    SELECTED_DETECTION,
    SLOT_NAMES,
    Analysis,
    detection_caption,
    detection_picker,
    download_row,
    level_name,
    on_chart_select,
    plotly_chart,
)

ATTRIBUTION_METHODS = {
    "integrated_gradients": "Integrated Gradients (input)",
    "saliency": "Saliency (input)",
    "grad_cam": "GradCAM per pyramid level",
}


def detections_table(analysis: Analysis) -> pd.DataFrame:
    rows = []
    for index, record in enumerate(analysis.records):
        x1, y1, x2, y2 = (float(v) for v in record.box_xyxy)
        weights = np.asarray(record.weights_here, dtype=np.float64)
        rows.append({"#": index, "class": record.class_name, "score": float(record.score),
                     "level": level_name(record.level).split(" ·")[0], "slot": SLOT_NAMES[int(record.slot)],
                     "cell": f"({int(record.row)}, {int(record.col)})",
                     "w L0": weights[0], "w L1": weights[1], "w L2": weights[2],
                     "box (x1, y1, x2, y2)": f"{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}"})
    return pd.DataFrame(rows)


def _on_table_select() -> None:
    event = st.session_state.get("detections_table")
    try:
        rows = event["selection"]["rows"]
    except (KeyError, TypeError):
        return
    if rows:
        st.session_state[SELECTED_DETECTION] = int(rows[0])


@st.fragment
def detection_view(analysis: Analysis) -> None:
    records = analysis.records
    image_column, detail_column = st.columns([3, 2], gap="medium")
    with detail_column:
        index = detection_picker(analysis)
    with image_column:
        figure = charts.image_figure(analysis.image, height=540)
        charts.add_boxes(figure, np.array([r.box_xyxy for r in records]).reshape(-1, 4),
                          [r.label for r in records], [detection_caption(r) for r in records], selected=index)
        figure.update_layout(uirevision=analysis.image_choice.key, dragmode="zoom")
        plotly_chart(figure, key="detections_chart", on_select=lambda: on_chart_select("detections_chart"),
                     selection_mode="points", config={"displaylogo": False}, width="stretch")
        st.caption(f"{len(records)} detections at confidence ≥ {analysis.settings.conf_threshold:.2f}. "
                   "Click the dot at a box centre, or a row of the table, to pick a detection.")
    with detail_column:
        if index is not None:
            detection_details(analysis, index)
    if records:
        st.dataframe(detections_table(analysis), key="detections_table", on_select=_on_table_select,
                     selection_mode="single-row", hide_index=True, width="stretch",
                     height=min(38 + 35 * len(records), 320),
                     column_config={
                         "score": st.column_config.ProgressColumn("score", min_value=0.0, max_value=1.0, format="%.3f"),
                         **{f"w L{k}": st.column_config.NumberColumn(f"w L{k}", format="%.3f") for k in range(3)}})
    if index is not None:
        attribution_panel(analysis, index)
    download_row([
        ("Detections JSON", lambda: cached.detections_json(analysis.trace, analysis.image_choice.name),
         "detections.json", "application/json"),
        ("Trace .npz", lambda: cached.trace_npz_bytes(analysis.trace), "trace.npz", "application/octet-stream"),
        ("Boxes PNG", lambda: cached.figure_bytes(_boxes_figure(analysis, index), "png"), "detections.png",
         "image/png"),
        ("Boxes PDF", lambda: cached.figure_bytes(_boxes_figure(analysis, index), "pdf"), "detections.pdf",
         "application/pdf"),
    ], key="detection_download")


def _boxes_figure(analysis: Analysis, index: int | None):
    return traces.draw_detections(analysis.image, analysis.records)


def detection_details(analysis: Analysis, index: int) -> None:
    record = analysis.records[index]
    level = int(record.level)
    columns = st.columns(3)
    columns[0].metric("Class", record.class_name)
    columns[1].metric("Score", f"{float(record.score):.3f}")
    columns[2].metric("Level", level_name(level).split(" ·")[0], help=level_name(level))
    st.markdown(f"Detection **#{index}** was predicted by **{level_name(level)}**, "
                f"cell **(row {int(record.row)}, col {int(record.col)})**, "
                f"slot **{SLOT_NAMES[int(record.slot)]}**. Its fused feature there took these weights:")
    plotly_chart(charts.weights_bar(record.weights_here, title="fusion weights at the predicting cell"),
                 key="detection_weights_bar", config={"displayModeBar": False}, width="stretch")
    crop_panel(analysis, record)


def crop_window(box: np.ndarray, width: int, height: int, margin: float = 0.6) -> tuple[float, float, float, float]:
    """A square-ish window around an xyxy box with `margin` x its size on each side, inside the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1, 16.0) * (1 + 2 * margin)
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    left = float(np.clip(centre_x - side / 2, 0, max(0.0, width - side)))
    top = float(np.clip(centre_y - side / 2, 0, max(0.0, height - side)))
    return left, top, min(width, left + side), min(height, top + side)


def crop_panels(image: np.ndarray, weights: np.ndarray, cell: tuple[float, float], box, row: int, col: int,
                colour: str, colormap: str, panel_height: int = 170, gap: int = 6) -> np.ndarray:
    """The box's neighbourhood as one RGB picture: the image, then the weight of each source over it.

    Drawn here, as pixels, rather than as four narrow interactive charts (which the page clipped to about 60 % of
    the crop): the whole window of `crop_window` is shown, the box outlined in its class colour, the predicting
    cell (row, col) outlined in white. weights: (3, H_l, W_l) of the predicting level; cell: its size in original
    pixels.
    """
    height, width = image.shape[:2]
    # An untrained model's box can be infinite: what can be drawn is its part on the image.
    box = np.clip(np.nan_to_num(np.asarray(box, dtype=np.float64), nan=0.0, posinf=1e9, neginf=-1e9),
                  0, [width, height, width, height])
    left, top, right, bottom = crop_window(box, width, height)
    scale = panel_height / max(bottom - top, 1e-6)
    panel_width = max(1, round((right - left) * scale))
    x0, y0, x1, y1 = int(left), int(top), max(int(np.ceil(right)), int(left) + 1), max(int(np.ceil(bottom)),
                                                                                    int(top) + 1)
    crop = cv2.resize(image[y0:y1, x0:x1], (panel_width, panel_height), interpolation=cv2.INTER_AREA)
    # The cell of each panel pixel, from its centre in original pixels.
    xs = left + (np.arange(panel_width) + 0.5) / scale
    ys = top + (np.arange(panel_height) + 0.5) / scale
    cols = np.clip((xs // cell[0]).astype(int), 0, weights.shape[2] - 1)
    rows = np.clip((ys // cell[1]).astype(int), 0, weights.shape[1] - 1)

    def to_panel(x: float, y: float) -> tuple[int, int]:
        return (int(round(min(max((x - left) * scale, 0), panel_width - 1))),
                int(round(min(max((y - top) * scale, 0), panel_height - 1))))

    rgb = tuple(int(colour.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
    panels = []
    for source in range(-1, 3):
        panel = crop.copy() if source < 0 else traces.weight_overlay_array(
            crop, np.asarray(weights[source])[rows[:, None], cols[None, :]], alpha=0.65, cmap=colormap)
        cv2.rectangle(panel, to_panel(col * cell[0], row * cell[1]), to_panel((col + 1) * cell[0], (row + 1) * cell[1]),
                      (255, 255, 255), 2)
        cv2.rectangle(panel, to_panel(box[0], box[1]), to_panel(box[2], box[3]), rgb, 2)
        panels.append(panel)
        panels.append(np.full((panel_height, gap, 3), 255, np.uint8))
    return np.concatenate(panels[:-1], axis=1)


def crop_panel(analysis: Analysis, record) -> None:
    """The box's neighbourhood, zoomed: the image, then the weight of each source at the predicting level."""
    level = int(record.level)
    colormap = st.session_state.get("fusion_colormap", "viridis")
    st.markdown("**Zoomed crop with the maps**")
    st.caption(f"Left to right: the image, then the weight of source L0, L1 and L2 at the predicting level "
               f"{level_name(level)} ({colormap}, fixed 0..1 scale as in the fusion view). The box is outlined in its "
               "class colour, the cell that predicted it in white.")
    picture = crop_panels(analysis.image, np.asarray(analysis.trace.fusion_weights[level]), analysis.cell(level),
                          np.asarray(record.box_xyxy, dtype=np.float64), int(record.row), int(record.col),
                          charts.class_colour(record.label), colormap)
    st.image(picture, width="stretch")


def attribution_panel(analysis: Analysis, index: int) -> None:
    record = analysis.records[index]
    st.subheader("Attributions", divider="gray", anchor=False)
    st.caption("Which input pixels and which pyramid levels the picked detection's score depends on. Each method "
               "runs backward passes through the model, so it runs only when you ask (results are cached).")
    columns = st.columns([3, 1])
    methods = columns[0].multiselect(
        "Methods", list(ATTRIBUTION_METHODS), default=["saliency", "grad_cam"], format_func=ATTRIBUTION_METHODS.get,
        key="attribution_methods",
        help="Saliency: |d score / d pixel|. Integrated Gradients: the most faithful, and the slowest (32 passes). "
             "GradCAM: which cells of each level's fused features the score uses.")
    steps = 16
    if "integrated_gradients" in methods:
        steps = columns[0].select_slider(
            "Integrated Gradients steps", (4, 8, 16, 32, 64), value=16, key="attribution_steps",
            help="Points on the path from the baseline (the mean image) to the image. More steps: a more exact "
                 "attribution, and proportionally slower.")
    request = (analysis.trace_key, int(record.row_index), tuple(methods), int(steps))
    with columns[1]:
        st.space("small")
        if st.button("Compute attributions", key="compute_attributions", type="primary",
                     icon=":material/insights:", disabled=not methods, width="stretch"):
            st.session_state["attribution_request"] = request
    if st.session_state.get("attribution_request") != request:
        st.caption("Pick methods and press *Compute attributions*.")
        return
    results = {}
    progress = st.progress(0.0, text="Computing attributions…")
    try:
        for position, method in enumerate(methods):
            progress.progress(position / len(methods), text=f"Computing {ATTRIBUTION_METHODS[method]}…")
            results[method] = cached.attribution(analysis.image_choice.key, analysis.weights_key,
                                                analysis.settings.size, analysis.settings.device,
                                                int(record.row_index), method, analysis.image,
                                                steps if method == "integrated_gradients" else 0)
    except (RuntimeError, ValueError) as error:  # e.g. out of memory for the backward passes
        st.error(f"Attributions could not be computed: {error}. Try fewer steps or a smaller input size.",
                 icon=":material/error:")
        return
    finally:
        progress.empty()
    show_attributions(analysis, record, results)


def show_attributions(analysis: Analysis, record, results: dict) -> None:
    height, width = analysis.image.shape[:2]
    panels = []  # (title, values, cell, zmin, zmax, colormap)
    for method, attributions in results.items():
        if method == "grad_cam":
            top = max(float(np.max(a.grid)) for a in attributions) or 1.0
            for attribution in attributions:
                panels.append((f"GradCAM · {level_name(attribution.level)}", attribution.grid,
                               analysis.cell(attribution.level), 0.0, top, "viridis"))
            continue
        attribution = attributions[0]
        values = attribution.map
        # The map is on the S x S input grid; a coarser copy keeps the chart light and still reads the same.
        side = min(values.shape[0], 160)
        values = cv2.resize(values.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
        magnitude = float(np.abs(values).max()) or 1.0
        signed = attribution.signed
        panels.append((ATTRIBUTION_METHODS[method].split(" (")[0], values, (width / side, height / side),
                       -magnitude if signed else 0.0, magnitude, "RdBu_r" if signed else "viridis"))
    columns = st.columns(min(3, len(panels)) or 1)
    for position, (title, values, cell, zmin, zmax, colormap) in enumerate(panels):
        figure = charts.image_figure(analysis.image, height=300, dim=0.3)
        charts.add_map(figure, values, cell, colormap=colormap, opacity=0.7, title="", zmin=zmin, zmax=zmax)
        charts.add_boxes(figure, np.asarray(record.box_xyxy)[None], [record.label], [""], clickable=False)
        with columns[position % len(columns)]:
            st.caption(f"{title} (scale ±{zmax:.2g})" if zmin < 0 else f"{title} (scale 0..{zmax:.2g})")
            plotly_chart(figure, key=f"attribution_{position}", config={"displayModeBar": False},
                         width="stretch")
    transform = analysis.trace.transform
    items = []
    for method, attributions in results.items():
        def make(file_format, method=method, attributions=attributions):
            if method == "grad_cam":
                figure = gradients.grad_cam_figure(analysis.image, attributions, transform)
            else:
                figure = gradients.attribution_overlay(analysis.image, attributions[0], transform)
            return cached.figure_bytes(figure, file_format)
        short = {"integrated_gradients": "IG", "saliency": "Saliency", "grad_cam": "GradCAM"}[method]
        items.append((f"{short} PNG", lambda make=make: make("png"), f"{method}.png", "image/png"))
        items.append((f"{short} PDF", lambda make=make: make("pdf"), f"{method}.pdf", "application/pdf"))
    download_row(items, key="attribution_download")


@st.fragment
def detections_only_view(image_choice, image, weights, model, settings) -> None:
    """Detections of a model without fusion weights (sum, concat or baseline fusion): boxes and a table."""
    import json

    from .compare import side_for

    side = side_for(weights.label, weights, model, image_choice, image, settings)
    figure = charts.image_figure(image, height=540)
    charts.add_boxes(figure, np.array([r.box_xyxy for r in side.records]).reshape(-1, 4),
                      [r.label for r in side.records], [detection_caption(r) for r in side.records], clickable=False)
    figure.update_layout(uirevision=image_choice.key, dragmode="zoom")
    plotly_chart(figure, key="plain_detections_chart", config={"displaylogo": False}, width="stretch")
    rows = [{"#": i, "class": r.class_name, "score": r.score, "level": level_name(r.level).split(" ·")[0],
             "box (x1, y1, x2, y2)": ", ".join(f"{v:.0f}" for v in r.box_xyxy)} for i, r in enumerate(side.records)]
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    document = {"image": image_choice.name, "checkpoint_sha256": weights.sha256,
                "detections": [{"box_xyxy": [round(float(v), 2) for v in r.box_xyxy], "score": round(r.score, 5),
                                "label": r.label, "class_name": r.class_name, "level": r.level}
                               for r in side.records]}
    download_row([("Detections JSON", json.dumps(document, indent=1), "detections.json", "application/json")],
                 key="plain_download")
