"""The MobileNetV2 models: the two released checkpoints load strictly (exactness: `test_exactness.py`), convert,
detect, capture, decompose gradients and train; torchvision's ImageNet MobileNetV2 initialises the backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asff_viz import capture, load_model, trace_image
from asff_viz.checkpoint import CheckpointError, parse_checkpoint
from asff_viz.convert import main as convert_main
from asff_viz.data.synthetic import generate
from asff_viz.detect import main as detect_main
from asff_viz.introspection.decomposition import decompose_gradients, gradient_flow
from asff_viz.introspection.objectives import SumOfScores
from asff_viz.models import build_model
from asff_viz.models.config import MOBILENET_ANCHORS, OFFICIAL_ANCHORS, ModelConfig
from asff_viz.models.official import (
    is_torchvision_mobilenet_v2,
    load_darknet_weights,
    remap_official_state_dict,
    remap_torchvision_mobilenet_v2,
)
from asff_viz.samples import sample_path
from asff_viz.train import main as train_main
from tests.conftest import calibrate_batchnorm
from tests.reference.manifest_weights import MANIFESTS, manifest_state_dict, read_manifest
from tests.test_train import tiny_args

SIZE = 96


def tiny_mobilenet(fusion: str = "asff", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(backbone="mobilenet_v2", fusion=fusion, width=0.25, depth=0.33, num_classes=3)
    return calibrate_batchnorm(model, [torch.randn(2, 3, SIZE, SIZE)]).eval()


def test_the_family_sets_activation_head_and_anchors():
    config = ModelConfig(backbone="mobilenet_v2")
    assert config.activation == "relu6" and not config.feature_adaption
    assert config.anchors == MOBILENET_ANCHORS and config.anchors[8] == (373, 326)
    assert ModelConfig().anchors == OFFICIAL_ANCHORS and ModelConfig().anchors[8] == (121, 240)
    model = build_model(backbone="mobilenet_v2", width=0.25, depth=0.33, num_classes=3)
    activations = {type(m).__name__ for m in model.modules() if isinstance(m, (torch.nn.LeakyReLU, torch.nn.ReLU6))}
    assert activations == {"ReLU6"}
    assert all(level.adaption is None for level in model.head.levels)
    assert [info.stride for info in model.backbone.feature_info] == [8, 16, 32]
    with pytest.raises(ValueError, match="rfb"):
        ModelConfig(backbone="mobilenet_v2", rfb=True)


@pytest.mark.parametrize("name, variant", [("mobile_asff", "mobilenet_v2_asff"), ("mobile", "mobilenet_v2_baseline")])
def test_released_layouts_load_convert_and_detect(tmp_path, name, variant):
    official = tmp_path / f"yolov3_{name}.pth"
    torch.save(manifest_state_dict(name), official)
    model = load_model(official)
    assert model.config.variant == variant and model.config.backbone == "mobilenet_v2"
    assert model.metadata["input_size"] == 416 and model.metadata["origin"] == "official"
    converted = tmp_path / f"{name}.pt"
    assert convert_main([str(official), str(converted)]) == 0
    again = load_model(converted)
    assert again.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    out = tmp_path / "detect"
    assert detect_main(["--weights", str(converted), "--source", str(sample_path("shapes_small.jpg")), "--out",
                        str(out), "--size", "128"]) == 0
    written = json.loads((out / "detections.json").read_text())
    assert (out / "shapes_small.jpg").is_file() and written


def test_a_mobilenet_layout_without_its_levels_is_named():
    state_dict = {k: v for k, v in manifest_state_dict("mobile_asff").items() if not k.startswith("level_0_conv.")}
    with pytest.raises(CheckpointError, match="MobileNetV2"):
        parse_checkpoint(state_dict, "broken.pth")


def torchvision_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's MobileNetV2 keys, built without torchvision: the official backbone is torchvision's module
    (`module_list.N` = torchvision `features.N`, N = 0..18), plus its ImageNet classifier."""
    official = manifest_state_dict("mobile_asff")
    state_dict = {}
    for key, value in official.items():
        parts = key.split(".")
        if parts[0] == "module_list" and int(parts[1]) <= 18:
            state_dict[".".join(["features", *parts[1:]])] = value * 1.5  # other values than the official path
    state_dict["classifier.1.weight"] = torch.randn(1000, 1280)
    state_dict["classifier.1.bias"] = torch.randn(1000)
    return state_dict


def test_torchvision_keys_initialise_the_backbone():
    state_dict = torchvision_state_dict()
    assert is_torchvision_mobilenet_v2(state_dict)
    remapped = remap_torchvision_mobilenet_v2(state_dict)
    backbone = build_model(backbone="mobilenet_v2").backbone
    assert set(remapped) == set(backbone.state_dict())  # every key, nothing of the classifier
    backbone.load_state_dict(remapped, strict=True)
    # The same tensors land where the official checkpoint's do.
    _, official = remap_official_state_dict(manifest_state_dict("mobile_asff"))
    for key, value in remapped.items():
        assert torch.equal(value, official[f"backbone.{key}"] * 1.5), key
    assert sum(1 for key in read_manifest(MANIFESTS["mobile_asff"]) if key[0].startswith("module_list.")
               and int(key[0].split(".")[1]) <= 18) == len(remapped)
    with pytest.raises(CheckpointError, match="no place in the backbone"):
        remap_torchvision_mobilenet_v2({**state_dict, "features.19.0.weight": torch.zeros(1)})


def test_darknet_weights_are_refused_for_a_mobilenet_backbone(tmp_path):
    path = tmp_path / "darknet53.conv.74"
    path.write_bytes(np.zeros(100, np.float32).tobytes())
    with pytest.raises(CheckpointError, match="MobileNetV2"):
        load_darknet_weights(build_model(backbone="mobilenet_v2", width=0.25).backbone, path)


def test_capture_trace_and_gradient_flow_on_a_mobilenet_asff_model():
    model = tiny_mobilenet()
    image = np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)
    with capture(model) as recorder, torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    for level, weights in enumerate(recorder.fusion_weights):
        assert weights.shape == (1, 3, SIZE // (32 >> level), SIZE // (32 >> level))
        torch.testing.assert_close(weights.sum(dim=1), torch.ones_like(weights[:, 0]))
    trace = trace_image(model, image, size=SIZE, conf_threshold=0.0)
    assert len(trace.fusion_weights) == 3 and trace.detections
    image_tensor = torch.randn(3, SIZE, SIZE, dtype=torch.float64)
    flow = gradient_flow(model.double(), image_tensor, SumOfScores())
    assert flow.matrix.shape == (3, 3) and np.isfinite(flow.matrix).all() and flow.matrix.sum() > 0
    # The decomposition is exact here too: value and weight-branch terms add up to the gradient at each source,
    # and (level 2 compresses source 1, unlike the Darknet model) every path carries gradient.
    decomposition = decompose_gradients(model, image_tensor, SumOfScores())
    for source in range(3):
        summed = sum(decomposition.value[l][source] + decomposition.weight_branch[l][source] for l in range(3))
        scale = decomposition.fusion_total[source].abs().max()
        torch.testing.assert_close(summed, decomposition.fusion_total[source], rtol=0, atol=1e-10 * scale)
    assert (flow.matrix > 0).all()


def test_a_mobilenet_trains_from_scratch_and_from_torchvision_weights(tmp_path_factory, tmp_path):
    synthetic = generate(tmp_path_factory.mktemp("synthetic"), seed=5, train=6, val=2, size=96)
    summary = train_main(tiny_args(synthetic, tmp_path / "scratch", epochs=1, extra=["--backbone", "mobilenet_v2"]))
    assert "error" not in summary and np.isfinite(summary["losses"]["total"])
    trained = load_model(tmp_path / "scratch" / "last.pt")
    assert trained.config.backbone == "mobilenet_v2" and trained.config.variant == "mobilenet_v2_asff"

    init = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(torchvision_state_dict(), init)
    args = tiny_args(synthetic, tmp_path / "imagenet", epochs=1, extra=["--init", str(init)])
    args[args.index("--width") + 1] = "1.0"  # torchvision's ImageNet weights are the width-1.0 network
    args[args.index("--depth") + 1] = "1.0"
    args += ["--lr", "1e-12", "--max-iterations", "1"]  # a negligible step: the backbone keeps the ImageNet weights
    summary = train_main(args)
    assert "error" not in summary
    model = load_model(tmp_path / "imagenet" / "last.pt")
    assert model.config.backbone == "mobilenet_v2"  # chosen by the --init file
    expected = remap_torchvision_mobilenet_v2(torchvision_state_dict())
    weight = "blocks.3.depthwise.conv.weight"
    torch.testing.assert_close(model.backbone.state_dict()[weight], expected[weight])
    with pytest.raises(SystemExit, match="mobilenet_v2"):
        train_main(tiny_args(synthetic, tmp_path / "wrong", epochs=1, extra=["--init", str(init), "--backbone",
                                                                             "darknet53"]))
