"""What every view of the app shares: the analysed image, model and trace, the selection state (picked
detection, picked pixel) kept in the session across views, and the small widgets that edit it.

Selections live under plain session keys (`selected_detection`, `picked_point`); the widgets that edit them
(the detection selectbox, the x/y inputs, the clickable charts) copy into them through callbacks, so a choice
made in one view survives a switch to a view that does not draw that widget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from ..checkpoint import CheckpointError
from . import cached
from .charts import LEVEL_NAMES, SHORT_LEVEL_NAMES
from .inputs import ImageChoice, Settings, WeightsChoice, initial

SELECTED_DETECTION = "selected_detection"
PICKED_POINT = "picked_point"
DOWNLOADS = "offered_downloads"
SLOT_NAMES = ("anchor 1", "anchor 2", "anchor 3", "anchor-free")
# Views list, draw and match at most this many detections (the best by score): an untrained or badly
# thresholded model can return thousands, which no one reads and which would slow every redraw.
MAX_LISTED = 300


@dataclass
class Analysis:
    """One image analysed with one model: the inputs and the cached trace (learned fusion weights)."""

    image_choice: ImageChoice
    image: np.ndarray  # RGB uint8 (H, W, 3), original resolution
    weights: WeightsChoice
    model: Any
    settings: Settings
    trace: Any  # asff_viz.introspection.Trace

    @property
    def weights_key(self) -> tuple[str, str]:
        return (self.weights.path, self.weights.sha256)

    @property
    def trace_key(self) -> tuple:
        """What identifies the learned trace: image bytes, checkpoint content and settings."""
        settings = self.settings
        return (self.image_choice.key, self.weights.sha256, settings.size, settings.conf_threshold,
                settings.nms_threshold)

    @property
    def records(self) -> list:
        """The detections shown: the best `MAX_LISTED` by score (all of them in the downloads)."""
        return list(self.trace.detections[:MAX_LISTED])

    @property
    def class_names(self) -> list[str]:
        return list(self.trace.class_names)

    def counterfactual_trace(self, key: cached.CounterfactualKey):
        settings = self.settings
        return cached.trace(self.image_choice.key, self.weights_key, settings.size, settings.conf_threshold,
                           settings.nms_threshold, settings.device, key, self.image, self.image_choice.name)

    def cell(self, level: int) -> tuple[float, float]:
        """(width, height) of a cell of `level` in original pixels."""
        height, width = self.image.shape[:2]
        stride = self.model.strides[level]
        return stride * width / self.settings.size, stride * height / self.settings.size


def load_model(weights, device: str) -> tuple[object | None, str | None]:
    """(the cached model of `weights` on `device`, None) or (None, a message saying why it cannot load)."""
    try:
        with st.spinner(f"Loading {weights.label}…"):
            return cached.model(weights.path, weights.sha256, device), None
    except CheckpointError as error:
        # An upload is stored under its content hash: name it as the user knows it.
        return None, str(error).replace(weights.path, weights.label)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as error:
        # Anything else a foreign file can provoke while loading: say so and keep the app alive.
        return None, (f"{weights.label}: could not be loaded as a YOLOv3-ASFF checkpoint ({type(error).__name__}: "
                      f"{error}). Choose another checkpoint.")


def level_name(level: int) -> str:
    return LEVEL_NAMES[int(level)]


def detection_caption(record) -> str:
    return f"{record.class_name} {float(record.score):.2f}"


# ---------------------------------------------------------------------------------------------- selection state


def selected_detection(analysis: Analysis) -> int | None:
    """The picked detection's index into `analysis.records` (clamped to the current detections), or None."""
    count = len(analysis.records)
    index = st.session_state.get(SELECTED_DETECTION)
    if count == 0:
        index = None
    elif index is None or not 0 <= int(index) < count:
        index = 0
    st.session_state[SELECTED_DETECTION] = index
    return index


def picked_point(analysis: Analysis) -> tuple[float, float]:
    """The picked pixel (x, y) in original image pixels; the image centre until someone clicks."""
    height, width = analysis.image.shape[:2]
    point = st.session_state.get(PICKED_POINT)
    if point is None or not (0 <= point[0] < width and 0 <= point[1] < height):
        point = (width / 2.0, height / 2.0)
    st.session_state[PICKED_POINT] = point
    return point


def cell_at(analysis: Analysis, level: int, point: tuple[float, float]) -> tuple[int, int]:
    """(row, col) of the cell of `level` that covers original pixel `point` (x, y)."""
    row, col = analysis.trace.cells_at(float(point[0]), float(point[1]))[level]
    return int(row), int(col)


def point_customdata(point: dict) -> list:
    """A selected point's customdata as a list (typed arrays reach Python as {"0": v0, "1": v1, ...})."""
    data = point.get("customdata")
    if isinstance(data, dict):
        return [data[key] for key in sorted(data, key=int)]
    if isinstance(data, (list, tuple)):
        return list(data)
    return [] if data is None else [data]


def on_chart_select(chart_key: str) -> None:
    """Callback of a clickable image chart: a detection marker selects it, a cell point picks that pixel."""
    event = st.session_state.get(chart_key)
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return
    if not points:
        return
    point = points[0]
    data = point_customdata(point)
    if len(data) == 1:
        st.session_state[SELECTED_DETECTION] = int(data[0])
    elif len(data) >= 3 and "x" in point and "y" in point:
        st.session_state[PICKED_POINT] = (float(point["x"]), float(point["y"]))


def detection_picker(analysis: Analysis, key: str = "detection_picker") -> int | None:
    """A selectbox of the detections, in step with clicks on the charts; returns the selected index."""
    index = selected_detection(analysis)
    records = analysis.records
    if index is None:
        st.caption("No detections at this confidence threshold: lower it in the sidebar.")
        return None
    st.session_state[key] = index

    def copy_choice() -> None:
        st.session_state[SELECTED_DETECTION] = st.session_state[key]

    st.selectbox("Detection", list(range(len(records))), key=key, on_change=copy_choice,
                 format_func=lambda i: f"#{i}  {detection_caption(records[i])}  ·  {level_name(records[i].level)}",
                 help="Pick a detection here, in the table, or by clicking the dot at its box centre.")
    return index


def point_picker(analysis: Analysis) -> tuple[float, float]:
    """x and y inputs for the picked pixel, in step with clicks on the weight maps."""
    x, y = picked_point(analysis)
    height, width = analysis.image.shape[:2]
    st.session_state["pick_x"] = int(x)
    st.session_state["pick_y"] = int(y)

    def copy_point() -> None:
        st.session_state[PICKED_POINT] = (st.session_state["pick_x"] + 0.5, st.session_state["pick_y"] + 0.5)

    left, right = st.columns(2)
    left.number_input("x (px)", 0, width - 1, key="pick_x", step=1, on_change=copy_point,
                      help="Column of the picked pixel in the original image. Clicking a map sets it too.")
    right.number_input("y (px)", 0, height - 1, key="pick_y", step=1, on_change=copy_point,
                       help="Row of the picked pixel in the original image.")
    return picked_point(analysis)


def level_control(label: str, key: str, default: int = 1, help: str | None = None, disabled: bool = False) -> int:
    """A three-way level switch (L0 stride 32, L1 stride 16, L2 stride 8)."""
    value = st.segmented_control(label, (0, 1, 2), key=key, format_func=SHORT_LEVEL_NAMES.__getitem__,
                                 default=initial(key, default, (0, 1, 2)), required=True, help=help,
                                 disabled=disabled)
    return int(value if value is not None else default)


def download_row(items: list[tuple[str, Any, str, str]], key: str) -> None:
    """Download buttons side by side: (label, data or zero-argument callable, file name, mime type).

    Callables run only when clicked (rendering a PDF on every redraw would slow every view change). Each item
    is also listed in the session under `DOWNLOADS` (file name -> (data, mime)), so that a test can produce
    every file the current page offers and check it.
    """
    offered = st.session_state.setdefault(DOWNLOADS, {})
    columns = st.columns(len(items))
    for column, (label, data, file_name, mime) in zip(columns, items, strict=True):
        offered[f"{key}/{file_name}"] = (data, mime)
        column.download_button(label, data=data, file_name=file_name, mime=mime, on_click="ignore",
                               key=f"{key}_{file_name}", icon=":material/download:", width="stretch")


def plotly_chart(figure, **kwargs):
    """`st.plotly_chart` with the figure's own colours: Streamlit's theme would restyle the colour scales."""
    return st.plotly_chart(figure, theme=None, **kwargs)
