"""Inference fast paths (`asff_viz.inference.fast`) compute what the model as built computes; the deformable conv's two
implementations agree; the benchmark's FLOP count and report hold together. Tiny models only."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asff_viz import Detector, build_model, capture
from asff_viz.bench.models import model_flops, without_deformation
from asff_viz.bench.report import format_table, targets
from asff_viz.inference.fast import (
    CascadedSPP,
    FusedConvAct,
    InPlaceResidual,
    PackedConv2d,
    PackedDeformConv2d,
    PackedWeight,
    fold_all_batchnorms,
    fused_conv_activation_available,
    optimize_for_inference,
    weight_packing_available,
)
from asff_viz.inference.postprocess import postprocess, row_location
from asff_viz.models.blocks import SPP
from asff_viz.models.deform_conv import deform_conv2d, deform_conv2d_grid_sample
from asff_viz.models.detector import YOLOv3ASFF
from asff_viz.utils.timing import run_interleaved
from tests.conftest import calibrate_batchnorm

SIZE = 96


def tiny_model(seed: int = 0, affine: bool = True) -> YOLOv3ASFF:
    """A tiny ASFF model with BatchNorm statistics that are not the identity (so folding has work to do),
    calibrated on one batch of noise so activations are O(1); with `affine`, non-trivial BN scales and shifts."""
    torch.manual_seed(seed)
    model = build_model(width=0.125, depth=0.33, num_classes=3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and affine:
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    calibrate_batchnorm(model, [torch.randn(2, 3, SIZE, SIZE)])
    with torch.no_grad():
        for level in model.fusion.levels:
            level.weight_logits.weight.mul_(3.0)  # spread the fusion weights away from 1/3
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def run(model, images):
    with torch.inference_mode():
        outputs = model(images)
        return [tuple(t.float().clone() for t in out) for out in outputs], model.decode(outputs).clone()


def assert_outputs_close(result, expected, rtol=1e-4):
    """Equal up to `rtol` of each output's own scale (float32 round-off of ~50 layers reaches ~1e-5 of it)."""
    for pair, expected_pair in zip(result, expected, strict=True):
        for tensor, expected_tensor in zip(pair, expected_pair, strict=True):
            scale = float(expected_tensor.abs().max())
            torch.testing.assert_close(tensor, expected_tensor, rtol=rtol, atol=rtol * scale)


def test_folded_batchnorm_equals_unfolded(model, images):
    expected, expected_rows = run(model, images)
    folded = optimize_for_inference(model, channels_last=False, fuse_activation=False)
    assert folded.inference_settings["folded_batchnorms"] == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    result, rows = run(folded, images)
    assert_outputs_close(result, expected)
    # Box sizes pass through exp(), which turns 1e-4 in log space into 1e-4 relative: compare relatively.
    torch.testing.assert_close(rows, expected_rows, rtol=1e-3, atol=1e-3)


def test_channels_last_equals_contiguous(model, images):
    expected, _ = run(model, images)
    optimized = optimize_for_inference(model, fold_bn=False, channels_last=True, fuse_activation=False)
    assert optimized.backbone.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert optimized.head.levels[2].adaption.dconv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_outputs_close(run(optimized, images)[0], expected)  # oneDNN sums in another order for NHWC


@pytest.mark.skipif(not fused_conv_activation_available(), reason="no oneDNN in this PyTorch build")
def test_fused_conv_activation_equal_and_autograd_falls_back(model, images):
    expected, _ = run(model, images)
    optimized = optimize_for_inference(model)  # fold + channels-last + fused conv/activation
    assert optimized.inference_settings["fused_conv_activations"] > 0
    assert any(isinstance(m, FusedConvAct) for m in optimized.modules())
    assert_outputs_close(run(optimized, images)[0], expected)
    # With autograd recording, the fused op (which has no backward) is bypassed and gradients flow.
    inputs = images.clone().requires_grad_(True)
    outputs = optimized(inputs)
    outputs[2].prediction.sum().backward()
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all() and inputs.grad.abs().sum() > 0
    assert_outputs_close([tuple(t.detach().float() for t in out) for out in outputs], expected)


BF16_ONEDNN = weight_packing_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not weight_packing_available(), reason="no oneDNN weight packing in this PyTorch build")
@pytest.mark.parametrize("dtype", [None, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not BF16_ONEDNN, reason="this CPU runs no bf16 oneDNN kernels"))], ids=["fp32", "bf16"])
def test_packed_weights_equal_plain_and_follow_changes(model, images, dtype):
    plain = optimize_for_inference(model, dtype=dtype, pack_weights=False)
    packed = optimize_for_inference(model, dtype=dtype)
    assert packed.inference_settings["packed_weights"] > 0 and plain.inference_settings["packed_weights"] == 0
    assert isinstance(packed.head.levels[0].predict, PackedConv2d)  # a conv with no activation
    assert isinstance(packed.head.levels[0].adaption.dconv, PackedDeformConv2d)
    # bf16 results are compared at bf16's own resolution: the same kernels, summing in an order of their own.
    rtol = 1e-4 if dtype is None else 2e-2
    assert_outputs_close(run(packed, images)[0], run(plain, images)[0], rtol)
    # Another input size, then the first again: the packed copies are made for the shape at hand.
    smaller = images[:1, :, :64, :64].contiguous()
    assert_outputs_close(run(packed, smaller)[0], run(plain, smaller)[0], rtol)
    assert_outputs_close(run(packed, images)[0], run(plain, images)[0], rtol)
    # A weight changed in place (a fine-tune, load_state_dict) is seen at the next call, not the stale copy.
    with torch.no_grad():
        for network in (plain, packed):
            network.backbone.stem.conv.weight.mul_(-1.5)
            network.head.levels[2].adaption.dconv.weight.mul_(0.5)
    changed = run(plain, images)[0]
    assert (changed[2][0] - run(optimize_for_inference(model, dtype=dtype), images)[0][2][0]).abs().max() > 0.1
    assert_outputs_close(run(packed, images)[0], changed, rtol)
    # The packed copies are a cache: not in the state_dict, not carried by a deep copy, which still runs.
    assert not any(t.is_mkldnn for t in packed.state_dict().values())
    assert_outputs_close(run(copy.deepcopy(packed), images)[0], changed, rtol)
    # With autograd recording, the plain conv runs and gradients flow.
    inputs = images.clone().requires_grad_(True)
    packed(inputs)[2].prediction.float().sum().backward()
    assert inputs.grad is not None and torch.isfinite(inputs.grad).all() and inputs.grad.abs().sum() > 0


def test_packed_weight_cache_is_made_per_weight_version_and_input_shape_and_never_copied():
    made = []

    def pack(weight, input_shape):
        made.append(input_shape)
        return weight * 2

    cache, weight = PackedWeight(), torch.ones(4, 2, 3, 3)
    assert torch.equal(cache.get(weight, (1, 2, 8, 8), pack), weight * 2)
    cache.get(weight, (1, 2, 8, 8), pack)
    assert made == [(1, 2, 8, 8)]  # reused while nothing changed
    cache.get(weight, (1, 2, 16, 16), pack)
    assert made[-1] == (1, 2, 16, 16)  # made for the new input shape
    weight.add_(1)
    assert torch.equal(cache.get(weight, (1, 2, 16, 16), pack), weight * 2) and len(made) == 3  # new version
    # Packed oneDNN tensors have no storage to copy: a copied or pickled module starts with an empty cache.
    assert copy.deepcopy(cache).entry is None and pickle.loads(pickle.dumps(cache)).entry is None
    assert cache.entry is not None


def test_packed_weights_refuse_compile(model):
    with pytest.raises(ValueError, match="compile"):
        optimize_for_inference(model, compile=True, pack_weights=True)


def test_in_place_residual_adds_like_the_model_and_spares_a_hooked_output(model, images):
    optimized = optimize_for_inference(model, pack_weights=False)
    blocks = [m for m in optimized.modules() if isinstance(m, InPlaceResidual) and m.shortcut]
    assert blocks
    block = blocks[0]
    x = torch.randn(2, block.reduce.conv.in_channels, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = x + block.expand(block.reduce(x))
        torch.testing.assert_close(block(x), expected)
        kept = []
        handle = block.expand.register_forward_hook(lambda _m, _i, output: kept.append(output))
        try:
            result = block(x)
        finally:
            handle.remove()
    torch.testing.assert_close(result, expected)
    # The hook's tensor is the conv's output, not the sum: the add went to a new tensor.
    torch.testing.assert_close(kept[0], expected - x)
    assert_outputs_close(run(optimized, images)[0], run(model, images)[0])


def test_cascaded_spp_is_exact():
    x = torch.randn(2, 8, 13, 11)
    assert torch.equal(CascadedSPP()(x), SPP()(x))


def test_bf16_close_to_fp32_with_same_top_detections(images):
    model = tiny_model(seed=3, affine=False)
    expected, expected_rows = run(model, images)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_outputs = model(images)
    optimized = optimize_for_inference(model, dtype=torch.bfloat16)
    assert optimized.inference_settings["dtype"] == "bfloat16"
    with torch.inference_mode():
        outputs = optimized(images)
        rows = optimized.decode(outputs)
    assert outputs[0].prediction.dtype == torch.bfloat16
    assert rows.dtype == torch.float32 and rows.shape == expected_rows.shape
    assert optimized.anchor_bases.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa and a random network amplifies rounding from layer to layer (this one's
    # features are 3 % off after the backbone, ~10 % after the neck, under plain autocast too), so the raw
    # outputs are held to plain autocast's own error: the fast path adds no error of its own.
    for fast, autocast, (prediction, _) in zip(outputs, autocast_outputs, expected, strict=True):
        fast_error = (fast.prediction.float() - prediction).abs().max()
        autocast_error = (autocast.prediction.float() - prediction).abs().max()
        assert fast_error <= 1.5 * autocast_error + 1e-3
        assert fast_error < 0.5 * prediction.abs().max()
    scores = rows[..., 4] * rows[..., 5:].max(dim=-1).values
    expected_scores = expected_rows[..., 4] * expected_rows[..., 5:].max(dim=-1).values
    assert (scores - expected_scores).abs().max() < 0.2
    for image in range(images.shape[0]):
        top = expected_scores[image].topk(5).indices
        # The five best fp32 rows are among the ten best bf16 rows, with centres within a quarter of a cell.
        assert set(top.tolist()) <= set(scores[image].topk(10).indices.tolist())
        strides = torch.tensor([model.strides[row_location(int(row), model.grid_sizes(SIZE)).level] for row in top])
        assert ((rows[image, top, :2] - expected_rows[image, top, :2]).abs().amax(dim=1) < strides / 4).all()
        best = postprocess(rows[image:image + 1], conf_threshold=0.0)[0]
        expected_best = postprocess(expected_rows[image:image + 1], conf_threshold=0.0)[0]
        assert best.labels[0] == expected_best.labels[0]


def test_original_model_untouched(images):
    original = tiny_model()
    state = {k: v.clone() for k, v in original.state_dict().items()}
    classes = {name: type(m) for name, m in original.named_modules()}
    optimized = optimize_for_inference(original, dtype=torch.bfloat16)
    run(optimized, images)
    assert optimized is not original and type(original) is YOLOv3ASFF
    assert {name: type(m) for name, m in original.named_modules()} == classes
    for key, value in original.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    assert original.backbone.stem.conv.weight.is_contiguous()
    assert original.backbone.stem.conv.bias is None
    assert isinstance(optimized, YOLOv3ASFF)


def test_capture_hooks_see_fusion_weights_on_optimized_model(model, images):
    with capture(model, fused=True) as expected:
        run(model, images)
    optimized = optimize_for_inference(model)
    for level in range(3):  # the named submodules the hooks use are still there
        fusion_level = optimized.fusion.levels[level]
        assert isinstance(fusion_level.softmax, nn.Softmax) and isinstance(fusion_level.fused, nn.Identity)
        assert len(fusion_level.resize) == 3
    with capture(optimized, fused=True) as recorder:
        run(optimized, images)
    # The exact answer, up to float64 round-off: folding BatchNorm reorders float32 arithmetic, so the optimized
    # weights may differ from the eager ones by as much as the eager ones differ from the exact answer (how much
    # depends on the CPU's kernels and this network's conditioning, not on a constant). The tolerance is therefore
    # measured: the optimized path may be off by a few times the eager path's own float32 error.
    exact = copy.deepcopy(model).double()
    with capture(exact) as float64:
        run(exact, images.double())
    eager_error = max(float((w.double() - w64).abs().max())  # this network's float32 round-off, all levels
                      for w, w64 in zip(expected.fusion_weights, float64.fusion_weights, strict=True))
    for level in range(3):
        weights = recorder.fusion_weights[level]
        assert weights.shape == expected.fusion_weights[level].shape == (2, 3, SIZE // (32 >> level),
                                                                          SIZE // (32 >> level))
        torch.testing.assert_close(weights.sum(dim=1), torch.ones_like(weights[:, 0]))
        optimized_error = (weights.double() - float64.fusion_weights[level]).abs().max()
        assert optimized_error <= 4 * eager_error + 64 * torch.finfo(torch.float32).eps, (
            f"level {level}: optimized {optimized_error:.2e} vs eager {eager_error:.2e} from float64")
        assert recorder.fused[level] is not None
    # The weights really vary, so the comparison above could fail.
    assert expected.fusion_weights[0].max() - expected.fusion_weights[0].min() > 0.2


def test_detector_runs_an_optimized_model(model):
    image = (torch.rand(120, 90, 3, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8).numpy()
    expected = Detector(model, size=SIZE, conf_threshold=0.05)(image)
    result = Detector(optimize_for_inference(model), size=SIZE, conf_threshold=0.05)(image)
    torch.testing.assert_close(result.decoded, expected.decoded, rtol=1e-3, atol=1e-3)
    # A random model leaves many near-equal scores, whose NMS order float round-off may swap: compare the best.
    assert len(expected) > 10 and abs(len(result) - len(expected)) <= len(expected) // 20
    # Each of the ten best eager detections is among the fifteen best optimized ones (same class, same box): two
    # near-equal scores may trade places, a missing or moved detection may not.
    for box, label in zip(expected.boxes[:10], expected.labels[:10], strict=True):
        same = (result.labels[:15] == label) & torch.isclose(result.boxes[:15], box, rtol=1e-3, atol=1e-2).all(1)
        assert same.any(), (box, label)


@pytest.mark.slow
def test_compiled_equal_and_capture_still_sees_weights(model, images):
    expected, _ = run(model, images)
    compiled = optimize_for_inference(model, compile=True)
    assert_outputs_close(run(compiled, images)[0], expected, rtol=1e-3)
    with capture(compiled) as recorder:
        run(compiled, images)
    assert all(weights is not None and weights.shape[:2] == (2, 3) for weights in recorder.fusion_weights)


def test_rejects_bad_arguments(model):
    with pytest.raises(TypeError, match="YOLOv3ASFF"):
        optimize_for_inference(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(model, dtype=torch.int8)
    with pytest.raises(ValueError, match="fold_bn"):
        optimize_for_inference(model, fold_bn=False, fuse_activation=True)


def test_fold_all_batchnorms_counts_and_replaces():
    model = tiny_model()
    count = fold_all_batchnorms(model)
    assert count > 50 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# --------------------------------------------------------------------------------------- deformable conv


def test_deform_conv_matches_grid_sample_implementation_in_every_layout():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 11, 9, generator=generator)
    weight, bias = torch.randn(8, 16, 3, 3, generator=generator), torch.randn(8, generator=generator)
    offset = (torch.rand(2, 72, 11, 9, generator=generator) - 0.5) * 8  # many samples leave the map
    expected = deform_conv2d_grid_sample(x, offset, weight, bias, padding=1)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, padding=1), expected, rtol=1e-4, atol=1e-4)
    channels_last = deform_conv2d(x.contiguous(memory_format=torch.channels_last), offset,
                                  weight.contiguous(memory_format=torch.channels_last), bias, padding=1)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_bias, autocast", [(True, False), (False, False), (True, True)])
def test_deform_conv_in_chunks_equals_one_pass(monkeypatch, with_bias, autocast):
    # CPU inference samples a chunk of output pixels at a time (channels-last, no autograd); 7 pixels per chunk
    # here: several chunks across the images of the batch and a partial last one.
    from asff_viz.models import deform_conv

    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 11, 9, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(8, 16, 3, 3, generator=generator).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(8, generator=generator) if with_bias else None
    offset = (torch.rand(2, 72, 11, 9, generator=generator) - 0.5) * 8
    expected = deform_conv2d_grid_sample(x, offset, weight, bias, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        whole = deform_conv2d(x, offset, weight.requires_grad_(), bias, padding=1)  # autograd: one pass
        monkeypatch.setattr(deform_conv, "CHUNK_PIXELS", 7)
        with torch.no_grad():
            chunked = deform_conv2d(x, offset, weight, bias, padding=1)
    assert chunked.is_contiguous(memory_format=torch.channels_last) and chunked.dtype == whole.dtype
    # Float round-off only (a product over fewer rows may block its sums differently on another CPU).
    tolerance = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(chunked, whole.detach(), rtol=tolerance, atol=tolerance)
    if not autocast:
        torch.testing.assert_close(chunked, expected, rtol=1e-4, atol=1e-4)


def test_deform_conv_far_and_nan_offsets():
    x, weight = torch.randn(1, 8, 6, 6), torch.randn(4, 8, 3, 3)
    far = torch.full((1, 72, 6, 6), 1e9)
    assert torch.equal(deform_conv2d(x, far, weight, padding=1), torch.zeros(1, 4, 6, 6))
    offset = torch.zeros(1, 72, 6, 6)
    offset[0, 0, 2, 3] = math.nan
    out = deform_conv2d(x, offset, weight, padding=1)  # no out-of-range row is read
    assert torch.isnan(out[0, :, 2, 3]).all() and torch.isfinite(out[0, :, 0, 0]).all()


def test_deform_conv_bf16_samples_at_float32_positions():
    # On a wide map a bf16 coordinate near x = 200 is off by up to half a pixel; float32 positions keep the
    # bf16 result as close to float32 as bf16 rounding of the values allows.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 256, generator=generator)
    x = F.avg_pool2d(x, (1, 9), stride=1, padding=(0, 4)) * 3  # smooth enough that bilinear reads differ slowly
    weight = torch.randn(4, 4, 3, 3, generator=generator) * 0.3
    offset = (torch.rand(1, 72, 8, 256, generator=generator) - 0.5) * 0.9
    expected = deform_conv2d(x, offset, weight, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = deform_conv2d(x.bfloat16(), offset.bfloat16(), weight, padding=1)
    error = (result.float() - expected).abs().max() / expected.abs().max()
    assert error < 0.03


def test_deform_conv_gradient_matches_grid_sample_implementation():
    generator = torch.Generator().manual_seed(6)
    inputs = [torch.randn(1, 8, 7, 7, generator=generator), (torch.rand(1, 72, 7, 7, generator=generator) - 0.5) * 3,
              torch.randn(4, 8, 3, 3, generator=generator), torch.randn(4, generator=generator)]
    grads = []
    for function in (deform_conv2d, deform_conv2d_grid_sample):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        function(*leaves, padding=1).square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-3)


# -------------------------------------------------------------------------------------------- benchmark


def test_model_flops_match_a_count_by_hand():
    model = tiny_model()
    size = 64
    expected = 0
    handles = []

    def count(module, inputs, output):
        nonlocal expected
        out_channels, in_per_group, kh, kw = module.weight.shape
        expected += 2 * output.shape[0] * out_channels * in_per_group * kh * kw * output.shape[2] * output.shape[3]

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(count))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    deform = sampling = 0
    for level, stride in zip(model.head.levels, model.strides, strict=True):
        weight = level.adaption.dconv.weight
        cells = (size // stride) ** 2
        deform += 2 * weight.numel() * cells
        sampling += 8 * weight.shape[1] * 9 * cells
    flops = model_flops(model, size)
    assert flops["gflop"] * 1e9 == pytest.approx(expected + deform + sampling, rel=1e-9)
    assert flops["deform_share_of_flops"] == pytest.approx((deform + sampling) / (expected + deform + sampling))


def test_without_deformation_ignores_offsets_only(model, images):
    plain = without_deformation(model)
    assert plain.head.levels[0].adaption.dconv.weight is not model.head.levels[0].adaption.dconv.weight
    # With zero offsets a deformable conv is a plain conv: the plain-conv copy equals the model whose offset
    # convs output zeros, and differs from the model itself.
    reference = tiny_model()
    for level in reference.head.levels:
        nn.init.zeros_(level.adaption.conv_offset.weight)
        nn.init.zeros_(level.adaption.conv_offset.bias)
    plain_outputs = run(plain, images)[0]
    assert_outputs_close(plain_outputs, run(reference, images)[0])
    assert (plain_outputs[2][0] - run(model, images)[0][2][0]).abs().max() > 1e-3


def test_run_interleaved_rotates_and_collects():
    order = []
    cases = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = run_interleaved(cases, repeats=3, warmup=0, device=torch.device("cpu"))
    assert order == list("abcbcacab")
    assert all(len(times[name]["total"]) == 3 for name in "abc")
    timed = run_interleaved({"x": lambda: {"model": 1.0, "end_to_end": 2.0}}, repeats=2, warmup=1,
                            device=torch.device("cpu"))
    assert timed["x"] == {"model": [1.0, 1.0], "end_to_end": [2.0, 2.0]}


def test_bf16_ap_check_with_a_checkpoint(tmp_path):
    from asff_viz.bench.sections import bf16_accuracy
    from asff_viz.checkpoint import save_checkpoint
    from asff_viz.data.synthetic import CLASS_NAMES, generate

    torch.manual_seed(0)
    model = build_model(width=0.125, depth=0.33, num_classes=len(CLASS_NAMES)).eval()
    weights = tmp_path / "tiny.pt"
    save_checkpoint(weights, model, {"class_names": list(CLASS_NAMES), "input_size": 64})
    generate(tmp_path / "synthetic", seed=3, train=0, val=3, size=64)
    result = bf16_accuracy({"fast_bf16": None}, 416, torch.device("cpu"), weights=str(weights),
                           synthetic=str(tmp_path / "synthetic"), log=lambda message: None)
    assert result["images"] == 3 and result["size"] == 64  # the checkpoint's input size, not the default
    assert 0.0 <= result["AP_fp32"] <= 1.0 and 0.0 <= result["AP_bf16"] <= 1.0
    assert result["AP_difference_points"] == pytest.approx(100 * (result["AP_bf16"] - result["AP_fp32"]))


def test_targets_and_table_from_results():
    results = {
        "environment": {"device": "cpu", "cpu": "test CPU", "torch_threads": 2, "torch": "x", "cpu_flags": [],
                        "load_average": [0.5]},
        "settings": {"mode": "quick", "repeats": 3},
        "ceilings": {"float32": {"dtype": "float32", "shape": [1, 256, 152, 152], "ms": 100.0,
                                 "gflops_per_s": 200.0, "candidates_gflops_per_s": {"1x256x152x152": 200.0,
                                                                                    "1x512x38x38": 150.0}}},
        "flops": {608: {"gflop": 170.0, "deform_share_of_flops": 0.12}},
        "forward": [
            {"variant": "fast_fp32", "size": 608, "batch": 1, "latency_ms": 1000.0, "end_to_end_ms": 1010.0,
             "images_per_s": 1.0, "gflops_per_s": 170.0, "efficiency": 0.85},
            {"variant": "fast_fp32", "size": 416, "batch": 1, "latency_ms": 400.0, "end_to_end_ms": 410.0,
             "images_per_s": 2.5, "gflops_per_s": 200.0, "efficiency": 1.0},
            {"variant": "fast_bf16", "size": 416, "batch": 1, "latency_ms": 320.0, "end_to_end_ms": 330.0,
             "images_per_s": 3.1, "gflops_per_s": 250.0, "efficiency": 0.5},
        ],
        "capture": {"size": 416, "batch": 1, "eager_fp32": {"ratio": 1.01, "plain_ms": 1.0, "captured_ms": 1.01}},
        "deform": {"size": 416, "batch": 1, "flop_share": 0.12, "ratios": {"eager_fp32": 1.3},
                   "time_share_fast_fp32": 0.13},
    }
    rows = {row["target"]: row for row in targets(results)}
    assert rows["fusion capture on/off at 416 (model as built)"]["met"] is True
    assert rows["fast fp32 at 608, batch 1: share of the conv ceiling"]["met"] is True
    assert rows["fast bf16 at 416, batch 1: share of the conv ceiling"]["met"] is False  # 0.5 < 0.6
    assert "fast fp32 at 416, batch 8: share of the conv ceiling" not in rows  # not measured, not claimed
    assert rows["model / plain-conv model at 416 (eager_fp32)"]["met"] is False
    assert rows["bf16 speed-up over fast fp32 at 416, batch 1"]["value"] == pytest.approx(1.25)
    assert rows["bf16 speed-up over fast fp32 at 416, batch 1"]["met"] is False
    results["targets"] = list(rows.values())
    table = format_table(results)
    assert "| fast_fp32 | 608 | 1 | 1,000.0 |" in table and "**no**" in table and "1x512x38x38 150" in table


def test_gpu_check_stops_clearly_without_a_gpu_and_reads_a_bench(tmp_path, capsys):
    from asff_viz.bench import gpu_check
    from asff_viz.bench.gpu_check import gpu_test_files

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run")
    assert gpu_check.main(["--out", str(tmp_path / "check")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: no CUDA device here") and "\n" not in error
    assert not (tmp_path / "check").exists()  # nothing was run or written
    results = {"forward": [
        {"variant": "fast_fp32", "size": 608, "batch": 1, "latency_ms": 6.2, "images_per_s": 160.0},
        {"variant": "fast_bf16_compiled", "size": 608, "batch": 1, "latency_ms": 4.1, "images_per_s": 244.0},
        {"variant": "fast_bf16", "size": 416, "batch": 64, "latency_ms": 30.0, "images_per_s": 2133.3},
        {"variant": "fast_fp32", "size": 416, "batch": 64, "latency_ms": 50.0, "images_per_s": 2500.0}]}
    figures = gpu_check.bench_figures(results)
    assert figures == {"latency_608_batch1_ms": 4.1, "throughput_416_batch64_bf16": 2133.3}  # bf16 rows only
    rows = gpu_check.target_rows(figures)
    assert [row["met"] for row in rows] == [True, True]
    assert [row["met"] for row in gpu_check.target_rows({"latency_608_batch1_ms": 5.0})] == [False, None]
    text = gpu_check.markdown({"device": "H200", "torch": "x", "cuda": "12", "seconds": 1.0,
                               "tests": {"exit_status": 0, "tests": 9, "failures": 0, "errors": 0, "skipped": 1},
                               "targets": rows})
    assert "| latency_608_batch1_ms | 4.10 | < 5 | yes |" in text
    # Only the files with GPU tests are collected there (the GPU image has no streamlit or plotly).
    names = [path.name for path in gpu_test_files()]
    assert {"test_gpu.py", "test_train.py", "test_analyze.py"} <= set(names) and "test_app.py" not in names


def test_make_gpu_check_names_a_python_without_torch(tmp_path):
    # `make gpu-check` runs `python3` by default; one without torch once ended in a traceback.
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 1\n")  # a Python whose `import torch` fails
    python.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={python}"], cwd=root, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"gpu-check: {python} has no torch" in result.stderr


def test_profile_parts_cover_the_model_once_and_operators_are_named():
    from asff_viz.bench.profile import model_parts, operator_kind, part_flops, profile_forward

    model = tiny_model()
    size = 64
    parts = model_parts(model)
    # Every module of the model belongs to exactly one part (the nested SPP and deformable convs are taken out of
    # the neck and the head), so the parts' FLOPs are the model's FLOPs.
    assert len(parts["neck: SPP"]) == 1 and len(parts["head: deformable convs"]) == 3
    flops = part_flops(model, size)
    assert math.isclose(sum(flops.values()), model_flops(model, size)["gflop"], rel_tol=1e-9)
    assert flops["head: deformable convs"] > 0 and flops["neck: SPP"] == 0  # pools count no FLOPs
    lines = []
    profile = profile_forward(model, optimize_for_inference(model), size, 2, 100.0, lines.append)
    rows = {row["part"]: row for row in profile["parts"]}
    assert set(parts) < set(rows)
    assert all(row["ms"] >= 0 for row in rows.values())
    assert math.isclose(sum(row["ms"] for row in rows.values()), profile["total_ms"], rel_tol=0.25)
    assert math.isclose(sum(profile["operators"].values()), 1.0)
    assert operator_kind("mkldnn::_convolution_pointwise") == "convolution"
    assert operator_kind("aten::addmm") == "deformable conv: matmul"
    assert operator_kind("mkldnn::_linear_pointwise") == "deformable conv: matmul"  # packed, in bf16
    assert operator_kind("aten::add") != operator_kind("aten::addmm")
    assert operator_kind("aten::_embedding_bag_forward_only") == "deformable conv: sampling and grids"
    assert operator_kind("aten::to") == "allocation and views"
    table = format_table({"profile": profile, "ceilings": {}, "flops": {}, "settings": {"mode": "quick", "repeats": 1},
                          "environment": {"cpu": "test", "torch_threads": 1, "torch": "x", "device": "cpu",
                                          "cpu_flags": []}})
    assert "| head: deformable convs |" in table and "operator kind" in table
    # The bf16 profile, where this CPU has one, gets a table of its own named after its variant.
    bf16 = dict(profile, variant="fast_bf16", total_ms=123.4)
    table = format_table({"profile": profile, "profile_bf16": bf16, "ceilings": {}, "flops": {},
                          "settings": {"mode": "quick", "repeats": 1},
                          "environment": {"cpu": "test", "torch_threads": 1, "torch": "x", "device": "cpu",
                                          "cpu_flags": []}})
    assert "fast_bf16 at 64, batch 1, 123.4 ms per forward" in table


def test_profile_times_every_part_of_the_mobilenet_model():
    """MobileNetV2's inverted residual blocks live in a ModuleList, which is never called: its blocks are timed
    one by one, in runs at one resolution, and together the parts still hold the model's FLOPs."""
    from asff_viz.bench.profile import model_parts, part_flops, profile_forward

    torch.manual_seed(0)
    model = calibrate_batchnorm(build_model(backbone="mobilenet_v2", width=0.25, depth=0.33, num_classes=3),
                                [torch.randn(2, 3, 64, 64)])
    parts = model_parts(model)
    blocks = [name for name in parts if name.startswith("backbone.blocks")]
    strides = [max(max(m.stride) for m in parts[name][0].modules() if isinstance(m, nn.Conv2d)) for name in blocks]
    assert len(blocks) >= 4 and all(stride == 2 for stride in strides[1:])  # a run starts where the map halves
    assert sum(len(parts[name]) for name in blocks) == len(model.backbone.blocks)
    flops = part_flops(model, 64)
    assert math.isclose(sum(flops.values()), model_flops(model, 64)["gflop"], rel_tol=1e-9)
    profile = profile_forward(model, optimize_for_inference(model), 64, 2, 100.0, lambda line: None)
    rows = {row["part"]: row for row in profile["parts"]}
    assert all(rows[name]["ms"] > 0 and rows[name]["gflop"] > 0 for name in blocks)
    table = format_table({"mobilenet": {"variant": model.config.variant, "parameters": 1e6, "flops": {}, "forward": [],
                                        "profile": profile}, "ceilings": {}, "flops": {},
                          "settings": {"mode": "quick", "repeats": 1},
                          "environment": {"cpu": "test", "torch_threads": 1, "torch": "x", "device": "cpu",
                                          "cpu_flags": []}})
    assert "Where the time goes, MobileNetV2 model" in table and f"| {blocks[1]} |" in table


@pytest.mark.skipif(not weight_packing_available(), reason="no oneDNN weight packing in this PyTorch build")
def test_levers_bench_compares_the_fast_path_with_itself_without_each_lever(tmp_path, capsys):
    from asff_viz.bench import levers

    model = tiny_model()
    before = levers.unpacked_fast_path(model, None)
    assert not any(isinstance(m, (InPlaceResidual, PackedConv2d)) for m in before.modules())
    assert before.inference_settings["cpu_chunk_pixels"] == 0
    lines = []
    rows = levers.lever_speedups(model, [64], [1, 2], repeats=1, log=lines.append)
    dtypes = {"fp32"} | ({"bf16"} if BF16_ONEDNN else set())
    assert {(row["dtype"], row["batch"]) for row in rows} == {(d, b) for d in dtypes for b in (1, 2)}
    for row in rows:
        assert min(row["before_ms"], row["whole_ms"], row["now_ms"]) > 0
        assert min(row["speedup"], row["speedup_packing"], row["speedup_chunks"]) > 0
        assert row["relative_difference"] < (1e-4 if row["dtype"] == "fp32" else 2e-2)
    assert len(lines) == len(rows)
    # A bad flag is one line naming it, before any model is built.
    with pytest.raises(SystemExit) as exit_info:
        levers.main(["--sizes", "100"])
    assert exit_info.value.code == 2 and "--sizes must be positive multiples of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        levers.main(["--out", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err


def test_cpu_batches_run_in_chunks_with_the_whole_batch_s_outputs(model):
    images = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(11))
    whole = optimize_for_inference(model, cpu_chunk_pixels=0)
    chunked = optimize_for_inference(model, cpu_chunk_pixels=2 * SIZE * SIZE)
    assert chunked.inference_settings["cpu_chunk_pixels"] == 2 * SIZE * SIZE
    assert optimize_for_inference(model).inference_settings["cpu_chunk_pixels"] == 2 * 416 * 416
    calls = []
    original = chunked.inference_forward
    chunked.inference_forward = lambda x: calls.append(x.shape[0]) or original(x)
    result = run(chunked, images)
    assert calls == [2, 2, 1]  # two images' worth of pixels at a time, the last chunk smaller
    expected = run(whole, images)
    assert_outputs_close(result[0], expected[0])
    torch.testing.assert_close(result[1], expected[1], rtol=1e-3, atol=1e-3)
    # Hooks see whole batches, as on the model as built; so does autograd.
    calls.clear()
    with capture(chunked) as recorder:
        run(chunked, images)
    assert calls == [5] and recorder.fusion_weights[0].shape[0] == 5
    calls.clear()
    chunked(images.clone().requires_grad_(True))
    assert calls == [5]
    with pytest.raises(ValueError, match="cpu_chunk_pixels"):
        optimize_for_inference(model, cpu_chunk_pixels=-1)
