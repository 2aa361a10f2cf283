"""Interactive plotly figures of the app: the image in original-pixel coordinates with maps, boxes and a
clickable cell grid on top. Pure functions of arrays (no model, no Streamlit).

Coordinates: x, y in original image pixels with pixel i covering [i, i + 1] (the convention of the boxes and
of `ImageTransform`), so a map cell (row, col) of a level with stride s covers
x in [col * s * scale_x, (col + 1) * s * scale_x] exactly, as the model's plain square resize implies.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import cv2
import numpy as np
import plotly.graph_objects as go

from ..figures import traces
from ..figures.palette import class_color

LEVEL_NAMES = ("L0 · stride 32", "L1 · stride 16", "L2 · stride 8")
SHORT_LEVEL_NAMES = ("L0 · s32", "L1 · s16", "L2 · s8")
LEVEL_COLOURS = ("#e4572e", "#2e9e4f", "#2f6fdb")  # the RGB composite's red, green, blue, softened
# Colormaps offered for weight maps: matplotlib names, which plotly also knows.
COLORMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "turbo", "gray")
MAX_DISPLAY_SIDE = 1024  # the image sent to the browser is at most this wide or tall; axes stay in original px


def class_colour(label: int) -> str:
    """The class's colour: the one palette (`asff_viz.figures.palette`)."""
    return class_color(label)


def plotly_colorscale(name: str) -> list[list]:
    """The named scale as explicit [position, colour] stops, safe to send through Streamlit.

    Streamlit's front end reads `#000001`..`#000040` as placeholders for its theme colours and replaces them
    (magma and inferno start at `#000004`, which arrived as lilac `#ab63fa`: zero drawn as a large value).
    Such colours are sent one red step up (`#010004`), which no eye can tell apart.
    """
    import plotly.colors

    stops = plotly.colors.get_colorscale("greys_r" if name == "gray" else name)
    return [[float(position), _streamlit_safe(colour)] for position, colour in stops]


def _streamlit_safe(colour: str) -> str:
    """`colour` as #rrggbb, moved off Streamlit's placeholder range #000001..#000040."""
    if colour.startswith("rgb"):
        red, green, blue = (int(float(v)) for v in colour[colour.index("(") + 1:colour.index(")")].split(","))
    else:
        red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    if red == 0 and green == 0 and 1 <= blue <= 0x40:
        red = 1
    return f"#{red:02x}{green:02x}{blue:02x}"


def _data_uri(image: np.ndarray) -> tuple[str, float]:
    """RGB uint8 (H, W, 3) -> (JPEG data URI of a copy at most MAX_DISPLAY_SIDE, display pixel size)."""
    height, width = image.shape[:2]
    factor = max(1.0, max(height, width) / MAX_DISPLAY_SIDE)
    if factor > 1.0:
        image = cv2.resize(image, (round(width / factor), round(height / factor)), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise ValueError("could not encode the image for display")
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode("ascii"), factor


def image_figure(image: np.ndarray, height: int = 560, dim: float = 0.0) -> go.Figure:
    """The image (RGB uint8 (H, W, 3)) on axes in original pixels, y down, equal aspect, no margins.

    `dim` in 0..1 fades the image towards grey, so maps drawn on top read better.
    """
    original_height, original_width = image.shape[:2]
    if dim > 0:
        image = (image.astype(np.float32) * (1 - dim) + 128.0 * dim).astype(np.uint8)
    uri, factor = _data_uri(image)
    figure = go.Figure(go.Image(source=uri, x0=factor / 2, y0=factor / 2, dx=factor, dy=factor,
                                hoverinfo="skip", name="image"))
    figure.update_xaxes(range=[0, original_width], showgrid=False, zeroline=False, visible=False,
                        constrain="domain")
    figure.update_yaxes(range=[original_height, 0], showgrid=False, zeroline=False, visible=False,
                        scaleanchor="x", scaleratio=1, constrain="domain")
    figure.update_layout(height=height, margin=dict(l=0, r=0, t=0, b=0), dragmode=False, showlegend=False,
                         hovermode="closest", hoverdistance=40, clickmode="event+select",
                         plot_bgcolor="rgba(0,0,0,0)", paper_bgcolor="rgba(0,0,0,0)")
    return figure


def add_weight_map(figure: go.Figure, values: np.ndarray, cell: tuple[float, float], *, colormap: str,
                   opacity: float, title: str) -> None:
    """A (H_l, W_l) map in 0..1 as exact cell rectangles, fixed 0..1 colour scale, colorbar titled `title`."""
    add_map(figure, values, cell, colormap=colormap, opacity=opacity, title=title, zmin=0.0, zmax=1.0)


def add_map(figure: go.Figure, values: np.ndarray, cell: tuple[float, float], *, colormap: str, opacity: float,
            title: str, zmin: float, zmax: float, show_scale: bool = True) -> None:
    """A (H, W) map whose cell (row, col) covers x in [col, col + 1] * cell[0], y likewise; NaN = transparent."""
    ticks = np.linspace(zmin, zmax, 5)
    figure.add_trace(go.Heatmap(
        z=np.asarray(values, dtype=np.float32), x0=cell[0] / 2, dx=cell[0], y0=cell[1] / 2, dy=cell[1],
        zmin=zmin, zmax=zmax, colorscale=plotly_colorscale(colormap), opacity=opacity, hoverinfo="skip",
        showscale=show_scale, name=title,
        colorbar=dict(title=dict(text=title, side="right"), thickness=14, len=0.9, tickvals=ticks.tolist(),
                      ticktext=[f"{tick:.2g}" for tick in ticks]),
    ))


def add_boxes(figure: go.Figure, boxes: np.ndarray, labels: Sequence[int], captions: Sequence[str], *,
              selected: int | None = None, clickable: bool = True, dash: str | None = None,
              colour: str | None = None, max_captions: int = 60) -> None:
    """xyxy boxes in original pixels with captions; with `clickable`, a marker at each centre selects it.

    The centre markers carry customdata = (detection index,).
    """
    # An untrained model can predict infinite sizes; keep such boxes drawable (and the JSON valid).
    boxes = np.nan_to_num(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), nan=0.0, posinf=1e6, neginf=-1e6)
    labels = [int(label) for label in labels]
    # One trace per colour (not per box): hundreds of boxes stay one light figure.
    outlines: dict[str, tuple[list, list]] = {}
    for box, label in zip(boxes, labels, strict=True):
        x1, y1, x2, y2 = box
        xs, ys = outlines.setdefault(colour or class_colour(label), ([], []))
        xs += [x1, x2, x2, x1, x1, None]
        ys += [y1, y1, y2, y2, y1, None]
    for line_colour, (xs, ys) in outlines.items():
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", name="boxes", showlegend=False,
                                    line=dict(color=line_colour, width=2, dash=dash)))
    if selected is not None and 0 <= selected < len(boxes):
        # White under coloured: the picked box stands out on any background.
        x1, y1, x2, y2 = boxes[selected]
        for line_colour, width in (("#ffffff", 6), (colour or class_colour(labels[selected]), 2.5)):
            figure.add_trace(go.Scatter(x=[x1, x2, x2, x1, x1], y=[y1, y1, y2, y2, y1], mode="lines",
                                        hoverinfo="skip", line=dict(color=line_colour, width=width),
                                        name="selected", showlegend=False))
    # Captions as one batch of layout annotations: adding them one by one revalidates the layout each time.
    annotations = [dict(x=boxes[index, 0], y=boxes[index, 1], text=captions[index], showarrow=False,
                        xanchor="left", yanchor="bottom", font=dict(size=11, color="black"),
                        bgcolor=colour or class_colour(labels[index]), opacity=0.9, borderpad=1)
                   for index in range(len(boxes))
                   if captions[index] and (index < max_captions or index == selected)]
    if annotations:
        figure.update_layout(annotations=list(figure.layout.annotations) + annotations)
    if clickable and len(boxes):
        centres_x = (boxes[:, 0] + boxes[:, 2]) / 2
        centres_y = (boxes[:, 1] + boxes[:, 3]) / 2
        colours = [class_colour(label) for label in labels]
        figure.add_trace(go.Scatter(
            x=centres_x, y=centres_y, mode="markers", name="detections", showlegend=False,
            customdata=np.arange(len(boxes))[:, None],
            marker=dict(size=11, color=colours, line=dict(color="white", width=1.5), symbol="circle"),
            selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)),
            text=list(captions), hovertemplate="#%{customdata[0]} %{text}<extra>click to select</extra>",
        ))


def weights_bar(weights: Sequence[float], height: int = 190, title: str = "") -> go.Figure:
    """Three fusion weights (sources L0, L1, L2) as bars on a fixed 0..1 axis."""
    values = [float(value) for value in weights]
    figure = go.Figure(go.Bar(
        x=[name.split(" ·")[0] + " (s" + name.split("stride ")[1] + ")" for name in LEVEL_NAMES], y=values,
        marker_color=list(LEVEL_COLOURS), text=[f"{value:.3f}" for value in values], textposition="outside",
        hovertemplate="%{x}: %{y:.4f}<extra></extra>", cliponaxis=False))
    figure.update_yaxes(range=[0, 1.12], tickvals=[0, 0.5, 1], title=None, fixedrange=True)
    figure.update_xaxes(fixedrange=True)
    figure.update_layout(height=height, margin=dict(l=30, r=10, t=34 if title else 8, b=30),
                         title=dict(text=title, font=dict(size=13)) if title else None, showlegend=False,
                         plot_bgcolor="rgba(0,0,0,0)", paper_bgcolor="rgba(0,0,0,0)")
    return figure


def matrix_figure(matrix: np.ndarray, title: str, colorscale: str = "magma", zmax: float | None = None,
                  height: int = 300, value_format: str = ".2g") -> go.Figure:
    """A (3, 3) target x source matrix as an annotated heatmap (rows: target level, columns: source level)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    labels = [name.split(" ·")[0] for name in LEVEL_NAMES]
    text = [[format(value, value_format) for value in row] for row in matrix]
    figure = go.Figure(go.Heatmap(
        z=matrix, x=[f"from {label}" for label in labels], y=[f"to {label}" for label in labels],
        colorscale=plotly_colorscale(colorscale), zmin=0.0,
        zmax=zmax if zmax is not None else float(matrix.max() or 1.0),
        text=text, texttemplate="%{text}", hovertemplate="%{y} %{x}: %{z:.4g}<extra></extra>",
        colorbar=dict(thickness=12)))
    figure.update_yaxes(autorange="reversed", fixedrange=True, automargin=True)
    figure.update_xaxes(side="top", fixedrange=True, automargin=True)
    # The left margin holds the row labels ("to L0"): wide enough without relying on automargin alone.
    figure.update_layout(height=height, margin=dict(l=64, r=10, t=60, b=10),
                         title=dict(text=title, font=dict(size=14), y=0.98))
    return figure


def figure3_mosaic(image: np.ndarray, weights: Sequence[np.ndarray], *, opacity: float, colormap: str,
                   panel_side: int = 340, gap: int = 6) -> go.Figure:
    """The paper's Figure 3 as one picture: 3 x 3 overlays (rows: target level, columns: source level).

    image: RGB uint8 (H, W, 3); weights: 3 arrays (3, H_l, W_l), level 0 first, each cell covering its exact
    footprint on the image. Maps are blended on a downscaled copy (long side `panel_side`), so redrawing for
    another opacity or colormap takes milliseconds; the fixed 0..1 colorbar comes from an invisible heatmap.
    """
    height, width = image.shape[:2]
    scale = panel_side / max(height, width)
    panel_width, panel_height = max(1, round(width * scale)), max(1, round(height * scale))
    small = cv2.resize(image, (panel_width, panel_height), interpolation=cv2.INTER_AREA)
    mosaic = np.full((3 * panel_height + 2 * gap, 3 * panel_width + 2 * gap, 3), 255, np.uint8)
    for target in range(3):
        for source in range(3):
            values = cv2.resize(np.asarray(weights[target][source], dtype=np.float32), (panel_width, panel_height),
                                interpolation=cv2.INTER_NEAREST)
            top, left = target * (panel_height + gap), source * (panel_width + gap)
            mosaic[top:top + panel_height, left:left + panel_width] = traces.weight_overlay_array(
                small, values, alpha=opacity, cmap=colormap)
    uri, _ = _data_uri(mosaic)
    figure = go.Figure(go.Image(source=uri, hoverinfo="skip"))
    figure.add_trace(go.Heatmap(z=[[0.0, 1.0]], x=[-10, -9], y=[-10, -9], zmin=0, zmax=1, opacity=0,
                                colorscale=plotly_colorscale(colormap), hoverinfo="skip",
                                colorbar=dict(title=dict(text="fusion weight", side="right"), thickness=14,
                                              tickvals=[0, 0.25, 0.5, 0.75, 1])))
    for index in range(3):
        figure.add_annotation(x=index * (panel_width + gap) + panel_width / 2, y=-8, yanchor="bottom",
                              text=f"source {SHORT_LEVEL_NAMES[index]}", showarrow=False, font=dict(size=13))
        figure.add_annotation(x=-8, y=index * (panel_height + gap) + panel_height / 2, xanchor="right",
                              text=f"target {SHORT_LEVEL_NAMES[index]}", showarrow=False, textangle=-90,
                              font=dict(size=13))
    figure.update_xaxes(range=[-34, mosaic.shape[1]], visible=False, constrain="domain")
    figure.update_yaxes(range=[mosaic.shape[0], -34], visible=False, scaleanchor="x", constrain="domain")
    figure.update_layout(height=640, margin=dict(l=0, r=0, t=0, b=0), dragmode=False, showlegend=False,
                         plot_bgcolor="rgba(0,0,0,0)", paper_bgcolor="rgba(0,0,0,0)")
    return figure
