"""The model: gradients reach every parameter, finite outputs in every variant, shapes, a hand-decoded cell,
configs. Models are small (width 0.125, depth 0.33) and inputs 64 px."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from asff_viz.models import LevelOutput, build_model
from asff_viz.models.config import OFFICIAL_ANCHORS, ModelConfig

NUM_CLASSES = 3
SMALL = {"width": 0.125, "depth": 0.33, "num_classes": NUM_CLASSES}


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def test_every_parameter_gets_a_gradient():
    model = build_model(**SMALL, rfb=True).train()
    images = torch.randn(2, 3, 64, 64)
    outputs = model(images)
    generator = torch.Generator().manual_seed(1)
    # Random weights over both outputs, so no gradient cancels by symmetry. `conv_offset` sees only the
    # detached anchor shapes, so its gradient must come through the deformable conv's offset input.
    objective = sum((out.prediction * torch.randn(out.prediction.shape, generator=generator)).sum()
                    + (out.anchor_logwh * torch.randn(out.anchor_logwh.shape, generator=generator)).sum()
                    for out in outputs)
    objective.backward()
    without = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_conv_offset_gradient_flows_only_through_the_offsets():
    """guide_wh's output enters the deformable conv detached: the prediction alone gives guide_wh no gradient,
    but conv_offset one (via the sampling positions)."""
    model = build_model(**SMALL).train()
    outputs = model(torch.randn(2, 3, 64, 64))
    sum(out.prediction.square().sum() for out in outputs).backward()
    head = model.head.levels[1]
    assert head.guide_wh.weight.grad is None
    assert head.adaption.conv_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fusion, rfb", [("asff", False), ("sum", False), ("concat", False), ("baseline", False),
                                         ("asff", True)])
def test_no_nan_and_output_shapes(fusion, rfb):
    model = build_model(**SMALL, fusion=fusion, rfb=rfb)
    images = torch.randn(2, 3, 64, 64) * 3
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            outputs = model(images)
        assert isinstance(outputs, list) and len(outputs) == 3
        for level, (out, stride) in enumerate(zip(outputs, (32, 16, 8), strict=True)):
            assert isinstance(out, LevelOutput)
            side = 64 // stride
            assert out.prediction.shape == (2, 4, 5 + NUM_CLASSES, side, side), (mode, level)
            assert out.anchor_logwh.shape == (2, 4, 2, side, side), (mode, level)
            assert torch.isfinite(out.prediction).all() and torch.isfinite(out.anchor_logwh).all()
        decoded = model.decode(outputs)
        assert decoded.shape == (2, 4 * (2 * 2 + 4 * 4 + 8 * 8), 5 + NUM_CLASSES)
        assert torch.isfinite(decoded).all()


def test_train_and_eval_return_the_same_types():
    model = build_model(**SMALL)
    images = torch.randn(2, 3, 64, 64)
    model.train()
    trained = model(images)
    model.eval()
    with torch.no_grad():
        evaluated = model(images)
    assert type(trained) is type(evaluated) is list
    for a, b in zip(trained, evaluated, strict=True):
        assert type(a) is type(b) is LevelOutput
        assert a.prediction.shape == b.prediction.shape and a.anchor_logwh.shape == b.anchor_logwh.shape


def test_decode_matches_a_hand_computed_cell():
    model = build_model(**SMALL)
    grids = model.grid_sizes(64)  # 2x2, 4x4, 8x8
    assert grids == [(2, 2), (4, 4), (8, 8)]
    outputs = [LevelOutput(torch.zeros(1, 4, 5 + NUM_CLASSES, h, w), torch.zeros(1, 4, 2, h, w)) for h, w in grids]
    # Level 1 (stride 16), anchor-free slot 3 (base 4 * 16 = 64 px), row 2, col 1.
    outputs[1].prediction[0, 3, :, 2, 1] = torch.tensor([0.3, -0.2, 0.1, -0.4, 1.5, -1.0, 2.0, 0.5])
    outputs[1].anchor_logwh[0, 3, :, 2, 1] = torch.tensor([0.2, -0.1])
    # Level 0 (stride 32), slot 0 = anchor 6 (116, 90), row 1, col 0.
    outputs[0].prediction[0, 0, :, 1, 0] = torch.tensor([-1.0, 0.5, 0.25, 0.0, -2.0, 0.0, 0.0, 3.0])
    outputs[0].anchor_logwh[0, 0, :, 1, 0] = torch.tensor([-0.3, 0.4])
    # Level 2 (stride 8), slot 1 = anchor 1 (16, 30), row 7, col 5.
    outputs[2].prediction[0, 1, :, 7, 5] = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    decoded = model.decode(outputs)[0].double()

    # Rows: level 0 has 4 * 2 * 2 = 16 rows, level 1 4 * 4 * 4 = 64; inside a level (slot, row, col).
    row = 16 + 3 * 16 + 2 * 4 + 1
    expected = [
        (sigmoid(0.3) + 1) * 16, (sigmoid(-0.2) + 2) * 16,
        math.exp(0.1) * math.exp(0.2) * 64, math.exp(-0.4) * math.exp(-0.1) * 64,
        sigmoid(1.5), sigmoid(-1.0), sigmoid(2.0), sigmoid(0.5),
    ]
    assert decoded[row].tolist() == pytest.approx(expected, rel=1e-6)
    row = 0 * 4 + 1 * 2 + 0
    expected = [(sigmoid(-1.0) + 0) * 32, (sigmoid(0.5) + 1) * 32, math.exp(0.25) * math.exp(-0.3) * 116,
                math.exp(0.0) * math.exp(0.4) * 90, sigmoid(-2.0), 0.5, 0.5, sigmoid(3.0)]
    assert decoded[row].tolist() == pytest.approx(expected, rel=1e-6)
    row = 16 + 64 + 1 * 64 + 7 * 8 + 5
    expected = [(0.5 + 5) * 8, (0.5 + 7) * 8, math.exp(0.5) * 16, math.exp(0.5) * 30, 0.5, 0.5, 0.5, 0.5]
    assert decoded[row].tolist() == pytest.approx(expected, rel=1e-6)


def test_base_anchors_include_the_official_ninth_anchor():
    model = build_model(**SMALL)
    assert model.base_anchors(0).tolist() == [[116, 90], [156, 198], [121, 240], [128, 128]]
    assert model.base_anchors(1).tolist() == [[30, 61], [62, 45], [42, 119], [64, 64]]
    assert model.base_anchors(2).tolist() == [[10, 13], [16, 30], [33, 23], [32, 32]]
    assert OFFICIAL_ANCHORS[8] == (121, 240)


def test_width_and_depth_multipliers_make_smaller_models():
    def count(**kwargs):
        return sum(p.numel() for p in build_model(num_classes=NUM_CLASSES, **kwargs).parameters())

    assert count(width=0.25, depth=0.33) < count(width=0.25, depth=1.0) < count(width=0.5, depth=1.0)
    assert count(width=0.125, depth=0.33) < count(width=0.25, depth=0.33)
    small = build_model(**SMALL)
    assert small.backbone.dark3.residual.blocks.__len__() == 3  # round(8 * 0.33)
    assert small.fusion.levels[0].expand.conv.out_channels == 128  # 1024 * 0.125


def test_model_config_round_trip():
    config = ModelConfig(num_classes=7, fusion="concat", rfb=True, width=0.5, depth=0.33, compress_channels=4)
    assert ModelConfig.from_dict(dataclasses.asdict(config)) == config
    # Through JSON the tuples become lists; the config normalizes them back.
    assert ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config
    assert build_model(config).config == config
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**dataclasses.asdict(config), "colour": "red"})
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="attention")


def test_weighted_fusion_is_bifpns_fast_normalized_fusion():
    from asff_viz import capture
    from asff_viz.introspection.decomposition import decompose_gradients
    from asff_viz.introspection.objectives import SumOfScores

    torch.manual_seed(0)
    model = build_model(width=0.125, depth=0.33, num_classes=3, fusion="weighted").eval()
    raw = [torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 1.0])]
    with torch.no_grad():
        for level, values in zip(model.fusion.levels, raw, strict=True):
            level.source_weights.copy_(values)
    expected = [[2.0 / 2.5001, 0.0, 0.5 / 2.5001], [0.0, 0.0, 3.0 / 3.0001], [1.0 / 3.0001] * 3]  # eps 1e-4
    images = torch.randn(2, 3, 64, 64)
    with capture(model) as recorder, torch.no_grad():
        outputs = model(images)
    for level, weights in enumerate(recorder.fusion_weights):
        assert weights.shape == (2, 3, 64 // (32 >> level), 64 // (32 >> level))
        for source in range(3):
            torch.testing.assert_close(weights[:, source], torch.full_like(weights[:, source], expected[level][source]))
    # The fused map is that weighted sum of the resized sources, at every position.
    with capture(model, resized=True, fused=True) as recorder, torch.no_grad():
        model(images)
    for level in range(3):
        manual = sum(expected[level][k] * recorder.resized[level][k] for k in range(3))
        torch.testing.assert_close(recorder.fused[level], manual, rtol=1e-5, atol=1e-5)
    assert len(outputs) == 3 and model.config.variant == "weighted"
    # Weights that do not depend on the features leave no gradient through a weight branch.
    decomposition = decompose_gradients(model.double(), torch.randn(3, 64, 64, dtype=torch.float64), SumOfScores())
    for level in range(3):
        for source in range(3):
            assert decomposition.weight_branch[level][source].abs().max() < 1e-12
