"""The counterfactual view: replace the learned fusion weights (uniform, force one level, drop one level) and
see what changes in the detections, as a diff against the learned model.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st

from ...figures import traces
from ...ops.matching import diff_detections
from .. import cached, charts
from ..widgets import MAX_LISTED, Analysis, download_row, initial, level_control, level_name, plotly_chart

KINDS = {"uniform": "Uniform (plain sum)", "one_hot": "Force one level", "drop": "Drop one level"}
KIND_HELP = ("Uniform: every source weighs 1/3, as a plain sum would. Force one level: the target levels see only "
             "the chosen source. Drop one level: the chosen source gets weight 0 and the other two learned "
             "weights are renormalised.")
STATUS_COLOURS = {"kept": None, "relabelled": "#f0a202", "lost": "#d62728", "new": "#1aa260"}


def counterfactual_key() -> cached.CounterfactualKey:
    """Draw the counterfactual's controls and return its cache key (kind, source, target levels)."""
    columns = st.columns([2.2, 1.6, 1.8])
    with columns[0]:
        kind = st.segmented_control("Replace the learned weights with", list(KINDS), key="counterfactual_kind",
                                    default=initial("counterfactual_kind", "uniform", KINDS),
                                    format_func=KINDS.get, required=True, help=KIND_HELP) or "uniform"
    with columns[1]:
        source = level_control("Source level", "counterfactual_source", 2, disabled=kind == "uniform",
                               help="The source level to force or drop (none for uniform weights).")
    with columns[2]:
        levels = st.pills("At target levels", [0, 1, 2], selection_mode="multi", key="counterfactual_levels",
                          default=initial("counterfactual_levels", [0, 1, 2]),
                          format_func=lambda level: level_name(level).split(" ·")[0],
                          help="The fusions the replacement applies to; the others keep their learned weights.")
    levels = tuple(sorted(levels or (0, 1, 2)))
    return (kind, None if kind == "uniform" else int(source), None if levels == (0, 1, 2) else levels)


def diff_table(changes, learned: list, counterfactual: list) -> pd.DataFrame:
    rows = []
    for change in changes:
        before = learned[change.reference] if change.reference is not None else None
        after = counterfactual[change.other] if change.other is not None else None
        rows.append({
            "change": change.status,
            "class": before.class_name if after is None else (
                after.class_name if before is None or before.class_name == after.class_name
                else f"{before.class_name} → {after.class_name}"),
            "learned score": float(before.score) if before is not None else np.nan,
            "counterfactual score": float(after.score) if after is not None else np.nan,
            "Δ score": (float(after.score) - float(before.score)) if before is not None and after is not None
            else np.nan,
            "IoU": change.iou if change.status in ("kept", "relabelled") else np.nan,
            "level": (level_name(before.level) if before is not None else level_name(after.level)).split(" ·")[0],
            "learned #": change.reference, "counterfactual #": change.other,
        })
    return pd.DataFrame(rows)


@st.fragment
def counterfactual_view(analysis: Analysis) -> None:
    st.caption("Run the same image with the fusion weights replaced, and compare the detections with the learned "
               "model's: what each level's contribution is worth.")
    key = counterfactual_key()
    try:
        with st.spinner("Running the model with the replaced weights…"):
            counterfactual = analysis.counterfactual_trace(key)
    except (RuntimeError, ValueError) as error:
        st.error(f"The counterfactual could not be run: {error}", icon=":material/error:")
        return
    learned_records, counterfactual_records = analysis.records, list(counterfactual.detections[:MAX_LISTED])
    changes = diff_detections(learned_records, counterfactual_records)
    counts = {status: sum(1 for change in changes if change.status == status) for status in STATUS_COLOURS}
    kept_deltas = [float(counterfactual_records[c.other].score) - float(learned_records[c.reference].score)
                   for c in changes if c.status == "kept"]
    metrics = st.columns(5)
    metrics[0].metric("Kept", counts["kept"], help="Same class, IoU ≥ 0.5 with a learned detection.")
    metrics[1].metric("Relabelled", counts["relabelled"], help="Same place (IoU ≥ 0.5), another class.")
    metrics[2].metric("Lost", counts["lost"], help="Learned detections with no counterpart.")
    metrics[3].metric("New", counts["new"], help="Counterfactual detections with no learned counterpart.")
    metrics[4].metric("Mean Δ score (kept)", f"{np.mean(kept_deltas):+.3f}" if kept_deltas else "–")

    status_of_learned = {c.reference: c.status for c in changes if c.reference is not None}
    status_of_counterfactual = {c.other: c.status for c in changes if c.other is not None}
    columns = st.columns(2, gap="medium")
    for column, title, records, statuses in (
            (columns[0], "Learned weights", learned_records, status_of_learned),
            (columns[1], counterfactual.counterfactual.describe().capitalize(), counterfactual_records,
             status_of_counterfactual)):
        with column:
            st.markdown(f"**{title}** · {len(records)} detections")
            figure = charts.image_figure(analysis.image, height=440)
            for status, colour in STATUS_COLOURS.items():
                chosen = [index for index in range(len(records)) if statuses.get(index) == status]
                if not chosen:
                    continue
                charts.add_boxes(figure, np.array([records[i].box_xyxy for i in chosen]).reshape(-1, 4),
                                  [records[i].label for i in chosen],
                                  [f"{records[i].class_name} {float(records[i].score):.2f}"
                                   + ("" if status == "kept" else f" ({status})") for i in chosen],
                                  clickable=False, colour=colour, dash=None if status == "kept" else "dash")
            figure.update_layout(uirevision=analysis.image_choice.key, dragmode="zoom")
            plotly_chart(figure, key=f"counterfactual_{'learned' if statuses is status_of_learned else 'other'}",
                         config={"displaylogo": False}, width="stretch")
    st.caption("Dashed boxes changed: red = lost, green = new, orange = relabelled; solid boxes were kept.")
    table = diff_table(changes, learned_records, counterfactual_records)
    if len(table):
        st.dataframe(table, hide_index=True, width="stretch", height=min(38 + 35 * len(table), 360),
                     column_config={name: st.column_config.NumberColumn(name, format="%.3f")
                                    for name in ("learned score", "counterfactual score", "Δ score", "IoU")})
    download_row([
        ("Figure PNG", lambda: cached.figure_bytes(traces.counterfactual_comparison(
            [analysis.trace, counterfactual], score_threshold=analysis.settings.conf_threshold), "png"),
         "counterfactual.png", "image/png"),
        ("Figure PDF", lambda: cached.figure_bytes(traces.counterfactual_comparison(
            [analysis.trace, counterfactual], score_threshold=analysis.settings.conf_threshold), "pdf"),
         "counterfactual.pdf", "application/pdf"),
        ("Diff JSON", lambda: json.dumps({"counterfactual": counterfactual.counterfactual.to_dict(),
                                          "changes": json.loads(table.to_json(orient="records"))}, indent=1),
         "counterfactual_diff.json", "application/json"),
        ("Trace .npz", lambda: cached.trace_npz_bytes(counterfactual), "trace_counterfactual.npz",
         "application/octet-stream"),
    ], key="counterfactual_download")
