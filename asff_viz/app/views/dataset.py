"""Across images: `scale-stats` in the app. The mean fusion weight inside objects by COCO size (and in the
background), per target and source level, over a set of images: the bundled samples, a COCO annotation file
with its image folder, or a folder of images (then the model's own detections are the objects).

Each image runs once (the same cached trace the other views use); its per-object means are cached too, so a
second look, or a change of level, costs nothing. Every per-image point is clickable: it opens that image in
the other views.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from ...analyze.cells import COCO_SIZE_LABELS, background_weights, coco_size_bins, mean_weights_in_box
from ...data.errors import DatasetError
from ...inference.transforms import IMAGE_SUFFIXES, ImageError
from ...samples import ANNOTATIONS_FILE, SAMPLES_DIR, list_samples, sample_path
from .. import cached
from ..charts import LEVEL_COLOURS, SHORT_LEVEL_NAMES
from ..inputs import InputError, server_file, server_folder
from ..widgets import Analysis, download_row, level_name

SOURCES = ("Bundled samples", "COCO annotation file", "Image folder")
SIZE_TICKS = (*[label[0].upper() for label in COCO_SIZE_LABELS], "bg")  # S, M, L and the background
SIZE_NAMES = (*COCO_SIZE_LABELS, "background")
MAX_IMAGES = 500  # the app is for looking; `python -m asff_viz.analyze scale-stats` takes whole datasets


@dataclass(frozen=True)
class DatasetItem:
    """One image of the set: its name, where to open it from, and its ground truth (None: use detections)."""

    name: str
    path: Path
    boxes_xyxy: np.ndarray | None  # (K, 4) original pixels
    areas: np.ndarray | None  # (K,) COCO areas, original pixels
    open_as: tuple[str, str]  # (image source, value): how the sidebar selects this image


@dataclass(frozen=True)
class DatasetChoice:
    label: str
    items: tuple[DatasetItem, ...]
    has_ground_truth: bool


def dataset_ui() -> DatasetChoice:
    """The set of images for the across-images view (sidebar expander)."""
    source = st.radio("Images", SOURCES, key="dataset_source",
                      help="The bundled samples; a COCO annotation file and its images (ground truth: objects "
                           "are its boxes); or a folder of images (objects are the model's detections).")
    if source == "Bundled samples":
        # Read as `scale-stats` reads a COCO file (boxes [x, y, x + w, y + h], size bins from the annotations'
        # `area`), so that the samples' numbers are the command's: box areas put a triangle of 575 px (37 x 32 box)
        # in "medium".
        annotated = ({item.name: item for item in coco_choice(ANNOTATIONS_FILE, SAMPLES_DIR).items}
                     if ANNOTATIONS_FILE.is_file() else {})
        items = []
        for name in list_samples():
            found = annotated.get(name)
            items.append(DatasetItem(name, sample_path(name), found.boxes_xyxy if found else None,
                                     found.areas if found else None, ("Sample", name)))
        return DatasetChoice("the bundled samples", tuple(items), all(i.boxes_xyxy is not None for i in items))
    if source == "COCO annotation file":
        annotations = st.text_input("Annotation file (server path)", key="dataset_annotations",
                                    placeholder="data/synthetic/annotations/val.json").strip()
        images = st.text_input("Image folder (server path)", key="dataset_images",
                               placeholder="data/synthetic/images/val").strip()
        if not annotations or not images:
            raise InputError("Type the annotation file and its image folder to look across their images.")
        return coco_choice(server_file(annotations, "annotation file"), server_folder(images))
    folder_text = st.text_input("Image folder (server path)", key="dataset_folder",
                                placeholder="photos/").strip()
    if not folder_text:
        raise InputError("Type a folder of images to look across them.")
    folder = server_folder(folder_text)
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_IMAGES]
    if not paths:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}).")
    items = tuple(DatasetItem(p.name, p, None, None, ("Server path", str(p))) for p in paths)
    return DatasetChoice(str(folder), items, False)


def coco_choice(annotations: Path, images: Path) -> DatasetChoice:
    from ...analyze.sources import AnalysisDataset, AnalysisError

    try:
        dataset = AnalysisDataset(annotations, images, limit=MAX_IMAGES)
    except (AnalysisError, DatasetError) as error:
        raise InputError(str(error)) from None
    items = []
    for image in dataset:
        truth = image.ground_truth
        items.append(DatasetItem(image.file_name, image.path, truth.boxes, truth.areas,
                                 ("Server path", str(image.path))))
    return DatasetChoice(str(annotations), tuple(items), True)


@st.cache_data(show_spinner=False, max_entries=4096)
def image_rows(image_key: str, weights: tuple[str, str], size: int, conf_threshold: float, nms_threshold: float,
               device: str, boxes_key: str, _path: Path, _name: str, _boxes: np.ndarray | None,
               _areas: np.ndarray | None) -> list[dict]:
    """Per-object mean weights of one image (and its background): rows of (size, target, source, weight).

    Without ground truth the objects are the detections at the confidence threshold. The image is read and
    decoded only when these rows are not cached yet (ImageError or OSError when it cannot be).
    """
    image = cached.decode_image(image_key, _name, _path.read_bytes())
    trace = cached.trace(image_key, weights, size, conf_threshold, nms_threshold, device, cached.LEARNED, image, _name)
    if _boxes is None:
        boxes = np.array([record.box_xyxy for record in trace.detections], dtype=np.float64).reshape(-1, 4)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    else:
        boxes, areas = np.asarray(_boxes, dtype=np.float64).reshape(-1, 4), np.asarray(_areas, dtype=np.float64)
    transform = trace.transform
    scale = np.array([1 / transform.scale_x, 1 / transform.scale_y] * 2)
    boxes_input = boxes * scale
    rows = []
    for box, size_bin in zip(boxes_input, coco_size_bins(areas), strict=True):
        means = mean_weights_in_box(trace.fusion_weights, box, trace.strides)
        rows += [{"size": SIZE_NAMES[int(size_bin)], "target": t, "source": s, "weight": float(means[t, s])}
                 for t in range(3) for s in range(3)]
    background = background_weights(trace.fusion_weights, boxes_input, trace.strides)
    if background is not None:
        rows += [{"size": "background", "target": t, "source": s, "weight": float(background[t, s])}
                 for t in range(3) for s in range(3)]
    return rows


def dataset_view(analysis: Analysis, choice: DatasetChoice | None, error: str | None) -> None:
    st.caption("The mean fusion weight inside objects, by COCO object size (small < 32², medium < 96², large, in "
               "original pixels), and in the background (the cells outside every object, one mean per image), per "
               "target and source level: `scale-stats` over a set of images. Each bar is the mean over all the "
               "objects of its size (as in the table below and in `scale-stats`); each dot is one image's mean over "
               "its own objects: click it to open that image in the other views.")
    if error:
        st.warning(error, icon=":material/folder_open:")
        return
    if choice is None:
        return
    settings = analysis.settings
    identity = hashlib.sha256(repr((choice.label, [str(i.path) for i in choice.items], analysis.weights.sha256,
                                    settings)).encode()).hexdigest()
    requested = st.session_state.setdefault("dataset_requested", [])
    objects = "its annotated objects" if choice.has_ground_truth else "the model's detections (no ground truth)"
    if identity not in requested and choice.label != "the bundled samples":
        st.info(f"{len(choice.items)} images of {choice.label}; the objects are {objects}.",
                icon=":material/play_circle:")
        if not st.button(f"Run over {len(choice.items)} images", key="run_dataset", type="primary"):
            return
    if identity not in requested:
        requested.append(identity)
    rows, failed = collect(analysis, choice)
    if failed:
        st.warning(f"{len(failed)} of {len(choice.items)} images could not be read and were skipped (e.g. "
                   f"{failed[0]}).", icon=":material/broken_image:")
    if not rows:
        st.info("No objects in these images at this threshold.")
        return
    table = pd.DataFrame(rows)
    target = st.segmented_control("Target level", (0, 1, 2), key="dataset_target", default=2, required=True,
                                  format_func=SHORT_LEVEL_NAMES.__getitem__,
                                  help="The level whose fusion weights are summarized.")
    target = 2 if target is None else int(target)
    figure = dataset_figure(table, target, len(choice.items))
    st.plotly_chart(figure, key="dataset_chart", on_select=lambda: open_clicked(choice), selection_mode="points",
                    theme=None, config={"displaylogo": False}, width="stretch")
    summary = summary_table(table)
    st.dataframe(summary, hide_index=True, width="stretch")
    counts = table[(table.target == 0) & (table.source == 0)].groupby("size").size()
    st.caption(f"{len(choice.items) - len(failed)} images, objects by size: "
               + ", ".join(f"{name} {int(counts.get(name, 0))}" for name in COCO_SIZE_LABELS)
               + f"; objects are {objects}; input {settings.size} px.")
    download_row([("Per-object CSV", lambda: table.to_csv(index=False), "fusion_by_size_objects.csv", "text/csv"),
                  ("Summary CSV", lambda: summary.to_csv(index=False), "fusion_by_size.csv", "text/csv")],
                 key="dataset_download")


def collect(analysis: Analysis, choice: DatasetChoice) -> tuple[list[dict], list[str]]:
    """Every image's rows (image index attached), with a progress bar; (rows, unreadable image messages)."""
    settings = analysis.settings
    rows, failed = [], []
    progress = st.progress(0.0, text=f"Looking at {len(choice.items)} images…")
    try:
        for index, item in enumerate(choice.items):
            progress.progress(index / len(choice.items), text=f"{item.name} ({index + 1} of {len(choice.items)})")
            boxes_key = "" if item.boxes_xyxy is None else hashlib.sha256(
                np.ascontiguousarray(item.boxes_xyxy).tobytes()).hexdigest()
            try:
                # The content hash, recomputed only when the file changes: a redraw reads no image.
                status = item.path.stat()
                key = cached.file_sha256(str(item.path), status.st_mtime_ns, status.st_size)
                found = image_rows(key, analysis.weights_key, settings.size, settings.conf_threshold,
                                   settings.nms_threshold, settings.device, boxes_key, item.path, item.name,
                                   item.boxes_xyxy, item.areas)
            except (OSError, ImageError) as error:
                failed.append(str(error) if item.name in str(error) else f"{item.name}: {error}")
                continue
            rows.extend({**row, "image": index, "image_name": item.name} for row in found)
    finally:
        progress.empty()
    return rows, failed


def dataset_figure(table: pd.DataFrame, target: int, images: int) -> go.Figure:
    """One panel per source level, by size: the mean over all objects (bar, the summary table's number) and each
    image's mean over its own objects (dots, clickable). The bar is not the mean of the dots: an image with many
    objects of a size weighs more in it."""
    figure = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.04,
                           subplot_titles=[f"source {name}" for name in SHORT_LEVEL_NAMES])
    chosen = table[table.target == target]
    per_image = chosen.groupby(["source", "size", "image", "image_name"], as_index=False)["weight"].mean()
    rng = np.random.default_rng(0)
    for source in range(3):
        part = per_image[per_image.source == source]
        means = chosen[chosen.source == source].groupby("size")["weight"].mean()
        positions = {name: index for index, name in enumerate(SIZE_NAMES)}
        # Numeric x for bars and dots alike (a categorical axis would drop the jittered dots).
        figure.add_trace(go.Bar(x=list(range(len(SIZE_NAMES))),
                                y=[float(means.get(name, np.nan)) for name in SIZE_NAMES],
                                marker_color=LEVEL_COLOURS[source], opacity=0.35, name="mean over objects",
                                hovertemplate="mean over the objects %{y:.3f}<extra></extra>", showlegend=False),
                         row=1, col=source + 1)
        x = [positions[name] + rng.uniform(-0.25, 0.25) for name in part["size"]]
        figure.add_trace(go.Scatter(
            x=x, y=part["weight"], mode="markers", name="images", showlegend=False,
            marker=dict(size=8, color=LEVEL_COLOURS[source], line=dict(color="white", width=1)),
            customdata=np.column_stack([part["image"], part["image_name"]]),
            hovertemplate="%{customdata[1]}<br>mean weight %{y:.3f}<extra>click to open</extra>"),
            row=1, col=source + 1)
        figure.update_xaxes(tickvals=list(range(4)), ticktext=list(SIZE_TICKS), range=[-0.6, 3.6], row=1,
                            col=source + 1)
    figure.update_yaxes(range=[0, 1], title_text=f"weight at target {level_name(target)}", row=1, col=1)
    figure.update_layout(height=380, margin=dict(l=60, r=10, t=40, b=30), clickmode="event+select",
                         barmode="overlay", plot_bgcolor="rgba(0,0,0,0)", paper_bgcolor="rgba(0,0,0,0)")
    return figure


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean weight (and object count) per target level, size and source: the numbers behind the figure."""
    summary = table.groupby(["target", "size", "source"], as_index=False)["weight"].agg(["mean", "count"])
    summary["target"] = summary["target"].map(lambda level: SHORT_LEVEL_NAMES[level])
    summary["source"] = summary["source"].map(lambda level: SHORT_LEVEL_NAMES[level])
    summary["size"] = pd.Categorical(summary["size"], SIZE_NAMES, ordered=True)
    return summary.sort_values(["target", "size", "source"]).rename(columns={"mean": "mean weight",
                                                                             "count": "objects"})


def open_clicked(choice: DatasetChoice) -> None:
    """Chart callback: open the clicked image in the other views (through the sidebar's own controls)."""
    event = st.session_state.get("dataset_chart")
    try:
        point = event["selection"]["points"][0]
    except (KeyError, TypeError, IndexError):
        return
    data = point.get("customdata")
    data = [data[key] for key in sorted(data, key=int)] if isinstance(data, dict) else data
    if not data:
        return
    index = int(float(data[0]))
    if not 0 <= index < len(choice.items):
        return
    open_image(choice.items[index])


def open_image(item: DatasetItem) -> None:
    source, value = item.open_as
    st.session_state["image_source"] = source
    st.session_state["sample_name" if source == "Sample" else "image_path"] = value
    st.session_state["view"] = "Fusion weights"
