"""Fusion-weight capture, counterfactual fusion, traces and their .npz files, on a tiny ASFF model."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from asff_viz import Counterfactual, Trace, build_model, capture, trace_image
from asff_viz.inference.postprocess import row_location
from asff_viz.introspection.capture import hook_count
from asff_viz.introspection.overhead import measure_capture_overhead
from asff_viz.introspection.trace import TraceError
from tests.conftest import calibrate_batchnorm

SIZE = 96


def tiny_model() -> torch.nn.Module:
    """A tiny ASFF model whose activations are O(1) and whose fusion weights spread over (0, 1).

    At initialization the BatchNorm running statistics do not match the activations, which shrink layer after
    layer in eval mode; one train-mode pass with cumulative statistics calibrates them. Sharper weight logits
    then spread the softmax instead of leaving every weight near 1/3.
    """
    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model(width=0.125, depth=0.33, num_classes=3), [torch.randn(2, 3, SIZE, SIZE)])
    with torch.no_grad():
        for level in model.fusion.levels:
            level.weight_logits.weight.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE, generator=generator)


def outputs_equal(first, second) -> bool:
    return all(torch.equal(a.prediction, b.prediction) and torch.equal(a.anchor_logwh, b.anchor_logwh)
               for a, b in zip(first, second, strict=True))


def test_weights_are_probabilities_with_the_documented_shapes(model, images):
    with torch.no_grad(), capture(model) as recorder:
        model(images)
    assert recorder.forward_count == 1
    for level, weights in enumerate(recorder.fusion_weights):
        cells = SIZE // model.strides[level]
        assert weights.shape == (2, 3, cells, cells)
        assert (weights >= 0).all()
        assert torch.allclose(weights.sum(dim=1), torch.ones(2, cells, cells), atol=1e-6)
    # The sharpened tiny model really spreads its weights, so the tests below compare something.
    assert max(float(w.max()) for w in recorder.fusion_weights) > 0.8


def test_capture_does_not_change_outputs(model, images):
    with torch.no_grad():
        reference = model(images)
        with capture(model, resized=True, fused=True, sources=True):
            observed = model(images)
    assert outputs_equal(reference, observed)
    # With autograd recording, oneDNN may pick other kernels than under no_grad (it does on some CPUs), so the
    # keep_graph capture is compared with a plain forward in the same grad mode: like with like, bit for bit.
    reference = model(images)
    with capture(model, keep_graph=True) as recorder:  # views for autograd, still bit-identical values
        observed = model(images)
    assert outputs_equal(reference, observed)
    assert recorder.resized[0][0] is not recorder.sources[0]  # identity resizes got their own autograd node


def test_hooks_are_removed_after_success_and_after_an_exception(model, images):
    assert hook_count(model) == 0
    with torch.no_grad(), capture(model, resized=True, fused=True, keep_graph=True, counterfactual="uniform"):
        assert hook_count(model) > 0
        model(images)
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), capture(model, resized=True, counterfactual=Counterfactual.drop(1)):
        model(images)
        raise RuntimeError("boom")
    assert hook_count(model) == 0
    with torch.no_grad():  # a counterfactual does not outlive its block
        assert outputs_equal(model(images), model(images))
        with capture(model) as recorder:
            model(images)
    assert not torch.allclose(recorder.fusion_weights[0], torch.full_like(recorder.fusion_weights[0], 1 / 3))


@pytest.mark.parametrize("source", [0, 1, 2])
def test_one_hot_counterfactual_equals_feeding_only_that_resized_level(model, images, source):
    fused_outputs = {}
    handles = [level.register_forward_hook(lambda m, i, o, l=l: fused_outputs.__setitem__(l, o))
               for l, level in enumerate(model.fusion.levels)]
    try:
        with torch.no_grad(), capture(model, resized=True, fused=True,
                                      counterfactual=Counterfactual.one_hot(source)) as recorder:
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    for level in range(3):
        resized = recorder.resized[level][source]
        assert torch.equal(recorder.fused[level], resized)
        with torch.no_grad():
            expected = model.fusion.levels[level].expand(resized)
        assert torch.equal(fused_outputs[level], expected)
        weights = recorder.fusion_weights[level]
        assert torch.equal(weights[:, source], torch.ones_like(weights[:, source]))
    # The learned weights are still recorded next to the replacement.
    assert not torch.equal(recorder.learned_weights[0], recorder.fusion_weights[0])


def test_uniform_and_drop_counterfactuals(model, images):
    with torch.no_grad(), capture(model, resized=True, fused=True, counterfactual="uniform") as recorder:
        model(images)
    for level in range(3):
        expected = sum(recorder.resized[level]) / 3
        # Elementwise float32 arithmetic in another order (FMA or not): a few ulps of the largest term.
        scale = max(float(r.abs().max()) for r in recorder.resized[level])
        torch.testing.assert_close(recorder.fused[level], expected, rtol=0,
                                   atol=8 * torch.finfo(torch.float32).eps * scale)
    with torch.no_grad(), capture(model, counterfactual=Counterfactual.drop(2, levels=(1,))) as recorder:
        model(images)
    learned, used = recorder.learned_weights, recorder.fusion_weights
    assert torch.equal(learned[0], used[0]) and torch.equal(learned[2], used[2])  # only level 1 changed
    assert torch.equal(used[1][:, 2], torch.zeros_like(used[1][:, 2]))
    assert torch.allclose(used[1].sum(dim=1), torch.ones_like(used[1][:, 0]), atol=1e-6)
    # The two kept sources keep their learned ratio.
    assert torch.allclose(used[1][:, 0] / used[1][:, 1], learned[1][:, 0] / learned[1][:, 1], rtol=1e-4)
    with pytest.raises(ValueError, match="source"):
        Counterfactual("one_hot")


def test_concurrent_captures_on_a_shared_model_stay_separate(model, images):
    with torch.no_grad():
        expected_weights = []
        expected_outputs = []
        for index in range(2):
            with capture(model) as recorder:
                expected_outputs.append(model(images[index:index + 1]))
            expected_weights.append(recorder.fusion_weights)
    barrier = threading.Barrier(2)
    failures: list[str] = []

    def worker(index: int) -> None:
        # Thread 0 fuses with uniform weights; thread 1 observes the learned ones and must not see them.
        counterfactual = "uniform" if index == 0 else None
        try:
            for _ in range(4):
                barrier.wait(timeout=30)
                with torch.no_grad(), capture(model, counterfactual=counterfactual) as recorder:
                    outputs = model(images[index:index + 1])
                if recorder.forward_count != 1:
                    failures.append(f"thread {index} saw {recorder.forward_count} forwards")
                if index == 1:
                    if not all(torch.equal(a, b) for a, b in zip(recorder.fusion_weights, expected_weights[1],
                                                                 strict=True)):
                        failures.append("thread 1 recorded weights that are not its image's")
                    if not outputs_equal(outputs, expected_outputs[1]):
                        failures.append("thread 1's outputs were changed by thread 0's counterfactual")
                elif not all(torch.allclose(w, torch.full_like(w, 1 / 3)) for w in recorder.fusion_weights):
                    failures.append("thread 0 did not get its counterfactual weights")
        except Exception as error:  # noqa: BLE001  (reported by the main thread)
            failures.append(f"thread {index}: {error!r}")

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert hook_count(model) == 0


def synthetic_image(height: int = 90, width: int = 130) -> np.ndarray:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image[20:60, 30:90] = (255, 0, 0)
    return image


def test_trace_reads_out_every_detection(model):
    trace = trace_image(model, synthetic_image(), size=SIZE, conf_threshold=0.0, nms_threshold=0.5)
    assert trace.image.shape == (90, 130, 3)
    assert [w.shape for w in trace.fusion_weights] == [(3, 3, 3), (3, 6, 6), (3, 12, 12)]
    assert trace.decoded.shape == (4 * (9 + 36 + 144), 8)
    assert len(trace.detections) > 5
    levels_seen = set()
    for record in trace.detections:
        location = row_location(record.row_index, trace.grid_sizes)
        assert (record.level, record.slot, record.row, record.col) == (location.level, location.slot, location.row,
                                                                       location.col)
        levels_seen.add(record.level)
        weights = trace.fusion_weights[record.level][:, record.row, record.col]
        np.testing.assert_array_equal(record.weights_here, weights)
        np.testing.assert_array_equal(record.weights_other_levels[record.level], weights)
        for level, (row, col) in enumerate(record.cells_other_levels):
            # The other level's cell covers the centre of the producing cell.
            stride = trace.strides[record.level]
            center = ((record.row + 0.5) * stride, (record.col + 0.5) * stride)
            assert row == int(center[0] // trace.strides[level]) and col == int(center[1] // trace.strides[level])
            np.testing.assert_array_equal(record.weights_other_levels[level], trace.fusion_weights[level][:, row, col])
        # Boxes are in original pixels: the decoded input-pixel box scaled by the transform.
        cx, cy, w, h = trace.decoded[record.row_index, :4]
        expected = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * np.array([130 / SIZE, 90 / SIZE] * 2)
        np.testing.assert_allclose(record.box_xyxy, expected, rtol=1e-5, atol=1e-3)
        assert record.score == pytest.approx(float(trace.decoded[record.row_index, 4]
                                                   * trace.decoded[record.row_index, 5:].max()), rel=1e-5)
    assert len(levels_seen) >= 2
    assert trace.metadata["size"] == SIZE and trace.metadata["counterfactual"]["kind"] == "learned"
    assert hook_count(model) == 0


def test_trace_round_trips_through_npz(model, tmp_path):
    trace = trace_image(model, synthetic_image(), size=SIZE, keep_maps=True, counterfactual=Counterfactual.drop(0),
                        image_name="synthetic.png")
    path = trace.save(tmp_path / "trace.npz")
    loaded = Trace.load(path)
    np.testing.assert_array_equal(loaded.image, trace.image)
    assert loaded.image.dtype == np.uint8
    assert loaded.transform == trace.transform
    for level in range(3):
        np.testing.assert_array_equal(loaded.fusion_weights[level], trace.fusion_weights[level])
        np.testing.assert_array_equal(loaded.learned_weights[level], trace.learned_weights[level])
        np.testing.assert_array_equal(loaded.fused_maps[level], trace.fused_maps[level])
        np.testing.assert_array_equal(loaded.raw_predictions[level], trace.raw_predictions[level])
        for source in range(3):
            np.testing.assert_array_equal(loaded.resized_maps[level][source], trace.resized_maps[level][source])
    np.testing.assert_array_equal(loaded.decoded, trace.decoded)
    assert len(loaded.detections) == len(trace.detections) > 0
    for a, b in zip(loaded.detections, trace.detections, strict=True):
        assert (a.level, a.slot, a.row, a.col, a.label, a.class_name, a.score) == (
            b.level, b.slot, b.row, b.col, b.label, b.class_name, b.score)
        np.testing.assert_array_equal(a.box_xyxy, b.box_xyxy)
        np.testing.assert_array_equal(a.weights_other_levels, b.weights_other_levels)
    assert loaded.metadata == trace.metadata
    assert loaded.counterfactual == Counterfactual.drop(0)
    assert loaded.metadata["image_name"] == "synthetic.png" and "torch" in loaded.metadata["versions"]


def test_bad_trace_files_get_clear_errors(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        Trace.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="junk.npz"):
        Trace.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", values=np.zeros(3))
    with pytest.raises(TraceError, match="header"):
        Trace.load(tmp_path / "other.npz")


def test_capture_refuses_counterfactuals_without_asff_weights():
    model = build_model(width=0.125, depth=0.33, num_classes=3, fusion="sum").eval()
    with pytest.raises(ValueError, match="no fusion weights"), capture(model, counterfactual="uniform"):
        pass
    with pytest.raises(ValueError, match="no ASFF fusion weights"):
        trace_image(model, synthetic_image(), size=64)
    assert hook_count(model) == 0


def test_measure_capture_overhead_reports_a_ratio(model):
    result = measure_capture_overhead(model, size=64, repeats=2, warmup=0)
    assert len(result["plain_all"]) == len(result["captured_all"]) == 2
    assert result["ratio"] == pytest.approx(result["captured_seconds"] / result["plain_seconds"])
    # A timing, so no bound on its value (it depends on the machine and its load): only that it is one.
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert hook_count(model) == 0
