"""The fusion-weights explorer: a Streamlit component that switches view, level, source, opacity, colormap and
boxes in the browser, from data sent once per image (all nine weight maps of an image are a few thousand numbers).

The component (`index.html`, plain JavaScript over the plotly.js that ships with the plotly package) reports its
state back; `FusionState` holds it in the session under the keys the other views read (`fusion_mode`,
`fusion_target`, ...), and every run passes it in again, so the controls always show what the app holds.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from .. import cached, charts

KEY = "fusion_explorer"
MODES = ("Overlay", "RGB composite", "Entropy", "Figure 3 grid")
HERE = Path(__file__).resolve().parent
CHART_HEIGHT = 580


@dataclass
class FusionState:
    """What the fusion view shows: view mode, target and source level, opacity, colormap, boxes on or off.

    `seq` counts the changes made in the browser, so that a run answering an older change cannot undo a newer
    one there.
    """

    mode: str = MODES[0]
    target: int = 1
    source: int = 0
    opacity: float = 0.6
    colormap: str = "viridis"
    show_boxes: bool = True
    seq: int = 0

    SESSION_KEYS = {"mode": "fusion_mode", "target": "fusion_target", "source": "fusion_source",
                    "opacity": "fusion_opacity", "colormap": "fusion_colormap", "show_boxes": "fusion_boxes",
                    "seq": "fusion_seq"}

    @classmethod
    def from_session(cls) -> FusionState:
        values = {name: st.session_state[key] for name, key in cls.SESSION_KEYS.items() if key in st.session_state}
        return cls(**values).valid()

    def to_session(self) -> None:
        for name, key in self.SESSION_KEYS.items():
            st.session_state[key] = getattr(self, name)

    def valid(self) -> FusionState:
        """The same state with every field inside its allowed values (anything else back to its default)."""
        default = FusionState()
        return FusionState(
            mode=self.mode if self.mode in MODES else default.mode,
            target=int(self.target) if self.target in (0, 1, 2) else default.target,
            source=int(self.source) if self.source in (0, 1, 2) else default.source,
            opacity=float(min(max(float(self.opacity), 0.0), 1.0)) if _is_number(self.opacity) else default.opacity,
            colormap=self.colormap if self.colormap in charts.COLORMAPS else default.colormap,
            show_boxes=bool(self.show_boxes), seq=int(self.seq) if _is_number(self.seq) else 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def apply_browser_value(value: Any) -> dict | None:
    """Take the component's last report into the session: its state, and a click not handled before.

    Returns the click ({"x", "y"} for a cell, {"detection": index} for a box centre) or None.
    """
    if not isinstance(value, dict):
        return None
    fields = {name: value[name] for name in FusionState.SESSION_KEYS if name in value}
    current = FusionState.from_session()
    if int(fields.get("seq", 0) or 0) >= current.seq:
        FusionState(**{**asdict(current), **fields}).valid().to_session()
    click = value.get("click")
    if not isinstance(click, dict) or click.get("id") == st.session_state.get("fusion_click_id"):
        return None
    st.session_state["fusion_click_id"] = click.get("id")
    return click


def _component():
    """The declared component, served from a folder holding index.html and plotly.min.js (copied once from the
    plotly package: no download, no build)."""
    if "component" not in _COMPONENT:
        import plotly
        import streamlit.components.v1 as components

        page = (HERE / "index.html").read_bytes()
        script = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
        tag = hashlib.sha256(page + plotly.__version__.encode()).hexdigest()[:12]
        folder = Path(tempfile.gettempdir()) / f"asff_viz_explorer_{tag}"
        if not (folder / "plotly.min.js").is_file():
            staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
            (staging / "index.html").write_bytes(page)
            shutil.copyfile(script, staging / "plotly.min.js")
            try:
                staging.rename(folder)
            except OSError:  # another process made it first
                shutil.rmtree(staging, ignore_errors=True)
        _COMPONENT["component"] = components.declare_component("fusion_explorer", path=str(folder))
    return _COMPONENT["component"]


_COMPONENT: dict = {}


def explorer_arguments(analysis, state: FusionState, records: list, selected: int | None, picked_cells: list,
                       captions: list[str]) -> dict:
    """Everything the component draws, as plain JSON: the image (a JPEG data URI, downscaled for display), the
    nine weight maps (3 decimals), cell sizes, boxes and the state."""
    height, width = analysis.image.shape[:2]
    uri = cached.display_image(analysis.image_choice.key, analysis.image)
    weights = [np.round(np.asarray(level, dtype=np.float64), 3).tolist() for level in analysis.trace.fusion_weights]
    boxes = [{"xyxy": [float(v) for v in np.nan_to_num(np.asarray(r.box_xyxy, dtype=np.float64), nan=0.0,
                                                        posinf=1e6, neginf=-1e6)],
              "colour": charts.class_colour(r.label), "caption": caption}
             for r, caption in zip(records, captions, strict=True)]
    return {"image": uri, "image_key": analysis.image_choice.key, "width": width, "height": height,
            "weights": weights, "cells": [list(analysis.cell(level)) for level in range(3)],
            "display_scale": min(CHART_HEIGHT / height, 900 / width), "chart_height": CHART_HEIGHT,
            "boxes": boxes, "selected": -1 if selected is None else int(selected), "picked_cells": picked_cells,
            "colorscales": {name: charts.plotly_colorscale(name) for name in charts.COLORMAPS},
            "state": asdict(state)}


def fusion_explorer(arguments: dict) -> Any:
    """Draw the explorer; returns its last report (None before the first interaction)."""
    return _component()(**arguments, key=KEY, default=None)
