"""The Streamlit app: a sidebar to choose image, weights and settings; views over one cached trace.

Run with `streamlit run app.py` (or `make app`). Every view reads cached results (`asff_viz.app.cached`):
the model runs once per image, weights and settings, and view changes only redraw.
"""

from __future__ import annotations

import streamlit as st

from ..checkpoint import CheckpointError
from ..inference.transforms import ImageError
from ..introspection.capture import has_fusion_weights
from ..utils.allocator import keep_freed_memory
from . import cached
from .inputs import InputError, device_ui, image_ui, settings_ui, weights_ui
from .views.dataset import dataset_ui
from .widgets import MAX_LISTED, Analysis, load_model

TITLE = "ASFF fusion explorer"
INTRO = ("At each pyramid level, ASFF blends the features of all three levels with per-pixel softmax weights that "
         "sum to one. See where each level listened to which, which level and cell produced each detection, how "
         "gradients flow between levels, and what changes when the learned weights are replaced.")
VIEWS = ("Fusion weights", "Detections", "Gradient flow", "Counterfactuals", "Compare checkpoints", "Across images")
DETECTION_ONLY_VIEWS = ("Detections", "Compare checkpoints")
SYNTHETIC_NOTE = ("This model was trained on the project's **synthetic shapes** only (circle, square, star, …): on a "
                  "photograph its boxes and labels are shape names and mean nothing. To analyse real images, load "
                  "COCO weights, e.g. the official `YOLOv3-ASFF_40.6.pth`, under **Model** in the sidebar (Path or "
                  "Upload); the fusion weights and gradients of the shapes model are still what it computes.")


def knows_only_synthetic_shapes(model) -> bool:
    """Whether `model` is a model of the synthetic shapes dataset (the embedded default is)."""
    from ..data.synthetic import CLASS_NAMES

    names = (getattr(model, "metadata", None) or {}).get("class_names") or []
    return list(names) == list(CLASS_NAMES)


def _guarded(function, *args, **kwargs):
    """Run a sidebar step; a user-facing error becomes a message (returned second) instead of a crash."""
    try:
        return function(*args, **kwargs), None
    except (InputError, ImageError, CheckpointError) as error:
        return None, str(error)


def model_card(model, weights) -> None:
    metadata = getattr(model, "metadata", {}) or {}
    variant = metadata.get("variant", model.config.variant)
    origin = "official checkpoint" if metadata.get("origin") == "official" else "asff_viz checkpoint"
    classes = metadata.get("class_names") or []
    preview = ", ".join(classes[:4]) + (", …" if len(classes) > 4 else "")
    st.caption(f"**{variant}** · {origin} · {model.num_classes} classes ({preview}) · input "
               f"{metadata.get('input_size', '?')} px · sha256 `{weights.sha256[:12]}`")


def sidebar() -> tuple:
    """Draw the sidebar; returns (image choice, weights, model, settings, errors)."""
    errors = []
    with st.sidebar:
        st.markdown(f"### {TITLE}")
        st.markdown("**Image**")
        image_choice, error = _guarded(image_ui)
        errors += [error] if error else []
        st.markdown("**Model**")
        weights, error = _guarded(weights_ui)
        errors += [error] if error else []
        device = device_ui()
        model = None
        if weights is not None:
            model, error = load_model(weights, device)
            errors += [error] if error else []
            if model is not None:
                model_card(model, weights)
        st.markdown("**Settings**")
        default_size = int((getattr(model, "metadata", None) or {}).get("input_size", 416)) if model else 416
        settings = settings_ui(default_size, device)
        with st.expander("Across images", icon=":material/photo_library:"):
            st.caption("The set of images the *Across images* view summarizes.")
            dataset = _guarded(dataset_ui)
    return image_choice, weights, model, settings, errors, dataset


def main() -> None:
    keep_freed_memory()  # once per process
    st.set_page_config(page_title=TITLE, page_icon=":material/stacked_line_chart:", layout="wide",
                       initial_sidebar_state="expanded")
    st.html("<style>[data-testid='stMainBlockContainer'] {padding-top: 2.2rem; padding-bottom: 2rem}</style>")
    image_choice, weights, model, settings, errors, dataset = sidebar()
    st.title(TITLE, anchor=False)
    st.caption(INTRO)
    for error in errors:
        st.error(error, icon=":material/error:")
    if errors or image_choice is None or model is None:
        if not errors:
            st.info("Choose an image and a model in the sidebar.")
        return
    try:
        image = cached.decode_image(image_choice.key, image_choice.name, image_choice.data)
    except ImageError as error:
        st.error(str(error), icon=":material/broken_image:")
        return

    if knows_only_synthetic_shapes(model) and st.session_state.get("image_source") != "Sample":
        st.info(SYNTHETIC_NOTE, icon=":material/category:")
    if not has_fusion_weights(model):
        st.warning(f"This model fuses its pyramid levels by **{model.config.fusion}**, without learned weights: "
                   "only its detections and the comparison view are available. Load an ASFF checkpoint to see "
                   "fusion weights.", icon=":material/info:")
        analysis = None
    else:
        try:
            with st.spinner(f"Running the model on {image_choice.name} at {settings.size} px…"):
                trace, seconds = cached.timed_trace(image_choice.key, (weights.path, weights.sha256), settings.size,
                                                   settings.conf_threshold, settings.nms_threshold,
                                                   settings.device, cached.LEARNED, image, image_choice.name)
        except (RuntimeError, ValueError) as error:  # e.g. out of memory on the device
            st.error(f"The model could not run on {image_choice.name} at {settings.size} px on "
                     f"{settings.device}: {error}. Try a smaller input size or another device.",
                     icon=":material/error:")
            return
        analysis = Analysis(image_choice, image, weights, model, settings, trace)
        summary(analysis, seconds)

    views(analysis, image_choice, image, weights, model, settings, dataset)


def summary(analysis: Analysis, seconds: float) -> None:
    records = analysis.trace.detections
    height, width = analysis.image.shape[:2]
    per_level = [sum(1 for record in records if int(record.level) == level) for level in range(3)]
    columns = st.columns([1, 1, 1.5, 1, 1])
    columns[0].metric("Image", f"{width}×{height}", help=analysis.image_choice.name)
    columns[1].metric("Detections", len(records), help="At the sidebar's confidence threshold, after NMS.")
    columns[2].metric("By level (L0 / L1 / L2)", " / ".join(str(count) for count in per_level),
                      help="How many detections each pyramid level produced (stride 32 / 16 / 8).")
    columns[3].metric("Input size", f"{analysis.settings.size} px")
    columns[4].metric("Model time", f"{seconds:.2f} s",
                      help="Time the model took on this image and settings (pre-processing, forward pass with the "
                           "fusion weights captured, decoding, NMS). It runs once; views reuse the result.")
    total = len(analysis.trace.detections)
    if total > MAX_LISTED:
        st.warning(f"{total} detections pass the confidence threshold; the views show the best {MAX_LISTED}. Raise "
                   "the threshold in the sidebar to see fewer.", icon=":material/filter_alt:")


def views(analysis, image_choice, image, weights, model, settings, dataset) -> None:
    """The tabs. Only the open one runs (lazy tabs); each view is a fragment, so its own controls rerun just
    the view, not the sidebar and the trace lookup."""
    from .views.compare import compare_view
    from .views.counterfactual import counterfactual_view
    from .views.dataset import dataset_view
    from .views.detection import detection_view, detections_only_view
    from .views.fusion import fusion_view
    from .views.gradient import gradient_view

    names = VIEWS if analysis is not None else DETECTION_ONLY_VIEWS
    # The default is part of the tabs' identity: keep it constant, or the open tab resets.
    tabs = st.tabs(names, key="view", on_change="rerun", default=names[0])
    for name, tab in zip(names, tabs, strict=True):
        if not tab.open:
            continue
        with tab:
            if analysis is None:
                if name == "Detections":
                    detections_only_view(image_choice, image, weights, model, settings)
                else:
                    compare_view(None, image_choice=image_choice, image=image, weights=weights, settings=settings)
            elif name == "Fusion weights":
                fusion_view(analysis)
            elif name == "Detections":
                detection_view(analysis)
            elif name == "Gradient flow":
                gradient_view(analysis)
            elif name == "Counterfactuals":
                counterfactual_view(analysis)
            elif name == "Across images":
                dataset_view(analysis, *dataset)
            else:
                compare_view(analysis, image_choice=image_choice, image=image, weights=weights, settings=settings)
