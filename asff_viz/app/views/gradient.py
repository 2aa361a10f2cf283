"""The gradient-flow view: the 3x3 matrix of gradient contributions between levels, their spatial maps and the
conflict map, for one objective, side by side with the uniform-weights counterfactual (the paper's argument).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import streamlit as st

from ...figures.gradients import conflict_text, conflict_undefined, finite_max, rate_text
from .. import cached, charts
from ..widgets import (
    Analysis,
    detection_caption,
    detection_picker,
    download_row,
    initial,
    level_control,
    level_name,
    plotly_chart,
)

OBJECTIVES = {
    "score": "Picked detection's score",
    "sum": "Sum of all scores",
    "loss": "Training loss vs ground truth",
}
UNIFORM: cached.CounterfactualKey = ("uniform", None, None)


def ground_truth(analysis: Analysis) -> tuple[np.ndarray | None, str | None]:
    """(M, 5) [class, cx, cy, w, h] input-pixel labels of the image's annotations, or (None, why not)."""
    from ...introspection.objectives import ground_truth_labels

    annotations = analysis.image_choice.annotations
    if annotations is None or len(annotations.class_indices) == 0:
        return None, "This image has no annotations (the bundled samples do)."
    if int(annotations.class_indices.max()) >= analysis.model.num_classes:
        return None, (f"The annotations use {len(annotations.class_names)} classes "
                      f"({', '.join(annotations.class_names[:3])}, …) but this model predicts "
                      f"{analysis.model.num_classes}: the loss needs the model's own classes.")
    labels = ground_truth_labels(annotations.boxes_xyxy, annotations.class_indices, analysis.trace.transform)
    model_names = tuple(analysis.class_names[:len(annotations.class_names)])
    if model_names != tuple(annotations.class_names):
        st.caption(f"Note: the annotations name their classes {', '.join(annotations.class_names[:4])}, …; the "
                   f"model's are {', '.join(analysis.class_names[:4])}, …; the loss pairs them by index.")
    return labels, None


@st.fragment
def gradient_view(analysis: Analysis) -> None:
    st.caption("How much gradient each target level sends back to each source level through ASFF's value path "
               "(rows: target, columns: source), and where those contributions disagree. The learned weights are "
               "compared with uniform weights (a plain sum), the case the paper argues from.")
    labels, no_labels_reason = ground_truth(analysis)
    chosen = _objective_controls(analysis, labels, no_labels_reason)
    if chosen is None:
        return
    objective, label, index = chosen
    if not _requested(analysis, objective, label):
        return
    if index is not None:
        # The maps open on the level that predicted the picked detection (its gradient starts there).
        level = int(analysis.records[index].level)
        if st.session_state.get("gradient_target_for") != (analysis.trace_key, index):
            st.session_state["gradient_target_for"] = (analysis.trace_key, index)
            st.session_state["gradient_target"] = level
    flows = _compute_flows(analysis, objective, labels)
    if flows is None:
        return
    _matrices(flows, label)
    st.markdown("**Where the gradient goes**")
    map_controls = st.columns([1.5, 1.5, 2])
    with map_controls[0]:
        target = level_control("Target level", "gradient_target", 2,
                               help="The level whose fused map sends the gradient.")
    with map_controls[1]:
        source = level_control("Source level", "gradient_source", 0,
                               help="The level that receives it (maps are at the source's resolution).")
    with map_controls[2]:
        opacity = st.slider("Opacity", 0.0, 1.0, 0.75, 0.05, key="gradient_opacity",
                            help="Opacity of the maps over the image.")
    _flow_maps(analysis, flows, target, source, opacity)
    _conflict_maps(analysis, flows, source, opacity)
    download_row([
        ("Figure PNG", lambda: cached.figure_bytes(static_figure(flows, analysis, target, source, opacity), "png"),
         "gradient_flow.png", "image/png"),
        ("Figure PDF", lambda: cached.figure_bytes(static_figure(flows, analysis, target, source, opacity), "pdf"),
         "gradient_flow.pdf", "application/pdf"),
        ("Matrices JSON", lambda: _flows_json(flows, label), "gradient_flow.json", "application/json"),
    ], key="gradient_download")


def _objective_controls(analysis: Analysis, labels, no_labels_reason: str | None) -> tuple | None:
    """The objective picked: (cache key of the objective, its label, the detection index or None); None when it
    cannot be computed (no detection, no ground truth), after saying why."""
    controls = st.columns([2.4, 2])
    with controls[0]:
        options = list(OBJECTIVES)
        objective_kind = st.radio("Objective", options, key="gradient_objective", format_func=OBJECTIVES.get,
                                  index=options.index(initial("gradient_objective", "score", options)),
                                  horizontal=True,
                                  help="What the gradients are gradients of: one detection's score, the sum of "
                                       "every location's score, or the training loss against the annotations.")
    with controls[1]:
        index = detection_picker(analysis, key="gradient_detection") if objective_kind == "score" else None
    if objective_kind == "score" and index is None:
        st.info("No detection to explain at this threshold; choose another objective or lower the threshold.")
        return None
    if objective_kind == "loss" and labels is None:
        st.warning(no_labels_reason, icon=":material/info:")
        return None
    if objective_kind == "score":
        record = analysis.records[index]
        label = f"score of #{index} ({detection_caption(record)}, {level_name(record.level)})"
        return ("score", int(record.row_index)), label, index
    if objective_kind == "sum":
        return ("sum",), "sum of all scores", None
    # The labels' own hash: another annotation file for the same image is another objective.
    labels_hash = hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()
    return ("loss", labels_hash), "training loss vs ground truth", None


def _requested(analysis: Analysis, objective: tuple, label: str) -> bool:
    """Backward passes through the whole model, twice: seconds on a GPU, up to a minute on a busy CPU. They run
    when asked (once per image, model, settings and objective; the result is cached)."""
    request = (analysis.trace_key, objective)
    requested = st.session_state.setdefault("gradient_requested", [])
    if request in requested:
        return True
    prompt = st.empty()
    with prompt.container():
        st.info(f"Ready to compute the gradient flow of the {label} (backward passes with the learned and with "
                "uniform weights; tens of seconds on a CPU).", icon=":material/play_circle:")
        if not st.button("Compute the gradient flow", key="compute_gradient_flow", type="primary"):
            return False
    prompt.empty()
    requested.append(request)
    return True


def _compute_flows(analysis: Analysis, objective: tuple, labels) -> dict | None:
    flows = {}
    progress = st.progress(0.0, text="Computing the gradient flow with the learned weights…")
    try:
        for position, (name, key) in enumerate((("learned", cached.LEARNED), ("uniform", UNIFORM))):
            progress.progress(position / 2, text=f"Computing the gradient flow with the {name} weights…")
            flows[name] = cached.gradient_flow(analysis.image_choice.key, analysis.weights_key,
                                              analysis.settings.size, analysis.settings.device, objective, key,
                                              analysis.image, labels)
    except (RuntimeError, ValueError) as error:  # e.g. out of memory for the backward pass
        st.error(f"The gradient flow could not be computed: {error}. Try a smaller input size.",
                 icon=":material/error:")
        return None
    finally:
        progress.empty()
    return flows


CONFLICT_HELP = {  # by `conflict_undefined`'s reason
    None: "Share of active source locations where two target levels send gradients pointing in opposing directions.",
    "gradient not finite": "The gradient is not finite (see the warning above).",
    "one target level": "Only one target level sends gradient (a detection's score reaches its own level "
                              "only), so no two target levels can disagree. Choose the sum of all scores or the "
                              "training loss to compare conflict.",
}


def _matrices(flows: dict, label: str) -> None:
    broken = [name for name, flow in flows.items() if not flow.finite]
    if broken:
        st.warning(f"The gradient with the {' and the '.join(broken)} weights is not finite (NaN or infinity): the "
                   "objective overflows in this model (an untrained model's box sizes go through exp). Its rates and "
                   "norms are not shown; try another objective or a trained checkpoint.", icon=":material/warning:")
    matrix_max = finite_max(flow.matrix for flow in flows.values())
    columns = st.columns(2, gap="large")
    for column, (name, flow) in zip(columns, flows.items(), strict=True):
        with column:
            st.markdown(f"**{'Learned ASFF weights' if name == 'learned' else 'Uniform weights (counterfactual)'}**")
            metrics = st.columns(3)
            metrics[0].metric("Objective", f"{flow.objective_value:.4g}", help=label)
            reason = conflict_undefined(flow)
            metrics[1].metric("Conflict rate", rate_text(flow.overall_conflict_rate) if reason is None else "n/a",
                              help=CONFLICT_HELP[reason])
            metrics[2].metric("Total value-path norm", f"{flow.matrix.sum():.3g}" if flow.finite else "n/a")
            plotly_chart(charts.matrix_figure(flow.matrix, "gradient norm, target → source", zmax=matrix_max),
                         key=f"gradient_matrix_{name}", config={"displayModeBar": False}, width="stretch")


def _flow_maps(analysis: Analysis, flows: dict, target: int, source: int, opacity: float) -> None:
    source_cell = analysis.cell(source)
    map_max = finite_max(flows[name].maps[target][source] for name in flows)
    columns = st.columns(2, gap="large")
    for column, (name, flow) in zip(columns, flows.items(), strict=True):
        with column:
            figure = charts.image_figure(analysis.image, height=360, dim=0.35)
            relative = flow.maps[target][source] / map_max
            # Below 1 % of the largest value reads as no gradient: left clear, so the image shows through.
            charts.add_weight_map(figure, np.where(relative >= 0.01, relative, np.nan), source_cell,
                                  colormap="magma", opacity=opacity, title="norm / max")
            _add_positives(figure, flow, source, source_cell)
            st.caption(f"{name}: gradient from {level_name(target)} into {level_name(source)} (scale shared by both; "
                       "clear = under 1 % of the largest)")
            plotly_chart(figure, key=f"gradient_map_{name}", config={"displaylogo": False}, width="stretch")


def _conflict_maps(analysis: Analysis, flows: dict, source: int, opacity: float) -> None:
    st.markdown("**Conflict map** of the source level: 0 = the three target levels agree, 1 = they cancel")
    source_cell = analysis.cell(source)
    columns = st.columns(2, gap="large")
    for column, (name, flow) in zip(columns, flows.items(), strict=True):
        with column:
            figure = charts.image_figure(analysis.image, height=360, dim=0.35)
            conflict = np.where(flow.conflict[source].active, flow.conflict_maps[source], np.nan)
            charts.add_weight_map(figure, conflict, source_cell, colormap="inferno", opacity=opacity,
                                  title="cancellation")
            _add_positives(figure, flow, source, source_cell)
            rate = flow.conflict_rate[source]
            at_objects = flow.conflict_rate_at_objects
            extra = (f", at objects {at_objects[source]:.1%}" if at_objects is not None and flow.finite
                     and flow.targets_reached > 1 and np.isfinite(at_objects[source]) else "")
            st.caption(f"{name}: conflict rate at {level_name(source)} {conflict_text(flow, rate)}{extra}; "
                       "blank = no gradient")
            plotly_chart(figure, key=f"conflict_map_{name}", config={"displaylogo": False}, width="stretch")


def _add_positives(figure, flow, source: int, cell: tuple[float, float]) -> None:
    """Outline the ground-truth positive cells (of any level) on the source grid, when ground truth is known."""
    if flow.positives_at_source is None:
        return
    mask = np.asarray(flow.positives_at_source[source]).any(axis=0)
    for row, col in zip(*np.nonzero(mask), strict=True):
        figure.add_shape(type="rect", x0=col * cell[0], y0=row * cell[1], x1=(col + 1) * cell[0],
                         y1=(row + 1) * cell[1], line=dict(color="#00e5ff", width=1.5))


def static_figure(flows: dict, analysis: Analysis, target: int, source: int, opacity: float):
    """The matplotlib figure of what the view shows (matrices, the target -> source maps, conflict maps)."""
    from ...figures import gradients

    return gradients.gradient_flow_comparison(flows, analysis.trace, target, source, alpha=opacity)


def _defined(rate: float, flow) -> float | None:
    return float(rate) if flow.finite and flow.targets_reached > 1 and np.isfinite(rate) else None


def _flows_json(flows: dict, label: str) -> str:
    document = {"objective": label}
    for name, flow in flows.items():
        document[name] = {
            "objective_value": flow.objective_value,
            "counterfactual": flow.counterfactual,
            "matrix_target_by_source": np.asarray(flow.matrix).tolist(),
            "weight_branch_matrix": np.asarray(flow.weight_branch_matrix).tolist(),
            # null where undefined: no active location, or one target level only (nothing can conflict)
            "finite": flow.finite,
            "target_levels_reached": flow.targets_reached,
            "conflict_rate_per_source": [_defined(rate, flow) for rate in np.asarray(flow.conflict_rate).tolist()],
            "overall_conflict_rate": _defined(flow.overall_conflict_rate, flow),
            "neck_path_norms": np.asarray(flow.neck_path_norms).tolist(),
            "total_norms": np.asarray(flow.total_norms).tolist(),
        }
    return json.dumps(document, indent=1)
