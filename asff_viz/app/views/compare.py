"""Compare two checkpoints on the same image and settings: detections side by side, their Figure 3 grids and
mean fusion weights (for ASFF models), and which detections one has that the other lacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from ...figures import traces
from ...inference.postprocess import row_location
from ...introspection.capture import has_fusion_weights
from ...ops.matching import STATUSES, diff_detections
from .. import cached, charts
from ..inputs import InputError, weights_ui
from ..widgets import MAX_LISTED, Analysis, detection_caption, download_row, level_name, load_model, plotly_chart


@dataclass(frozen=True)
class Side:
    """One checkpoint's result on the image: a trace (ASFF models) or plain detections (other fusions)."""

    label: str
    model: object
    weights: object
    trace: object | None
    records: list
    total: int  # detections above the threshold; `records` holds the best MAX_LISTED of them


@dataclass(frozen=True)
class PlainDetection:
    """A detection of a model without fusion weights, shaped like the fields of `DetectionRecord` used here."""

    box_xyxy: np.ndarray
    score: float
    label: int
    class_name: str
    level: int


def side_for(label: str, weights, model, image_choice, image, settings) -> Side:
    key = (weights.path, weights.sha256)
    if has_fusion_weights(model):
        trace = cached.trace(image_choice.key, key, settings.size, settings.conf_threshold, settings.nms_threshold,
                            settings.device, cached.LEARNED, image, image_choice.name)
        return Side(label, model, weights, trace, list(trace.detections[:MAX_LISTED]), len(trace.detections))
    result = cached.detections_only(image_choice.key, key, settings.size, settings.conf_threshold,
                                   settings.nms_threshold, settings.device, image)
    grid_sizes = model.grid_sizes(settings.size)
    records = [PlainDetection(np.asarray(box, dtype=np.float64), float(score), int(label), name,
                              row_location(int(row), grid_sizes).level)
               for box, score, label, name, row in zip(result.boxes.numpy(), result.scores.numpy(),
                                                       result.labels.numpy(), result.class_names,
                                                       result.detections.indices.numpy(), strict=True)]
    return Side(label, model, weights, None, records[:MAX_LISTED], len(records))


@st.fragment
def compare_view(analysis: Analysis | None, *, image_choice, image, weights, settings) -> None:
    st.caption("Run a second checkpoint on the same image and settings: e.g. early and late in training, or ASFF "
               "against a sum-fusion model.")
    with st.container(border=True):
        try:
            other_weights = weights_ui(key_prefix="compare_", label="Second checkpoint",
                                       default_source="checkpoints/ folder", avoid=weights.path)
        except InputError as error:
            st.error(str(error), icon=":material/error:")
            return
    if other_weights is None:
        return
    if other_weights.sha256 == weights.sha256:
        st.info("B is the same checkpoint as A: a model compared with itself shows no difference. Choose another "
                "checkpoint for B (another epoch, or a model with another fusion).", icon=":material/info:")
        return
    other_model, error = load_model(other_weights, settings.device)
    if error:
        st.error(error, icon=":material/error:")
        return
    first_model = analysis.model if analysis is not None else cached.model(weights.path, weights.sha256,
                                                                           settings.device)
    try:
        with st.spinner("Running both models…"):
            sides = [side_for(f"A · {weights.label}", weights, first_model, image_choice, image, settings),
                     side_for(f"B · {other_weights.label}", other_weights, other_model, image_choice, image,
                              settings)]
    except (RuntimeError, ValueError) as error:
        st.error(f"The comparison could not run: {error}", icon=":material/error:")
        return
    names = [list((getattr(side.model, "metadata", {}) or {}).get("class_names") or []) for side in sides]
    if names[0] != names[1]:
        st.warning(f"The two models name different classes ({len(names[0])} vs {len(names[1])}); detections are "
                   "matched by place, and a different class shows as relabelled.", icon=":material/info:")

    columns = st.columns(2, gap="medium")
    for column, side in zip(columns, sides, strict=True):
        with column:
            metadata = getattr(side.model, "metadata", {}) or {}
            st.markdown(f"**{side.label}**")
            shown = (f"{len(side.records)} detections" if side.total <= len(side.records) else
                     f"the best {len(side.records)} of {side.total} detections (raise the confidence threshold to "
                     "see fewer)")
            st.caption(f"{metadata.get('variant', side.model.config.variant)} · {side.model.num_classes} classes · "
                       f"sha256 `{side.weights.sha256[:12]}` · {shown}")
            figure = charts.image_figure(image, height=400)
            charts.add_boxes(figure, np.array([r.box_xyxy for r in side.records]).reshape(-1, 4),
                              [r.label for r in side.records], [detection_caption(r) for r in side.records],
                              clickable=False)
            figure.update_layout(uirevision=image_choice.key, dragmode="zoom")
            plotly_chart(figure, key=f"compare_boxes_{side.label[0]}", config={"displaylogo": False},
                         width="stretch")

    opacity = st.session_state.get("fusion_opacity", 0.6)
    colormap = st.session_state.get("fusion_colormap", "viridis")
    if any(side.trace is not None for side in sides):
        st.markdown("**Fusion weights** (the paper's Figure 3: rows = target level, columns = source level)")
        columns = st.columns(2, gap="medium")
        for column, side in zip(columns, sides, strict=True):
            with column:
                if side.trace is None:
                    st.info(f"{side.label}: fuses by **{side.model.config.fusion}**, no learned weights to show.")
                    continue
                figure = charts.figure3_mosaic(image, side.trace.fusion_weights, opacity=opacity,
                                                colormap=colormap, panel_side=260)
                figure.update_layout(height=460)
                plotly_chart(figure, key=f"compare_grid_{side.label[0]}", config={"displayModeBar": False},
                             width="stretch")
        mean_weights_table(sides)
    changes = detection_counts(sides)
    download_row([
        ("Comparison JSON", lambda: comparison_json(sides, changes, image_choice.name, settings), "comparison.json",
         "application/json"),
        ("Side by side PNG", lambda: cached.figure_bytes(side_by_side(image, sides), "png"), "comparison.png",
         "image/png"),
        ("Side by side PDF", lambda: cached.figure_bytes(side_by_side(image, sides), "pdf"), "comparison.pdf",
         "application/pdf"),
    ], key="compare_download")


def side_by_side(image, sides: list[Side]):
    return traces.draw_detections_side_by_side(image, [(side.label, side.records) for side in sides])


def comparison_json(sides: list[Side], changes: list, image_name: str, settings) -> str:
    """Both checkpoints (path, sha256, fusion), their detections on the image and how they match (IoU >= 0.5)."""

    def detection(record) -> dict:
        return {"box_xyxy": [round(float(value), 2) for value in record.box_xyxy],
                "score": round(float(record.score), 5), "label": int(record.label),
                "class_name": record.class_name, "level": int(record.level)}

    models = []
    for name, side in zip("AB", sides, strict=True):
        metadata = getattr(side.model, "metadata", {}) or {}
        models.append({"side": name, "label": side.label, "path": str(side.weights.path),
                       "sha256": side.weights.sha256, "fusion": str(side.model.config.fusion),
                       "variant": metadata.get("variant", side.model.config.variant),
                       "detections_above_threshold": side.total, "detections_listed": len(side.records),
                       "detections": [detection(record) for record in side.records]})
    document = {
        "image": image_name,
        "settings": {"input_size": settings.size, "conf_threshold": settings.conf_threshold,
                     "nms_threshold": settings.nms_threshold},
        "models": models,
        "matching": "greedy one-to-one by decreasing score of A, IoU >= 0.5: kept (same class), relabelled "
                    "(other class), lost (only in A), new (only in B); indices into each model's detections",
        "counts": match_counts(changes),
        "matches": [{"status": change.status, "a": change.reference, "b": change.other,
                     "iou": round(float(change.iou), 4)} for change in changes],
    }
    return json.dumps(document, indent=1)


def mean_weights_table(sides: list[Side]) -> None:
    rows = []
    for side in sides:
        if side.trace is None:
            continue
        for level, weights in enumerate(side.trace.fusion_weights):
            means = np.asarray(weights).reshape(3, -1).mean(axis=1)
            rows.append({"model": side.label, "target": level_name(level),
                         **{f"mean from L{k}": float(means[k]) for k in range(3)}})
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={f"mean from L{k}": st.column_config.ProgressColumn(
                     f"mean from L{k}", min_value=0.0, max_value=1.0, format="%.3f") for k in range(3)})


def match_counts(changes: list) -> dict[str, int]:
    """How many matches of each status (`ops.matching.STATUSES`)."""
    return {status: sum(1 for change in changes if change.status == status) for status in STATUSES}


def detection_counts(sides: list[Side]) -> list:
    """The match counts of A's detections in B, and the detections per level; returns the matches."""
    changes = diff_detections(sides[0].records, sides[1].records)
    counts = match_counts(changes)
    st.markdown("**Detections of A matched in B** (IoU ≥ 0.5)")
    metrics = st.columns(4)
    metrics[0].metric("In both", counts["kept"])
    metrics[1].metric("Other class in B", counts["relabelled"])
    metrics[2].metric("Only in A", counts["lost"])
    metrics[3].metric("Only in B", counts["new"])
    per_level = pd.DataFrame([{"model": side.label, **{level_name(level): sum(1 for r in side.records
                                                                             if int(r.level) == level)
                                                        for level in range(3)}} for side in sides])
    st.dataframe(per_level, hide_index=True, width="stretch")
    return changes
