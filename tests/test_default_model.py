"""The embedded default model: shipped, loadable with no arguments, small, and (slow test) at its quality bar."""

from __future__ import annotations

import pytest
import torch

from asff_viz import Detector, load_model
from asff_viz.checkpoint import default_checkpoint_path
from asff_viz.data.synthetic import CLASS_NAMES
from asff_viz.ops.boxes import box_iou
from asff_viz.samples import list_samples, sample_annotations, sample_path

MAX_BYTES = 25 * 1024 * 1024


def test_the_embedded_default_ships_and_loads_without_arguments():
    path = default_checkpoint_path()
    assert path.is_file(), f"{path} is part of the repository"
    assert path.stat().st_size <= MAX_BYTES
    model = load_model()
    assert model.metadata["checkpoint"] == str(path)
    assert tuple(model.metadata["class_names"]) == CLASS_NAMES
    assert model.config.fusion == "asff" and model.config.width == 0.25 and model.config.depth == 0.33
    assert model.metadata["input_size"] == 416
    assert 3.0e6 < sum(p.numel() for p in model.parameters()) < 4.0e6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_embedded_default_finds_objects_on_every_bundled_sample():
    detector = Detector(conf_threshold=0.25)  # the app's default threshold
    for name in list_samples():
        result = detector(sample_path(name))
        truth = sample_annotations(name)
        overlap = box_iou(result.boxes, torch.as_tensor(truth.boxes_xyxy, dtype=torch.float32))
        same_class = result.labels[:, None] == torch.as_tensor(truth.class_indices)[None, :]
        found = ((overlap >= 0.5) & same_class).any(dim=0)  # ground-truth boxes matched by a detection
        assert found.sum() >= max(1, len(found) // 2), (name, found.tolist())


@pytest.fixture(scope="module")
def validation_split(tmp_path_factory):
    from asff_viz.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("val"), seed=0, train=0, val=500, size=320)  # the model card's split


@pytest.mark.slow
def test_the_embedded_default_meets_its_quality_bar_on_the_synthetic_validation_split(validation_split):
    from asff_viz.data.coco import COCODetection
    from asff_viz.inference.coco_eval import evaluate_coco

    model = load_model()
    metrics, _ = evaluate_coco(model, COCODetection(validation_split.val_annotations, validation_split.val_images),
                               model.metadata["input_size"])
    assert metrics["AP50"] >= 0.80 and metrics["AP"] >= 0.50, metrics


@pytest.mark.slow
def test_the_embedded_default_shows_the_scale_selection_of_its_model_card(validation_split, tmp_path):
    """The numbers of MODEL_CARD.md's scale-selection table that its conclusions rest on."""
    import csv

    from asff_viz.analyze.cli import main

    main(["scale-stats", "--annotations", str(validation_split.val_annotations), "--images",
          str(validation_split.val_images), "--out", str(tmp_path), "--no-progress"])
    with open(tmp_path / "fusion_by_size.csv") as handle:
        mean = {(r["target"], r["source"], r["size"]): float(r["mean"]) for r in csv.DictReader(handle)}
    # The criterion at the stride-8 target: the stride-8 source higher inside small boxes than large, the
    # stride-32 source the reverse.
    assert mean["stride 8", "stride 8", "small"] == pytest.approx(0.368, abs=0.005)
    assert mean["stride 8", "stride 8", "large"] == pytest.approx(0.317, abs=0.005)
    assert mean["stride 8", "stride 32", "small"] == pytest.approx(0.318, abs=0.005)
    assert mean["stride 8", "stride 32", "large"] == pytest.approx(0.576, abs=0.005)
    # The coarse targets withdraw the stride-8 source inside objects, most inside small ones.
    for target, background in (("stride 32", 0.452), ("stride 16", 0.487)):
        assert mean[target, "stride 8", "background"] == pytest.approx(background, abs=0.005)
        assert (mean[target, "stride 8", "small"] < mean[target, "stride 8", "large"]
                < mean[target, "stride 8", "background"])
