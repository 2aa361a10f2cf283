"""captum attributions of a detection and of a fusion weight, checked against direct autograd."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from asff_viz import build_model, capture
from asff_viz.inference.postprocess import row_location
from asff_viz.inference.transforms import ImageTransform
from asff_viz.introspection.attribution import (
    fusion_weight_attribution,
    grad_cam_per_level,
    gradient_through_offsets,
    integrated_gradients,
    saliency,
)
from asff_viz.introspection.capture import hook_count
from tests.conftest import calibrate_batchnorm

SIZE = 64


def smooth_tiny_model() -> torch.nn.Module:
    """A tiny ASFF model (float64) smooth enough for integrated gradients to converge in a few dozen steps.

    A random network at unit gain is chaotic: its score wiggles along the integration path and integrated
    gradients needs thousands of steps. With linear activations in place of the leaky ReLUs (and BatchNorm
    calibrated on one batch) the remaining nonlinearities are the fusion softmax, the max pools, the
    deformable sampling and the output sigmoids: the parts this project is about.
    """
    torch.manual_seed(0)
    model = build_model(width=0.125, depth=0.33, num_classes=3)
    for module in model.modules():
        if isinstance(module, torch.nn.LeakyReLU):
            module.negative_slope = 1.0
    return calibrate_batchnorm(model, [torch.randn(2, 3, SIZE, SIZE)]).eval().double()


@pytest.fixture(scope="module")
def model():
    return smooth_tiny_model()


@pytest.fixture(scope="module")
def image():
    return torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)


@pytest.fixture(scope="module")
def row(model, image):
    with torch.no_grad():
        decoded = model.decode(model(image[None]))[0]
    return int((decoded[:, 4] * decoded[:, 5:].max(dim=1).values).argmax())


def score(model, images, row, class_index=None):
    """The detection's score in float64 from the raw outputs (the row's level, slot and cell, as decode orders)."""
    outputs = model(images)
    for output in outputs:
        batch, slots, channels, height, width = output.prediction.shape
        if row < slots * height * width:
            logits = output.prediction.permute(0, 1, 3, 4, 2).reshape(batch, -1, channels)[:, row]  # (B, 5 + C)
            probabilities = torch.sigmoid(logits)
            if class_index is None:
                class_index = int(probabilities[0, 5:].argmax())
            return probabilities[:, 4] * probabilities[:, 5 + class_index]
        row -= slots * height * width
    raise IndexError(row)


def test_integrated_gradients_is_complete(model, image, row):
    result = integrated_gradients(model, image, row, n_steps=64, internal_batch_size=32)
    with torch.no_grad():
        class_index = int(model.decode(model(image[None]))[0, row, 5:].argmax())
        difference = float(score(model, image[None], row, class_index)
                           - score(model, torch.zeros_like(image[None]), row, class_index))
    assert abs(difference) > 0.1  # the score really depends on the image
    assert result.map.shape == (SIZE, SIZE) and result.attributions.shape == (3, SIZE, SIZE)
    assert abs(result.convergence_delta) < 0.03 * abs(difference)
    assert result.attributions.sum() == pytest.approx(difference, rel=0.03)
    # Without the path through the head's (detached) offsets, the gradients miss part of the score's change.
    detached = integrated_gradients(model, image, row, n_steps=64, internal_batch_size=32, through_offsets=False)
    assert abs(detached.convergence_delta) > 0.1 * abs(difference)
    assert hook_count(model) == 0


def test_gradients_are_the_true_derivative_of_the_score(model, image, row):
    direction = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    step = 1e-5
    with torch.no_grad():
        finite_difference = float(score(model, image[None] + step * direction, row)
                                  - score(model, image[None] - step * direction, row)) / (2 * step)
    images = image[None].clone().requires_grad_(True)
    with gradient_through_offsets(model):
        (gradient,) = torch.autograd.grad(score(model, images, row).sum(), images)
    assert float((gradient * direction).sum()) == pytest.approx(finite_difference, rel=1e-5)
    result = saliency(model, image, row)
    np.testing.assert_allclose(result.map, gradient[0].abs().amax(dim=0).numpy(), rtol=1e-5)
    assert hook_count(model) == 0


def test_smoothgrad_saliency(model, image, row):
    result = saliency(model, image, row)
    smooth = saliency(model, image, row, noise_tunnel=True, nt_samples=2, nt_samples_batch_size=2)
    assert smooth.map.shape == (SIZE, SIZE) and (smooth.map >= 0).all()
    assert not np.allclose(smooth.map, result.map)
    tunnel = integrated_gradients(model, image, row, n_steps=4, noise_tunnel=True, nt_samples=2)
    assert tunnel.method == "integrated_gradients+noise_tunnel" and tunnel.convergence_delta is None
    assert tunnel.map.shape == (SIZE, SIZE) and np.abs(tunnel.map).max() > 0


def test_grad_cam_per_level_matches_a_direct_computation(model, image, row):
    detection_level = row_location(row, model.grid_sizes(SIZE)).level
    results = grad_cam_per_level(model, image, row)
    sources = grad_cam_per_level(model, image, row, layer="source")
    assert [r.grid.shape for r in results] == [(2, 2), (4, 4), (8, 8)] == [r.grid.shape for r in sources]
    assert all(r.map.shape == (SIZE, SIZE) and (r.grid >= 0).all() for r in results + sources)
    # Each level's fused map feeds only its own head: only the detection's level explains its score.
    assert [r.connected for r in results] == [level == detection_level for level in range(3)]
    assert all(not r.grid.any() for r in results if not r.connected)
    with gradient_through_offsets(model), capture(model, fused=True, keep_graph=True) as recorder:
        value = score(model, image[None].clone().requires_grad_(True), row).sum()
    # Grad-CAM on a source takes the layer's whole gradient: through the fusion and the neck's top-down path.
    tensors = [recorder.fused[detection_level], *recorder.neck_outputs]
    gradients = torch.autograd.grad(value, tensors)
    for result, features, gradient in zip([results[detection_level], *sources], tensors, gradients, strict=True):
        expected = torch.relu((gradient[0].mean(dim=(1, 2), keepdim=True) * features[0]).sum(dim=0))
        np.testing.assert_allclose(result.grid, expected.detach().numpy(), rtol=1e-6, atol=1e-12)
    assert results[detection_level].grid.max() > 0 and any(r.grid.max() > 0 for r in sources)
    transform = ImageTransform(original_height=50, original_width=70, size=SIZE)
    assert results[2].to_original(transform).shape == (50, 70)
    assert hook_count(model) == 0


def test_fusion_weight_gradient_matches_autograd(model, image):
    level, cell_row, cell_col, source = 1, 2, 3, 0
    result = fusion_weight_attribution(model, image, level, cell_row, cell_col, source, method="gradient")
    images = image[None].clone().requires_grad_(True)
    with capture(model, keep_graph=True) as recorder:
        model(images)
    (gradient,) = torch.autograd.grad(recorder.fusion_weights[level][0, source, cell_row, cell_col], images)
    np.testing.assert_allclose(result.attributions, gradient[0].numpy(), rtol=1e-6, atol=1e-14)
    assert np.abs(result.map).max() > 0


def test_fusion_weight_integrated_gradients_is_complete(model, image):
    level, cell_row, cell_col, source = 2, 5, 4, 1
    result = fusion_weight_attribution(model, image, level, cell_row, cell_col, source, n_steps=64,
                                       internal_batch_size=64)
    values = []
    for images in (image[None], torch.zeros_like(image[None])):
        with torch.no_grad(), capture(model) as recorder:
            model(images)
        values.append(float(recorder.fusion_weights[level][0, source, cell_row, cell_col]))
    difference = values[0] - values[1]
    assert abs(difference) > 1e-3
    assert result.attributions.sum() == pytest.approx(difference, rel=0.02)
    assert result.level == level and "fusion weight" in result.target
    assert hook_count(model) == 0


def test_layer_attribution_leaves_other_threads_forwards_alone(model, image, row):
    other = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad():
        expected = model(other)[2].prediction
    done, failures = threading.Event(), []

    def forward_repeatedly() -> None:
        count = 0
        while not done.is_set() or count == 0:
            with torch.no_grad():
                if not torch.equal(model(other)[2].prediction, expected):
                    failures.append("a concurrent forward changed")
            count += 1

    thread = threading.Thread(target=forward_repeatedly)
    thread.start()
    try:
        results = grad_cam_per_level(model, image, row, layer="source")
        weight = fusion_weight_attribution(model, image, 0, 1, 1, 2, method="gradient")
    finally:
        done.set()
        thread.join(timeout=60)
    assert not failures
    assert len(results) == 3 and weight.map.shape == (SIZE, SIZE)
    assert hook_count(model) == 0


def test_bad_arguments_are_reported(model, image):
    with pytest.raises(IndexError, match="outside"):
        fusion_weight_attribution(model, image, 0, 9, 0, 0)
    with pytest.raises(IndexError, match="outside"):
        integrated_gradients(model, image, 10_000)
    with pytest.raises(ValueError, match="one normalized image"):
        saliency(model, image[:2], 0)
    with pytest.raises(ValueError, match="layer"):
        grad_cam_per_level(model, image, 0, layer="neck")
