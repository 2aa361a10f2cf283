"""The model reproduces the official implementation's outputs, loaded through the official-checkpoint path."""

import pytest
import torch

from asff_viz import load_model
from asff_viz.checkpoint import parse_checkpoint
from asff_viz.models import build_model
from asff_viz.models.official import remap_official_state_dict
from tests.reference.manifest_weights import HERE, manifest_state_dict

# manifest -> (reference outputs, decoded rows, detected variant); Darknet-53 at 320, MobileNetV2 at 416.
REFERENCES = {
    "asff": ("official_asff_320.pt", 8400, "asff"),
    "mobile_asff": ("official_mobile_asff_416.pt", 14196, "mobilenet_v2_asff"),
}


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def case(request, tmp_path_factory):
    """(manifest name, the model loaded through the official-checkpoint path, the reference outputs)."""
    name = request.param
    path = tmp_path_factory.mktemp("official") / f"yolov3_{name}.pth"
    torch.save(manifest_state_dict(name), path)
    return name, load_model(path), torch.load(HERE / REFERENCES[name][0], weights_only=True)


@pytest.fixture(scope="module")
def observed(case):
    _, official_model, reference = case
    weights, sums = {}, {}
    handles = []
    for level, fusion in enumerate(official_model.fusion.levels):
        handles.append(fusion.softmax.register_forward_hook(
            lambda module, inputs, output, level=level: weights.__setitem__(level, output)))
        handles.append(fusion.fused.register_forward_hook(
            lambda module, inputs, output, level=level: sums.__setitem__(level, output.sum(dim=1))))
    try:
        with torch.no_grad():
            detections = official_model.decode(official_model(reference["input"]))
    finally:
        for handle in handles:
            handle.remove()
    return detections, weights, sums


@pytest.fixture(scope="module")
def reference(case):
    return case[2]


def test_official_checkpoint_detected(case):
    name, official_model, _ = case
    assert official_model.config.variant == REFERENCES[name][2]
    assert official_model.config.num_classes == 80
    assert official_model.metadata["origin"] == "official"
    assert len(official_model.metadata["class_names"]) == 80


def test_detections_match_reference(case, observed, reference):
    detections, _, _ = observed
    expected = reference["detections"]
    assert detections.shape == expected.shape == (1, REFERENCES[case[0]][1], 85)
    error = (detections - expected).abs()
    # Centres, objectness and classes to 1e-3 absolute.
    assert error[..., :2].max() < 1e-3
    assert error[..., 4:].max() < 1e-5
    # Widths and heights reach ~1200 px here; the reference itself carries float32 round-off of a few
    # parts per million there (a float64 forward of the same network differs from it by ~3e-3 px), so they
    # are compared relatively: 1e-5 is ~100x tighter than any real mistake would give.
    relative = error[..., 2:4] / expected[..., 2:4].abs().clamp(min=1.0)
    assert relative.max() < 1e-5
    assert error[..., 2:4][expected[..., 2:4] < 300].max() < 1e-3


def test_fusion_weights_match_reference(observed, reference):
    _, weights, _ = observed
    for level in range(3):
        assert weights[level].shape == reference["fuse_weights"][level].shape
        assert (weights[level] - reference["fuse_weights"][level]).abs().max() < 1e-5
    # The reference weights really spread: an implementation that is only roughly right cannot match them.
    level0 = reference["fuse_weights"][0]
    assert level0.max() > 0.85 and level0.min() < 0.1


def test_fused_sums_match_reference(observed, reference):
    _, _, sums = observed
    for level in range(3):
        expected = reference["fused_sums"][level]
        assert (sums[level] - expected).abs().max() < 1e-4 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("name, variant, entries", [("asff", "asff", 558), ("asff_rfb", "asff_rfb", 612),
                                                      ("baseline", "baseline", 462),
                                                      ("mobile_asff", "mobilenet_v2_asff", 546),
                                                      ("mobile", "mobilenet_v2_baseline", 450)])
def test_every_manifest_loads_strictly(name, variant, entries):
    state_dict = manifest_state_dict(name)
    assert len(state_dict) == entries
    config, remapped = remap_official_state_dict(state_dict)
    assert config.variant == variant
    model = build_model(config)
    own = model.state_dict()
    assert set(own) == set(remapped), (set(own) ^ set(remapped))
    for key, value in remapped.items():
        assert own[key].shape == value.shape, key
    model.load_state_dict(remapped, strict=True)


def test_parameter_counts_match_official():
    assert sum(p.numel() for p in build_model().parameters()) == 79_409_493
    assert sum(p.numel() for p in build_model(rfb=True).parameters()) == 86_011_821
    assert sum(p.numel() for p in build_model(backbone="mobilenet_v2").parameters()) == 27_141_613
    assert sum(p.numel() for p in build_model(backbone="mobilenet_v2", fusion="baseline").parameters()) == 24_800_532


def test_wrapped_and_prefixed_official_state_dict():
    state_dict = {f"module.{k}": v for k, v in manifest_state_dict("baseline").items()}
    config, remapped, metadata = parse_checkpoint({"state_dict": state_dict})
    assert config.variant == "baseline" and metadata["origin"] == "official"
    assert not any(k.startswith("module.") for k in remapped)
