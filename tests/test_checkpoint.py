"""Checkpoints: unsafe and damaged files are refused with clear errors, foreign state dicts are summarized,
the official-format converter round-trips bit for bit, saving is atomic, and Darknet `.weights` land in the
right tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from asff_viz import CheckpointError, load_model
from asff_viz.checkpoint import convert_official, file_sha256, load_state_dict_strict, read_checkpoint, save_checkpoint
from asff_viz.convert import main as convert_main
from asff_viz.models import build_model
from asff_viz.models.backbone import Darknet53
from asff_viz.models.config import ModelConfig
from asff_viz.models.official import load_darknet_weights, official_key_to_project
from tests.reference.manifest_weights import MANIFESTS, manifest_state_dict, read_manifest

SMALL = {"width": 0.125, "depth": 0.33, "num_classes": 3}
METADATA = {"class_names": ["cat", "dog", "bird"], "input_size": 64}


class CreatesFileWhenUnpickled:
    """A pickle payload: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, so that a misplaced BatchNorm tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
                module.weight.copy_(0.5 + torch.rand(module.num_features, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.num_features, generator=generator))
    return model


def small_official_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-layout state dict (every key of manifest `name`) for a quarter-width network.

    The values come from a randomly initialized model of ours, renamed to the official keys: a loader that
    puts any tensor in the wrong place changes the outputs.
    """
    torch.manual_seed(seed)
    config = {"asff": {}, "asff_rfb": {"rfb": True}, "baseline": {"fusion": "baseline"}}[name]
    model = randomize_batch_norm(build_model(width=0.25, **config), seed)
    own = model.state_dict()
    layout = "baseline" if name == "baseline" else "asff"
    return {key: own[official_key_to_project(key, layout)].clone() for key, _, _ in read_manifest(MANIFESTS[name])}


def small_project_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batch_norm(build_model(**SMALL), seed)


@pytest.fixture
def project_checkpoint(tmp_path) -> Path:
    path = tmp_path / "small.pt"
    save_checkpoint(path, small_project_model(), METADATA)
    return path


# ------------------------------------------------------------------------------------- unsafe and damaged files


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": CreatesFileWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused.*(open|GLOBAL)"):
        load_model(path)
    with pytest.raises(CheckpointError, match="refused"):
        convert_official(path, tmp_path / "out.pt")
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    other = tmp_path / "code_ran_unsafely"
    torch.save({"model": CreatesFileWhenUnpickled(other)}, tmp_path / "evil2.pt")
    torch.load(tmp_path / "evil2.pt", weights_only=False)
    assert other.exists()


def test_truncated_checkpoint_gives_clear_error(project_checkpoint, tmp_path):
    data = project_checkpoint.read_bytes()
    truncated = tmp_path / "half.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.pt: a truncated or damaged zip archive"):
        load_model(truncated)


def test_empty_and_missing_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: the file is empty"):
        load_model(empty)
    with pytest.raises(CheckpointError, match=r"absent\.pt: no such checkpoint file"):
        load_model(tmp_path / "absent.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_garbage_and_plain_pickles_give_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all " * 8)
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a"):
        read_checkpoint(garbage)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    with pytest.raises(CheckpointError, match=r"plain\.pkl: a plain pickle, not torch.save.s format"):
        read_checkpoint(plain)
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError, match=r"list\.pt: expected a dict"):
        read_checkpoint(listing)


# ------------------------------------------------------------------------------------- foreign state dicts


def test_random_dict_of_tensors_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "random.pt"
    torch.save({f"layer{i}.weight": torch.randn(3, 3) for i in range(4)}, path)
    with pytest.raises(CheckpointError, match=r"random\.pt: neither an asff_viz checkpoint nor an official"):
        load_model(path)


def test_project_checkpoint_of_another_architecture_lists_missing_and_unexpected(tmp_path):
    path = tmp_path / "foreign.pt"
    checkpoint = {"format": "asff_viz", "format_version": 1, "config": ModelConfig(**SMALL).to_dict(),
                  "model": {f"encoder.block{i}.weight": torch.randn(3, 3) for i in range(4)},
                  "metadata": METADATA}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    message = str(error.value)
    expected_count = len(build_model(**SMALL).state_dict())
    assert "foreign.pt" in message
    assert f"{expected_count} missing keys: backbone.dark1" in message
    assert "4 unexpected keys: encoder.block0.weight.* (4)" in message or "4 unexpected keys" in message


def test_official_state_dict_with_keys_removed_lists_missing(tmp_path):
    path = tmp_path / "baseline_cut.pth"
    state_dict = small_official_state_dict("baseline")
    for key in [k for k in state_dict if k.startswith("module_list.37.Feature_adaption")]:
        del state_dict[key]  # the stride-8 head's deformable adaption
    del state_dict["module_list.5.conv.weight"]
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"baseline_cut\.pth: does not fit the model \(baseline\): "
                                              r"5 missing keys: backbone\.dark3\.downsample\.conv\.weight, "
                                              r"head\.levels\.2\.\* \(4\)"):
        load_model(path)
    # Without its level-0 head the variant cannot even be recognized: said so, not a KeyError.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("module_list.37.")}
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"baseline_cut\.pth: .*neither the ASFF .* nor the baseline"):
        load_model(path)


def test_extra_keys_are_listed(tmp_path, project_checkpoint):
    state_dict = small_official_state_dict("asff")
    state_dict["level_0_header.iou_branch.weight"] = torch.zeros(1)
    state_dict["level_1_header.iou_branch.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"extra\.pth: 2 official keys have no place in the asff model: "
                                              r"level_0_header\.iou_branch\.weight"):
        load_model(path)
    checkpoint = torch.load(project_checkpoint, weights_only=True)
    checkpoint["model"]["fusion.levels.0.attention.weight"] = torch.zeros(2)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: fusion\.levels\.0"):
        load_model(path)


def test_metadata_class_count_must_match_the_model(tmp_path):
    path = tmp_path / "mismatch.pt"
    save_checkpoint(path, build_model(**SMALL), {"class_names": ["cat", "dog"], "input_size": 64})
    with pytest.raises(CheckpointError, match=r"mismatch\.pt: metadata names 2 classes but the model predicts 3"):
        load_model(path)


def test_other_class_count_is_a_shape_mismatch(project_checkpoint):
    checkpoint = read_checkpoint(project_checkpoint)
    model = build_model(**{**SMALL, "num_classes": 5})
    with pytest.raises(CheckpointError, match=r"6 shape mismatches, e\.g\. head\.levels\.0\.predict\.weight "
                                              r"\(32, 128, 1, 1\) vs model \(40, 128, 1, 1\)"):
        load_state_dict_strict(model, checkpoint["model"], str(project_checkpoint))


def test_project_checkpoint_loads_with_metadata(project_checkpoint):
    model = load_model(project_checkpoint)
    assert not model.training
    assert model.metadata["class_names"] == METADATA["class_names"]
    assert model.metadata["input_size"] == 64
    assert model.metadata["sha256"] == file_sha256(project_checkpoint)
    assert model.metadata["variant"] == "asff"
    reference = small_project_model().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.decode(model(images)), reference.decode(reference(images)))


# ------------------------------------------------------------------------------------- converter


@pytest.mark.parametrize("name, variant", [("asff", "asff"), ("asff_rfb", "asff_rfb"), ("baseline", "baseline")])
def test_converter_round_trip_is_bit_identical(name, variant, tmp_path):
    official = tmp_path / f"{name}.pth"
    torch.save(small_official_state_dict(name), official)
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(f"thing {i}" for i in range(80)) + "\n\n")
    converted = tmp_path / f"{name}_converted.pt"
    assert convert_main([str(official), str(converted), "--class-names", str(names_file),
                         "--input-size", "320"]) == 0

    from_official, from_converted = load_model(official), load_model(converted)
    assert from_official.config == from_converted.config and from_converted.config.variant == variant
    assert from_converted.metadata["class_names"][79] == "thing 79"
    assert from_converted.metadata["input_size"] == 320
    assert from_converted.metadata["converted_from"]["sha256"] == file_sha256(official)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, observed = from_official(images), from_converted(images)
    for a, b in zip(expected, observed, strict=True):
        assert torch.equal(a.prediction, b.prediction) and torch.equal(a.anchor_logwh, b.anchor_logwh)
    for key, value in from_official.state_dict().items():
        assert torch.equal(value, from_converted.state_dict()[key]), key


def test_converter_reports_bad_arguments(tmp_path, capsys):
    official = tmp_path / "official.pth"
    torch.save(small_official_state_dict("asff"), official)
    names_file = tmp_path / "names.txt"
    names_file.write_text("a\nb\n")
    assert convert_main([str(official), str(tmp_path / "out.pt"), "--class-names", str(names_file)]) == 1
    assert "80 classes but 2 class names" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    assert convert_main([str(official), str(official)]) == 1
    assert "destination is the source" in capsys.readouterr().err
    project = tmp_path / "project.pt"
    save_checkpoint(project, build_model(**SMALL), METADATA)
    assert convert_main([str(project), str(tmp_path / "again.pt")]) == 1
    assert "already an asff_viz checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_converter_round_trip_on_the_full_official_network(tmp_path):
    official = tmp_path / "yolov3_asff.pth"
    torch.save(manifest_state_dict("asff"), official)
    converted = tmp_path / "converted.pt"
    convert_official(official, converted)
    images = torch.randn(1, 3, 64, 64)
    first, second = load_model(official), load_model(converted)
    with torch.no_grad():
        assert torch.equal(first.decode(first(images)), second.decode(second(images)))


# ------------------------------------------------------------------------------------- atomic save


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model(**SMALL), METADATA)
    original = path.read_bytes()

    def failing_save(obj, stream, *args, **kwargs):
        stream.write(b"PK\x03\x04 half a checkpoint")  # the crash happens mid-write
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, build_model(**{**SMALL, "num_classes": 5}), METADATA)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind
    assert load_model(path).num_classes == 3


def test_saved_checkpoint_has_the_permissions_of_a_plain_file(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model(**SMALL), METADATA)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not the temporary file's 0600
    assert plain.stat().st_mode & 0o044  # the check means something: group/others can read a plain file


def test_default_weights_can_be_overridden_by_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.pt"
    save_checkpoint(path, build_model(**SMALL), METADATA)
    monkeypatch.setenv("ASFF_VIZ_DEFAULT_WEIGHTS", str(path))
    model = load_model()
    assert model.metadata["checkpoint"] == str(path) and model.num_classes == 3
    monkeypatch.setenv("ASFF_VIZ_DEFAULT_WEIGHTS", str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointError, match="ASFF_VIZ_DEFAULT_WEIGHTS"):
        load_model()


# ------------------------------------------------------------------------------------- Darknet weights


def darknet_order(backbone: Darknet53) -> list[tuple[str, nn.Module]]:
    """The conv-BN units in the order of Darknet's darknet53.cfg, spelled out from the layer names."""
    units = [("stem", backbone.stem)]
    for stage in ("dark1", "dark2", "dark3", "dark4", "dark5"):
        module = getattr(backbone, stage)
        units.append((f"{stage}.downsample", module.downsample))
        for index, block in enumerate(module.residual.blocks):
            units.append((f"{stage}.residual.blocks.{index}.reduce", block.reduce))
            units.append((f"{stage}.residual.blocks.{index}.expand", block.expand))
    return units


def write_darknet_file(path: Path, backbone: Darknet53, minor: int = 2, trailing: int = 0) -> np.ndarray:
    """A Darknet weights file filled with a running index; returns the float values written."""
    count = sum(u.conv.weight.numel() + 4 * u.bn.num_features for _, u in darknet_order(backbone)) + trailing
    values = np.arange(count, dtype=np.float32)
    header = np.array([0, minor, 0], dtype=np.int32).tobytes()
    seen = np.array([12345], dtype=np.int64 if minor >= 2 else np.int32).tobytes()
    path.write_bytes(header + seen + values.tobytes())
    return values


@pytest.mark.parametrize("minor", [2, 1])
def test_darknet_weights_land_in_the_right_tensors(minor, tmp_path):
    backbone = build_model(width=0.125, depth=0.33, num_classes=3).backbone
    path = tmp_path / "darknet53.conv.74"
    write_darknet_file(path, backbone, minor=minor, trailing=10)  # trailing values: a classifier, ignored
    assert load_darknet_weights(backbone, path) == len(darknet_order(backbone))
    offset = 0
    for name, unit in darknet_order(backbone):
        for field, tensor in (("bn.bias", unit.bn.bias), ("bn.weight", unit.bn.weight),
                              ("bn.running_mean", unit.bn.running_mean), ("bn.running_var", unit.bn.running_var),
                              ("conv.weight", unit.conv.weight)):
            expected = torch.arange(offset, offset + tensor.numel(), dtype=torch.float32).view_as(tensor)
            assert torch.equal(tensor.detach(), expected), f"{name}.{field}"
            offset += tensor.numel()
    # Spot check against the layout: the stem conv's first weight follows its 4 x 4 BN values.
    assert backbone.stem.conv.weight.flatten()[0].item() == 4 * backbone.stem.bn.num_features


def test_truncated_darknet_file_is_refused(tmp_path):
    backbone = build_model(width=0.125, depth=0.33, num_classes=3).backbone
    path = tmp_path / "darknet53.conv.74"
    write_darknet_file(path, backbone)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 400])
    with pytest.raises(CheckpointError, match=r"darknet53\.conv\.74: holds \d+ values, the Darknet-53 backbone "
                                              r"needs \d+ \(truncated"):
        load_darknet_weights(backbone, path)
    path.write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="too short"):
        load_darknet_weights(backbone, path)
    with pytest.raises(CheckpointError, match="no such Darknet weights file"):
        load_darknet_weights(backbone, tmp_path / "absent.weights")


def test_a_config_is_checked_against_its_weights_before_the_model_is_built(tmp_path, monkeypatch):
    import asff_viz.models

    built = []
    real = asff_viz.models.build_model
    monkeypatch.setattr(asff_viz.models, "build_model", lambda *a, **k: built.append(
        torch.get_default_device().type) or real(*a, **k))
    for width, message in ((3.0, r"huge\.pt: its config asks for width 3\.0"),
                           (1.5, r"huge\.pt: does not fit the model \(asff\): \d+ missing keys")):
        path = tmp_path / "huge.pt"
        torch.save({"format": "asff_viz", "format_version": 1, "config": ModelConfig(width=width).to_dict(),
                    "model": {}, "metadata": {}}, path)
        assert path.stat().st_size < 4096
        built.clear()
        with pytest.raises(CheckpointError, match=message):
            load_model(path)
        assert built in ([], ["meta"]), "a real model was built before the weights were checked"
