"""Rendering: figure layouts, the fixed 0..1 weight scale, colours (no BGR/RGB swap), and no leaked figures."""

from __future__ import annotations

import base64
import dataclasses
import gc
import weakref

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from asff_viz import trace_image
from asff_viz.figures import gradients, traces
from asff_viz.inference.transforms import preprocess
from asff_viz.introspection.attribution import Attribution
from asff_viz.introspection.decomposition import gradient_flow
from asff_viz.introspection.objectives import SumOfScores
from tests.test_capture import SIZE, synthetic_image, tiny_model

HEIGHT, WIDTH = 90, 130


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def trace(model):
    return trace_image(model, synthetic_image(HEIGHT, WIDTH), size=SIZE, conf_threshold=0.3)


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before, "a rendering function left a pyplot figure open"


def controlled_weights(trace):
    """Level 0: source 0 on the left half of the grid, source 2 on the right; levels 1, 2: uniform."""
    weights = [np.full_like(w, 1 / 3) for w in trace.fusion_weights]
    level0 = np.zeros_like(weights[0])
    columns = level0.shape[2]
    level0[0, :, : columns // 2] = 1.0
    level0[2, :, columns // 2:] = 1.0
    weights[0] = level0
    return dataclasses.replace(trace, fusion_weights=weights)


def rendered_rgb(figure: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def pixel_at(figure: Figure, ax, x: float, y: float, rgb: np.ndarray) -> np.ndarray:
    """The rendered colour at data point (x, y) of `ax` (display y grows upwards, buffer rows downwards)."""
    display_x, display_y = ax.transData.transform((x, y))
    return rgb[int(rgb.shape[0] - display_y), int(display_x)]


def weight_images(figure: Figure) -> list:
    """The overlay images (the second image of every axes that has an image under it)."""
    return [ax.images[1] for ax in figure.axes if len(ax.images) == 2]


def test_figure3_grid_layout_and_fixed_scale(trace):
    figure = traces.figure3_grid(trace)
    assert isinstance(figure, Figure)
    overlays = weight_images(figure)
    assert len(overlays) == 9 and len(figure.axes) == 10  # 3x3 panels and one shared colorbar
    assert all(image.get_clim() == (0.0, 1.0) for image in overlays)
    for index, image in enumerate(overlays):
        level, source = divmod(index, 3)
        np.testing.assert_array_equal(image.get_array(), trace.weights_on_original(level)[source])
        assert image.get_array().shape == (HEIGHT, WIDTH)
    assert figure.axes[0].get_title() == "source stride 32" and figure.axes[3].get_ylabel() == "target stride 16"
    assert figure.axes[-1].get_ylabel() == traces.WEIGHT_LABEL  # the colorbar


def test_a_constant_weight_map_is_not_stretched(trace):
    flat = dataclasses.replace(trace, fusion_weights=[np.full_like(w, 0.3) for w in trace.fusion_weights])
    figure = traces.weight_overlay(flat, 1, 1)
    (overlay,) = weight_images(figure)
    assert overlay.get_clim() == (0.0, 1.0)
    assert overlay.get_cmap().name == "viridis"
    assert len(figure.axes) == 2  # the image and its colorbar


def test_colours_are_not_swapped(trace):
    # The synthetic image has a pure red block at rows 20..60, columns 30..90.
    figure = traces.weight_overlay(trace, 0, 0, alpha=0.0)
    rgb = rendered_rgb(figure)
    red = pixel_at(figure, figure.axes[0], 60.0, 40.0, rgb)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    # A weight of 1 in viridis is yellow: strong red and green, little blue, at full opacity.
    controlled = controlled_weights(trace)
    figure = traces.weight_overlay(controlled, 0, 0, alpha=1.0)
    rgb = rendered_rgb(figure)
    left, right = pixel_at(figure, figure.axes[0], 10, 45, rgb), pixel_at(figure, figure.axes[0], 120, 45, rgb)
    np.testing.assert_allclose(left, np.array(plt.get_cmap("viridis")(1.0)[:3]) * 255, atol=3)
    np.testing.assert_allclose(right, np.array(plt.get_cmap("viridis")(0.0)[:3]) * 255, atol=3)


def test_rgb_composite_and_entropy(trace):
    controlled = controlled_weights(trace)
    figure = traces.rgb_composite(controlled, 0, alpha=1.0)
    rgb = rendered_rgb(figure)
    ax = figure.axes[0]
    np.testing.assert_array_equal(pixel_at(figure, ax, 10, 45, rgb), [255, 0, 0])  # source stride 32 = red
    np.testing.assert_array_equal(pixel_at(figure, ax, 120, 45, rgb), [0, 0, 255])  # source stride 8 = blue
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [
        "source stride 32", "source stride 16", "source stride 8"]
    figure = traces.entropy_map(controlled, 0)
    (overlay,) = weight_images(figure)
    assert overlay.get_clim() == (0.0, 1.0) and np.abs(overlay.get_array()).max() == 0  # one-hot: decided
    figure = traces.entropy_map(controlled, 1)
    np.testing.assert_allclose(weight_images(figure)[0].get_array(), 1.0, atol=1e-6)  # uniform: undecided


def test_draw_detections_draws_every_box_with_its_label(trace):
    records = trace.detections[:4]
    assert len(records) == 4
    figure = traces.draw_detections(trace.image, records)
    ax = figure.axes[0]
    assert sum(isinstance(patch, Rectangle) for patch in ax.patches) == 4
    labels = [text.get_text() for text in ax.texts]
    assert labels[0].startswith(f"{records[0].class_name} {records[0].score:.2f}")
    assert ax.get_xlim() == (0.0, WIDTH) and ax.get_ylim() == (HEIGHT, 0.0)
    comparison = traces.counterfactual_comparison([trace, trace], score_threshold=0.0, max_detections=3)
    assert len(comparison.axes) == 2 and all(len(ax.patches) == 3 for ax in comparison.axes)


def test_gradient_flow_and_attribution_figures(model, trace):
    image_tensor, _ = preprocess(trace.image, SIZE)
    flow = gradient_flow(model, image_tensor, SumOfScores(), ground_truth=[[0, 48.0, 48.0, 30.0, 40.0]])
    figure = gradients.gradient_flow_matrix(flow, include_weight_branch=True)
    assert len(figure.axes) == 3 and len(figure.axes[0].texts) == 9
    assert len(gradients.gradient_flow_maps(flow).axes) == 12  # 9 maps and a colorbar per source
    assert len(gradients.gradient_flow_maps(flow, trace=trace).axes) == 12
    figure = gradients.conflict_maps([flow, flow])
    conflict_images = [ax.images[0] for ax in figure.axes if ax.images]
    assert len(conflict_images) == 6 and all(image.get_clim() == (0.0, 1.0) for image in conflict_images)
    on_image = gradients.conflict_maps(flow, trace=trace)
    assert [image.get_clim() for image in weight_images(on_image)] == [(0.0, 1.0)] * 3
    signed = Attribution("integrated_gradients", "test", np.linspace(-2, 1, SIZE * SIZE).reshape(SIZE, SIZE),
                         np.zeros((3, SIZE, SIZE)))
    figure = gradients.attribution_overlay(trace.image, signed, trace.transform, clip_percentile=None,
                                        box_xyxy=[10, 10, 50, 40])
    overlay = figure.axes[0].images[1].get_array()
    assert overlay.shape == (HEIGHT, WIDTH, 4)
    assert figure.axes[1].get_ylim() == pytest.approx((-2.0, 2.0), rel=1e-2)  # symmetric about zero
    assert overlay[..., 3].max() == pytest.approx(0.8, abs=0.02)  # opaque where strongest, clear near zero
    assert overlay[..., 3].min() < 0.05 and len(figure.axes[0].patches) == 1
    cell = dataclasses.replace(signed, method="neuron_gradient", level=1, cell=(2, 3), stride=16)
    figure = gradients.attribution_overlay(trace.image, cell, trace.transform)
    (outline,) = figure.axes[0].patches
    assert outline.get_x() == pytest.approx(3 * 16 * WIDTH / SIZE) and outline.get_width() == pytest.approx(
        16 * WIDTH / SIZE)
    cams = [Attribution("layer_grad_cam", "test", np.zeros((SIZE, SIZE)), grid, level=level, grid=grid)
            for level, grid in enumerate(np.ones((3, 1, 1)) * np.arange(1, 4)[:, None, None])]
    cams = [dataclasses.replace(cam, grid=np.full((SIZE // s, SIZE // s), v)) for cam, s, v in
            zip(cams, (32, 16, 8), (1.0, 2.0, 3.0), strict=True)]
    figure = gradients.grad_cam_figure(trace.image, cams, trace.transform)
    assert all(image.get_clim() == (0.0, 3.0) for image in weight_images(figure))
    assert isinstance(traces.figure_to_png(figure), bytes)


def test_figures_are_released_when_dropped(trace):
    figure = traces.figure3_grid(trace)
    png = traces.figure_to_png(figure, dpi=40)
    assert png.startswith(b"\x89PNG")
    reference = weakref.ref(figure)
    del figure
    gc.collect()
    assert reference() is None


def decode_data_uri(uri: str) -> np.ndarray:
    header, data = uri.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64")
    bgr = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_app_weight_map_places_cells_exactly_and_keeps_colours(trace):
    from asff_viz.app import charts

    figure = charts.image_figure(trace.image)
    charts.add_weight_map(figure, trace.fusion_weights[1][2], (16 * WIDTH / SIZE, 16 * HEIGHT / SIZE),
                          colormap="viridis", opacity=0.5, title="w")
    image, heatmap = figure.data
    shown = decode_data_uri(image.source)  # JPEG for the browser: colours kept (not swapped), within compression
    assert shown.shape == trace.image.shape
    np.testing.assert_allclose(shown.mean(axis=(0, 1)), trace.image.mean(axis=(0, 1)), atol=3)
    assert shown[40, 60, 0] > 200 and shown[40, 60, 2] < 70  # the red block stays red
    assert (heatmap.zmin, heatmap.zmax) == (0.0, 1.0)
    cell_w, cell_h = 16 * WIDTH / SIZE, 16 * HEIGHT / SIZE
    assert heatmap.dx == pytest.approx(cell_w) and heatmap.x0 == pytest.approx(cell_w / 2)
    assert heatmap.dy == pytest.approx(cell_h) and heatmap.y0 == pytest.approx(cell_h / 2)
    np.testing.assert_array_equal(np.asarray(heatmap.z), trace.fusion_weights[1][2])
    assert list(figure.layout.yaxis.range) == [HEIGHT, 0]  # image rows grow downwards


def test_app_figure3_mosaic_and_detection_boxes(trace):
    from asff_viz.app import charts

    controlled = controlled_weights(trace)
    figure = charts.figure3_mosaic(trace.image, controlled.fusion_weights, opacity=1.0, colormap="viridis")
    mosaic, scale = figure.data
    assert scale.zmin == 0.0 and scale.zmax == 1.0  # the fixed 0..1 colorbar
    picture = decode_data_uri(mosaic.source)
    panel = (picture.shape[0] - 12) // 3
    top_left, top_right = picture[5, 5].astype(int), picture[5, (picture.shape[1] - 12) // 3 - 5].astype(int)
    # Target level 0, source level 0: weight 1 on the left half (viridis yellow), 0 on the right (dark purple).
    assert top_left[0] > 200 and top_left[1] > 200 and top_left[2] < 100
    assert top_right[0] < 100 and top_right[2] > top_right[1]
    assert panel > 0
    records = trace.detections[:5]
    figure = charts.image_figure(trace.image)
    charts.add_boxes(figure, np.array([r.box_xyxy for r in records]).reshape(-1, 4), [r.label for r in records],
                     [r.class_name for r in records])
    markers = [d for d in figure.data if d.name == "detections"]
    assert len(markers) == (1 if records else 0)
    if records:
        assert len(markers[0].x) == len(records)


def test_bad_level_is_reported(trace):
    with pytest.raises(ValueError, match="level must be"):
        traces.weight_overlay(trace, 3, 0)
    with pytest.raises(ValueError, match="source must be"):
        traces.weight_overlay(trace, 0, -1)


def test_model_is_untouched_by_rendering(model, trace):
    # Rendering works from the trace alone: no forward pass, no hooks.
    from asff_viz.introspection.capture import hook_count

    traces.figure3_grid(trace)
    assert hook_count(model) == 0
    assert torch.is_grad_enabled()
