"""Tests of COCO evaluation (asff_viz.inference.coco_eval, asff_viz.evaluate) on a few synthetic images."""

from __future__ import annotations

import json

import pytest
import torch

from asff_viz.checkpoint import save_checkpoint
from asff_viz.data.coco import COCODetection
from asff_viz.data.synthetic import generate
from asff_viz.evaluate import main as evaluate_main
from asff_viz.inference.coco_eval import METRIC_NAMES, coco_metrics, detections_to_results, evaluate_coco
from asff_viz.inference.postprocess import Detections
from asff_viz.models import build_model
from asff_viz.models.config import ModelConfig


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic"), seed=3, train=0, val=4, size=96)


@pytest.fixture(scope="module")
def val_dataset(synthetic):
    return COCODetection(synthetic.val_annotations, synthetic.val_images)


def ground_truth_detections(dataset: COCODetection, input_size: int) -> tuple[list, list, list]:
    """Each image's targets as `Detections` in input pixels, i.e. what a perfect model would output."""
    detections, image_ids, sizes = [], [], []
    for index in range(len(dataset)):
        info = dataset.info(index)
        targets = torch.from_numpy(dataset.targets(index))  # [class, x1, y1, x2, y2] original pixels
        scale = torch.tensor([input_size / info["original_width"], input_size / info["original_height"]] * 2)
        boxes = targets[:, 1:] * scale
        count = len(targets)
        scores = torch.linspace(0.9, 0.5, count) if count else torch.zeros(0)
        detections.append(Detections(boxes, scores, targets[:, 0].long(), scores, torch.ones(count),
                                     torch.arange(count)))
        image_ids.append(info["image_id"])
        sizes.append((info["original_height"], info["original_width"]))
    return detections, image_ids, sizes


def test_ground_truth_fed_back_scores_ap_one(val_dataset):
    # The full path a model's output takes: input-pixel xyxy -> original pixels -> COCO xywh -> COCOeval.
    detections, image_ids, sizes = ground_truth_detections(val_dataset, input_size=64)
    results = detections_to_results(detections, image_ids, sizes, 64, val_dataset.category_ids)
    assert len(results) == sum(len(d) for d in detections) > 0
    metrics = coco_metrics(val_dataset.coco, results, val_dataset.image_ids)
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)


def test_wrong_classes_and_shifted_boxes_score_lower(val_dataset):
    detections, image_ids, sizes = ground_truth_detections(val_dataset, input_size=64)
    wrong = [Detections(d.boxes, d.scores, (d.labels + 1) % len(val_dataset.category_ids), d.objectness,
                        d.class_confidence, d.indices) for d in detections]
    results = detections_to_results(wrong, image_ids, sizes, 64, val_dataset.category_ids)
    assert coco_metrics(val_dataset.coco, results)["AP"] < 0.5
    shifted = [Detections(d.boxes + torch.tensor([8.0, 0.0, 8.0, 0.0]), d.scores, d.labels, d.objectness,
                          d.class_confidence, d.indices) for d in detections]
    metrics = coco_metrics(val_dataset.coco, detections_to_results(shifted, image_ids, sizes, 64,
                                                                   val_dataset.category_ids))
    assert metrics["AP"] < 0.9


def test_empty_detections_give_zero_ap(val_dataset):
    metrics = coco_metrics(val_dataset.coco, [], val_dataset.image_ids)
    assert metrics == {name: 0.0 for name in METRIC_NAMES}


def test_evaluate_coco_with_an_untrained_model(val_dataset):
    torch.manual_seed(0)
    config = ModelConfig(num_classes=len(val_dataset.class_names), width=0.125, depth=0.33)
    model = build_model(config).eval()
    metrics, results = evaluate_coco(model, val_dataset, 64, batch_size=2)
    assert set(metrics) == set(METRIC_NAMES)
    assert all(value is None or 0.0 <= value <= 1.0 for value in metrics.values())
    assert results, "an untrained model still scores above 0.001 somewhere"
    valid_ids = set(val_dataset.category_ids)
    assert all(r["category_id"] in valid_ids and len(r["bbox"]) == 4 for r in results)


def test_evaluate_command_line_writes_metrics_and_detections(synthetic, val_dataset, tmp_path):
    config = ModelConfig(num_classes=len(val_dataset.class_names), width=0.125, depth=0.33)
    weights = tmp_path / "tiny.pt"
    save_checkpoint(weights, build_model(config), {"class_names": val_dataset.class_names, "input_size": 64})
    out = tmp_path / "eval"
    metrics = evaluate_main(["--weights", str(weights), "--annotations", str(synthetic.val_annotations),
                             "--images", str(synthetic.val_images), "--out", str(out), "--device", "cpu",
                             "--conf", "0.2"])
    written = json.loads((out / "metrics.json").read_text())
    for name in METRIC_NAMES:
        assert written[name] == metrics[name]
    assert written["settings"]["size"] == 64  # from the checkpoint's metadata
    detections = json.loads((out / "detections.json").read_text())
    assert isinstance(detections, list)
    assert all({"image_id", "category_id", "bbox", "score"} <= set(d) and d["score"] >= 0.2 for d in detections)


def test_evaluate_command_line_rejects_class_count_mismatch(synthetic, tmp_path):
    weights = tmp_path / "three_classes.pt"
    save_checkpoint(weights, build_model(ModelConfig(num_classes=3, width=0.125, depth=0.33)),
                    {"class_names": ["a", "b", "c"], "input_size": 64})
    with pytest.raises(SystemExit, match="categories"):
        evaluate_main(["--weights", str(weights), "--annotations", str(synthetic.val_annotations),
                       "--images", str(synthetic.val_images), "--out", str(tmp_path / "x")])


def test_the_ap_bootstrap_pools_as_cocoeval_does_and_pairs_the_variants(val_dataset):
    from asff_viz.analyze.ap_bootstrap import MatchedImages, paired_ap_difference

    detections, image_ids, sizes = ground_truth_detections(val_dataset, input_size=64)
    generator = torch.Generator().manual_seed(0)
    noisy = [Detections(d.boxes + torch.randn(d.boxes.shape, generator=generator) * 2.5, d.scores,
                        torch.where(torch.rand(len(d), generator=generator) < 0.2,
                                    (d.labels + 1) % len(val_dataset.category_ids), d.labels),
                        d.objectness, d.class_confidence, d.indices) for d in detections]
    variants = {}
    for name, found in (("perfect", detections), ("noisy", noisy)):
        results = detections_to_results(found, image_ids, sizes, 64, val_dataset.category_ids)
        expected = coco_metrics(val_dataset.coco, results, val_dataset.image_ids)
        matched = MatchedImages(val_dataset.coco, results, val_dataset.image_ids)
        ap, ap50 = matched.average_precision()
        assert ap == pytest.approx(expected["AP"], abs=1e-12) and ap50 == pytest.approx(expected["AP50"], abs=1e-12)
        variants[name] = matched
    assert 0 < variants["noisy"].average_precision()[0] < 0.9
    paired = paired_ap_difference(variants["perfect"], variants["noisy"], samples=100)
    difference, low, high = paired["AP"]
    assert difference > 0 and low <= difference <= high and paired["images"] == len(val_dataset)
    same = paired_ap_difference(variants["noisy"], variants["noisy"], samples=50)
    assert same["AP"] == (0.0, 0.0, 0.0)  # a variant against itself: exactly zero, no spread
    assert MatchedImages(val_dataset.coco, [], val_dataset.image_ids).average_precision() == (0.0, 0.0)
