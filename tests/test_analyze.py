"""Analyses for papers (`python -m asff_viz.analyze`): statistics against hand-built traces with known answers,
and every command end to end on a tiny synthetic dataset with tiny checkpoints."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from asff_viz.analyze import results_cache
from asff_viz.analyze.cells import background_weights, box_cell_mask, coco_size_bins, mean_weights_in_box, size_bins
from asff_viz.analyze.cli import main
from asff_viz.analyze.flow_statistics import REGIONS, GradientFlowStatistics, summarize_flow
from asff_viz.analyze.fusion_statistics import FusionStatistics, histogram_quantiles
from asff_viz.analyze.results_cache import ImageResult
from asff_viz.analyze.runner import add_image_statistics
from asff_viz.analyze.sources import GroundTruth
from asff_viz.checkpoint import file_sha256, save_checkpoint
from asff_viz.inference.transforms import ImageTransform
from asff_viz.introspection.trace import DetectionRecord, Trace
from asff_viz.models import build_model
from asff_viz.ops.matching import FALSE_POSITIVE, MISSED, TRUE_POSITIVE, match_to_ground_truth
from tests.conftest import calibrate_batchnorm

SIZE = 64
STRIDES = (32, 16, 8)
CLASS_NAMES = ["circle", "square", "triangle"]


# ------------------------------------------------------------------------------------------ hand-built traces


def one_hot_weights(size: int = SIZE) -> list[np.ndarray]:
    """Fusion weights one-hot by construction: left half of every level -> source 0, right half -> source 2."""
    weights = []
    for stride in STRIDES:
        cells = size // stride
        level = np.zeros((3, cells, cells), dtype=np.float32)
        level[0, :, : cells // 2] = 1.0
        level[2, :, cells // 2:] = 1.0
        weights.append(level)
    return weights


def record(box, score, label, level=2) -> DetectionRecord:
    return DetectionRecord(box_xyxy=np.asarray(box, dtype=np.float64), score=score, label=label,
                           class_name=CLASS_NAMES[label], level=level, slot=0, row=0, col=0,
                           weights_here=np.zeros(3, np.float32), weights_other_levels=np.zeros((3, 3), np.float32),
                           cells_other_levels=np.zeros((3, 2), np.int64), row_index=0)


def hand_built_trace(detections, weights=None, original=(SIZE, SIZE)) -> Trace:
    return Trace(image=np.zeros((*original, 3), np.uint8),
                 transform=ImageTransform(original[0], original[1], SIZE),
                 fusion_weights=weights if weights is not None else one_hot_weights(),
                 decoded=np.zeros((0, 8), np.float32), detections=detections, class_names=CLASS_NAMES,
                 metadata={"strides": list(STRIDES)})


def test_box_cell_mask_takes_cell_centres_inside_and_falls_back_to_the_centre_cell():
    mask = box_cell_mask([0, 0, 16, 16], 8, (4, 4))  # centres 4 and 12 lie inside, 20 does not
    assert mask.sum() == 4 and mask[:2, :2].all()
    tiny = box_cell_mask([17, 9, 19, 11], 8, (4, 4))  # no centre inside: the cell holding (18, 10)
    assert tiny.sum() == 1 and tiny[1, 2]
    outside = box_cell_mask([70, 70, 80, 80], 8, (4, 4))  # centre beyond the grid: clamped to the last cell
    assert outside.sum() == 1 and outside[3, 3]


def test_mean_weights_of_one_hot_trace_are_exact():
    weights = one_hot_weights()
    left = mean_weights_in_box(weights, [0, 0, 31, 64], STRIDES)
    np.testing.assert_allclose(left, [[1, 0, 0]] * 3)  # every level: only left-half cell centres inside
    # x in [8, 56]: stride 16 cells 0..3 have centres 8, 24, 40, 56 -> 2 left, 2 right; stride 8 -> 3 and 3
    straddling = mean_weights_in_box(weights, [8, 0, 56, 64], STRIDES)
    np.testing.assert_allclose(straddling[1:], [[0.5, 0, 0.5], [0.5, 0, 0.5]])
    np.testing.assert_allclose(straddling[0], [0.5, 0, 0.5])  # stride 32 centres 16, 48 both inside
    np.testing.assert_allclose(straddling.sum(axis=1), 1.0)


def test_background_weights_are_the_cells_outside_every_box():
    weights = one_hot_weights()
    right_only = background_weights(weights, [[0, 0, 31, 64]], STRIDES)  # the left half is inside the box
    np.testing.assert_allclose(right_only, [[0, 0, 1]] * 3)
    no_boxes = background_weights(weights, np.zeros((0, 4)), STRIDES)
    np.testing.assert_allclose(no_boxes, [[0.5, 0, 0.5]] * 3)
    assert background_weights(weights, [[0, 0, 64, 64]], STRIDES) is None  # no cell left outside


def test_size_bins_follow_coco_boundaries():
    areas = np.array([31.9 ** 2, 32.0 ** 2, 95.9 ** 2, 96.0 ** 2, 15.0 ** 2, 300.0 ** 2])
    np.testing.assert_array_equal(coco_size_bins(areas), [0, 1, 1, 2, 0, 2])
    np.testing.assert_array_equal(size_bins(areas), [1, 2, 4, 5, 0, 8])


def test_histogram_quantiles_within_one_bin():
    histogram = np.zeros(50)
    histogram[[10, 40]] = 5  # half the mass in [0.2, 0.22), half in [0.8, 0.82)
    q05, q25, median, q75, q95 = histogram_quantiles(histogram)
    assert 0.2 <= q25 <= 0.22 and 0.8 <= q75 <= 0.82
    assert median == pytest.approx(0.22)  # the median sits at the upper edge of the lower mass
    assert np.isnan(histogram_quantiles(np.zeros(50))).all()


def test_match_to_ground_truth_greedy_by_score_per_class_with_crowd():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 60, 60]], dtype=np.float64)
    labels = np.array([0, 1, 0])
    crowd = np.array([False, False, True])
    detections = np.array([[0, 0, 10, 10],      # TP for truth 0 (highest score)
                           [0, 0, 10, 9],       # duplicate of truth 0: FP
                           [20, 20, 30, 30],    # right place, wrong class: FP
                           [41, 41, 50, 50],    # inside the crowd box of its class: ignored
                           [20, 20, 30, 30]], dtype=np.float64)  # below the score threshold: ignored
    result = match_to_ground_truth(detections, [0.9, 0.8, 0.7, 0.6, 0.1], [0, 0, 0, 0, 1], truth, labels,
                              truth_crowd=crowd, score_threshold=0.3, iou_threshold=0.5)
    np.testing.assert_array_equal(result.detection_outcome, [TRUE_POSITIVE, FALSE_POSITIVE, FALSE_POSITIVE, -1, -1])
    np.testing.assert_array_equal(result.ground_truth_matched, [True, False, False])
    assert result.matched_detection[0] == 0


def test_statistics_from_a_saved_hand_built_trace(tmp_path):
    """Three boxes with known weights and outcomes: a found one, a missed one and a false positive."""
    found = [2, 2, 28, 28]     # left half (source 0), class 0, matched by the first detection
    missed = [40, 40, 60, 60]  # right half (source 2), class 1, no detection
    trace = hand_built_trace([record([2, 2, 28, 28], 0.9, 0), record([36, 4, 60, 28], 0.8, 2),
                              record([40, 40, 60, 60], 0.2, 1)])  # the last is below the matching threshold
    path = trace.save(tmp_path / "trace.npz")
    result = ImageResult.from_trace(Trace.load(path))
    truth = GroundTruth(np.array([found, missed], dtype=np.float64), np.array([0, 1]),
                        np.array([20.0 ** 2, 40.0 ** 2]), np.zeros(2, dtype=bool))
    statistics = FusionStatistics(CLASS_NAMES)
    counts = add_image_statistics(statistics, result, truth, score_threshold=0.3, iou_threshold=0.5)
    np.testing.assert_array_equal(counts, [1, 1, 1])
    true_positive = statistics.summary(outcomes=[TRUE_POSITIVE])
    assert true_positive.count == 1
    np.testing.assert_allclose(true_positive.mean, [[1, 0, 0]] * 3)
    np.testing.assert_allclose(true_positive.std, 0.0, atol=1e-12)
    assert statistics.summary(outcomes=[MISSED]).mean[:, 2] == pytest.approx([1, 1, 1])
    false_positive = statistics.summary(outcomes=[FALSE_POSITIVE])
    np.testing.assert_allclose(false_positive.mean, [[0, 0, 1]] * 3)  # its box lies in the right half
    # Sizes: the found box (area 400) is small, the missed one (1600) medium; classes as annotated.
    by_size = dict(statistics.by_coco_size())
    assert (by_size["small"].count, by_size["medium"].count, by_size["large"].count) == (1, 1, 0)
    # Background: the cells outside both ground-truth boxes (not the false positive's). Stride 32 and 16: one
    # quarter on each side is left; stride 8: 16 of the 32 left-half cells and 23 of the right half.
    background = dict(statistics.by_coco_size_and_background())["background"]
    assert background.count == 1
    np.testing.assert_allclose(background.mean, [[0.5, 0, 0.5], [0.5, 0, 0.5], [16 / 39, 0, 23 / 39]])
    by_class = dict(statistics.by_class())
    assert (by_class["circle"].count, by_class["square"].count, by_class["triangle"].count) == (1, 1, 0)
    # One-hot weights land in the first and last histogram bins only, and the quantiles are exact.
    histogram = true_positive.histogram
    assert histogram[:, 0, -1].tolist() == [1, 1, 1] and histogram[:, 1, 0].tolist() == [1, 1, 1]
    assert true_positive.quantiles[0, 0, 2] == pytest.approx(1.0, abs=0.02)
    rows = statistics.outcome_counts()
    assert rows[-1] == {"size": "all", "true_positives": 1, "missed": 1, "false_positives": 1, "recall": 0.5,
                        "precision": 0.5}


def test_statistics_use_original_pixels_for_boxes_and_input_pixels_for_cells():
    """A 128 x 64 original resized to 64 x 64: a box in the left half of the original stays in the left half."""
    trace = hand_built_trace([], original=(64, 128))
    truth = GroundTruth(np.array([[4.0, 4.0, 60.0, 60.0]]), np.array([0]), np.array([56.0 * 56.0]),
                        np.zeros(1, dtype=bool))
    statistics = FusionStatistics(CLASS_NAMES)
    add_image_statistics(statistics, ImageResult.from_trace(trace), truth)
    np.testing.assert_allclose(statistics.summary().mean[:, 0], 1.0)


def test_statistics_memory_does_not_grow_with_images():
    statistics = FusionStatistics(CLASS_NAMES)
    rng = np.random.default_rng(0)

    def add(count):
        weights = rng.dirichlet(np.ones(3), size=(count, 3))
        statistics.add(weights, rng.integers(0, 9, count), rng.integers(0, 3, count), rng.integers(0, 3, count))

    add(10)
    before = sum(a.nbytes for a in (statistics.counts, statistics.sums, statistics.squares, statistics.histograms))
    add(5000)
    after = sum(a.nbytes for a in (statistics.counts, statistics.sums, statistics.squares, statistics.histograms))
    assert before == after and statistics.counts.sum() == 5010
    np.testing.assert_allclose(statistics.summary(outcomes=None).mean.sum(axis=1), 1.0)


def test_fusion_statistics_save_load_and_merge(tmp_path):
    statistics = FusionStatistics(CLASS_NAMES)
    statistics.add(np.full((2, 3, 3), 1 / 3), [0, 8], [0, 2], [TRUE_POSITIVE, MISSED])
    statistics.add_background(np.tile([0.2, 0.3, 0.5], (3, 1)))
    statistics.images = 2
    loaded = FusionStatistics.load(statistics.save(tmp_path / "s.npz"))
    loaded.merge(statistics)
    assert loaded.images == 4 and loaded.counts.sum() == 4
    np.testing.assert_allclose(loaded.summary(outcomes=None).mean, 1 / 3)
    assert loaded.background_count == 2 and loaded.background_histogram[0, 2, 25] == 2
    np.testing.assert_allclose(loaded.background().mean, np.tile([0.2, 0.3, 0.5], (3, 1)))


def test_fusion_statistics_from_before_the_background_still_load(tmp_path):
    statistics = FusionStatistics(CLASS_NAMES)
    statistics.add(np.full((1, 3, 3), 1 / 3), [0], [0], [TRUE_POSITIVE])
    path = statistics.save(tmp_path / "old.npz")
    with np.load(path) as data:  # the file as written before background statistics existed
        old = {k: data[k] for k in ("header", "counts", "sums", "squares", "histograms")}
    np.savez_compressed(path, **old)
    loaded = FusionStatistics.load(path)
    assert loaded.counts.sum() == 1 and loaded.background_count == 0
    assert np.isnan(loaded.background().mean).all()


def fake_flow(conflicting_value: bool):
    """A hand-built GradientFlow: source grids 1x1, 2x2, 4x4; known maps, activity, conflicts and positives."""
    shapes = [(1, 1), (2, 2), (4, 4)]
    maps = [[np.full(shape, float(target + 1)) for shape in shapes] for target in range(3)]
    conflict = []
    positives_at_source, background_at_source = [], []
    for shape in shapes:
        active = np.ones(shape, dtype=bool)
        conflicting = np.zeros(shape, dtype=bool)
        conflicting.flat[0] = conflicting_value
        norms = np.ones((3, *shape))
        norms[:, 0, 0] = 3.0  # the first location carries three times the gradient of the others
        conflict.append(SimpleNamespace(active=active, conflicting=conflicting, norms=norms,
                                        cancellation=np.where(conflicting, 0.8, 0.1)))
        positive = np.zeros((3, *shape), dtype=bool)
        positive[2].flat[0] = True  # the first location is a positive of stride 8
        background = np.zeros((3, *shape), dtype=bool)
        background[0].flat[-1] = True  # the last one is object background of stride 32
        positives_at_source.append(positive)
        background_at_source.append(background)
    return SimpleNamespace(maps=maps, conflict=conflict, positives_at_source=positives_at_source,
                           background_at_source=background_at_source, matrix=np.ones((3, 3)),
                           weight_branch_matrix=np.zeros((3, 3)), neck_path_norms=np.zeros(3),
                           total_norms=np.ones(3), fusion_total_norms=np.ones(3), objective_value=2.0)


def test_gradient_flow_statistics_from_hand_built_flows():
    statistics = GradientFlowStatistics(["learned", "uniform"])
    statistics.add("learned", summarize_flow(fake_flow(False)), "a.jpg")
    statistics.add("uniform", summarize_flow(fake_flow(True)), "a.jpg")
    statistics.add("uniform", summarize_flow(fake_flow(False)), "b.jpg")
    rate, cancellation, active, conflicting = statistics.conflict_rates("uniform")
    positive, object_background, background = 0, 1, 2
    # Source 2 (4x4): one positive, one object background, 14 background locations per image.
    assert active[2, positive] == 2 and active[2, object_background] == 2 and active[2, background] == 28
    assert rate[2, positive] == pytest.approx(0.5) and rate[2, background] == 0.0
    assert cancellation[2, positive] == pytest.approx((0.8 + 0.1) / 2)
    weighted = statistics.weighted_cancellation("uniform")
    assert weighted[2, positive] == pytest.approx((0.8 * 9 + 0.1 * 9) / 18)  # both positives weigh 3 x 3
    assert weighted[2, background] == pytest.approx(0.1)
    # Source 0 is one cell that is a positive (of stride 8) and so never counts as object background.
    assert active[0, object_background] == 0 and np.isnan(rate[0, object_background])
    assert REGIONS[5] == "positive of s8" and active[1, 5] == 2
    learned_rate = statistics.conflict_rates("learned")[0]
    assert np.nansum(learned_rate) == 0.0
    # Energy shares: target l sends (l + 1)^2 per location, so the shares are 1/14, 4/14, 9/14 everywhere.
    np.testing.assert_allclose(statistics.energy_shares("learned"), np.array([[1], [4], [9]]) / 14 * np.ones(3))
    lower, upper = statistics.bootstrap_interval("uniform", samples=200, seed=0)
    assert lower[2, positive] <= rate[2, positive] <= upper[2, positive]
    assert statistics.rms_norms("uniform")["total"] == pytest.approx(np.ones(3))


def test_sum_fusion_model_decomposes_with_unit_weights():
    """The gradient decomposition of a sum-fusion model: no weight branch, value paths sum to the fusion total."""
    from asff_viz.introspection.decomposition import decompose_gradients
    from asff_viz.introspection.objectives import SumOfScores

    torch.manual_seed(0)
    model = build_model(width=0.125, depth=0.33, num_classes=3, fusion="sum").eval().double()
    decomposition = decompose_gradients(model, torch.randn(3, SIZE, SIZE, dtype=torch.float64), SumOfScores())
    for source in range(3):
        total = sum(decomposition.value[level][source] for level in range(3))
        assert decomposition.fusion_total[source].abs().max() > 0
        torch.testing.assert_close(total, decomposition.fusion_total[source])
        assert all(decomposition.weight_branch[level][source].abs().max() == 0 for level in range(3))
    assert all(float(w.min()) == 1.0 for w in decomposition.weights)


def test_damaged_cache_entry_is_rebuilt_not_fatal(tmp_path):
    cache = results_cache.AnalysisCache(tmp_path)
    path = cache.path("trace", cache.key(kind="trace", image="x"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")  # what a run killed while writing leaves behind
    assert cache._load(path, Trace.load) is None and not path.exists()
    assert (cache.hits, cache.misses) == (0, 1)
    hand_built_trace([]).save(path)
    assert cache._load(path, Trace.load).class_names == CLASS_NAMES and cache.hits == 1


# ------------------------------------------------------------------------------------- commands end to end


def calibrated_model(fusion: str = "asff", seed: int = 0) -> torch.nn.Module:
    """A tiny model whose BatchNorm statistics match its activations, so weights and scores are not degenerate."""
    from asff_viz.training.params import set_objectness_prior

    torch.manual_seed(seed)
    model = build_model(width=0.125, depth=0.33, num_classes=len(CLASS_NAMES), fusion=fusion)
    calibrate_batchnorm(model, [torch.randn(2, 3, SIZE, SIZE)])
    with torch.no_grad():
        # Untrained guided-anchor and box logits can reach exp() overflow (infinite boxes, NaN loss gradients);
        # small head weights keep the tiny model's boxes finite, as a trained model's are.
        for level in model.head.levels:
            level.guide_wh.weight.mul_(0.01)
            level.predict.weight.mul_(0.1)
    set_objectness_prior(model, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> Path:
    from asff_viz.data.synthetic import generate

    root = tmp_path_factory.mktemp("analyze")
    paths = generate(root / "data", seed=1, train=0, val=3, size=SIZE, max_objects=3)
    # The tiny synthetic set has 8 classes; keep 3 so that the tiny models stay small and every class is used.
    document = json.loads(paths.val_annotations.read_text())
    document["categories"] = [c for c in document["categories"] if c["id"] <= 3]
    for category in document["categories"]:
        category["name"] = CLASS_NAMES[category["id"] - 1]
    for annotation in document["annotations"]:
        annotation["category_id"] = (annotation["category_id"] - 1) % 3 + 1
    (root / "val.json").write_text(json.dumps(document))
    metadata = {"class_names": CLASS_NAMES, "input_size": SIZE}
    save_checkpoint(root / "asff.pt", calibrated_model(), {**metadata, "epoch": 4})
    save_checkpoint(root / "asff_early.pt", calibrated_model(seed=1), {**metadata, "epoch": 1})
    save_checkpoint(root / "sum.pt", calibrated_model("sum", seed=2), metadata)
    run = root / "run"
    run.mkdir()
    (run / "fusion_weights.csv").write_text(
        "epoch,level,stride,size,boxes,weight_source_0,weight_source_1,weight_source_2\n"
        + "".join(f"{e},{l},{32 >> l},{s},10,0.2,0.3,0.5\n" for e in range(2) for l in range(3)
                  for s in ("small", "medium", "large")))
    (run / "gradient_norms.csv").write_text(
        "epoch,layer,grad_norm,steps\n" + "".join(f"{e},{layer},{1.0 + e},5\n" for e in range(2) for layer in (
            "backbone.stem.conv", "neck.lateral.conv", "fusion.levels.0.weight_logits",
            "fusion.levels.2.weight_convs.0.conv", "head.levels.1.predict")))
    (run / "metrics.csv").write_text(
        "epoch,AP,AP50,AP75,APs,APm,APl\n0,0.1,0.2,0.05,0.0,0.1,\n1,0.2,0.3,0.1,0.1,0.2,\n")
    return root


def dataset_args(root: Path) -> list[str]:
    return ["--annotations", str(root / "val.json"), "--images", str(root / "data" / "images" / "val")]


@contextlib.contextmanager
def checkpoints_away(fixture_dir: Path, names, tmp_path: Path):
    """The fixture checkpoints moved out of reach for the block: what runs there cannot load a model."""
    moved = tmp_path / "moved"
    moved.mkdir(exist_ok=True)
    for name in names:
        (fixture_dir / name).rename(moved / name)
    try:
        yield
    finally:
        for name in names:
            (moved / name).rename(fixture_dir / name)


def run_command(*argv) -> object:
    return main([*map(str, argv), "--no-progress", "--png-dpi", "40"])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_figure(out: Path, name: str) -> None:
    assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert read_rows(out / f"{name}.csv"), f"{name}.csv is empty"


def test_figure3_end_to_end(fixture_dir, tmp_path):
    images = sorted((fixture_dir / "data" / "images" / "val").iterdir())[:2]
    out = tmp_path / "figure3"
    run_command("figure3", "--images", *images, "--weights", fixture_dir / "asff.pt", "--out", out)
    for image in images:
        check_figure(out, f"figure3_{image.stem}")
        rows = read_rows(out / f"figure3_{image.stem}.csv")
        assert len(rows) == 3 * sum((SIZE // s) ** 2 for s in STRIDES)  # every cell, every source
        weights = np.array([float(r["weight"]) for r in rows]).reshape(-1, 3)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    check_figure(out, "figure3_overview")
    record = json.loads((out / "run.json").read_text())
    assert record["checkpoints"][0]["sha256"] == file_sha256(fixture_dir / "asff.pt")
    assert record["images"][0]["sha256"] == file_sha256(images[0])
    assert record["preprocessing"]["input_size"] == SIZE and record["seed"] == 0
    assert {"torch", "numpy", "matplotlib", "asff_viz"} <= set(record["versions"])
    from asff_viz.utils.codeversion import code_identity

    assert record["code"] == code_identity() and "git_sha" in record["code"] and "dirty" in record["code"]
    assert record["command_line"].startswith("python -m asff_viz.analyze figure3")
    # Re-plot from the saved traces with no model and no cache: the same numbers.
    before = (out / f"figure3_{images[0].stem}.csv").read_bytes()
    shutil.rmtree(out / "cache")
    (out / "figure3_overview.png").unlink()
    with checkpoints_away(fixture_dir, ("asff.pt",), tmp_path):
        run_command("replot", out)
    assert (out / f"figure3_{images[0].stem}.csv").read_bytes() == before
    check_figure(out, "figure3_overview")


def test_scale_stats_end_to_end_and_replot_from_cache(fixture_dir, tmp_path, monkeypatch):
    out = tmp_path / "scale"
    argv = ["scale-stats", *dataset_args(fixture_dir), "--weights", fixture_dir / "asff.pt", "--out", out]
    first = run_command(*argv)
    for name in ("fusion_composition", "fusion_by_size", "fusion_by_fine_size", "fusion_by_class",
                 "fusion_by_outcome"):
        check_figure(out, name)
    rows = read_rows(out / "fusion_by_size.csv")
    assert len(rows) == 4 * 9  # 3 sizes and the background x 3 targets x 3 sources
    # One background entry per image that keeps a cell outside its boxes at every level (at 64 px the stride-32
    # grid is 2 x 2, so one large box can cover it).
    annotations = json.loads((fixture_dir / "val.json").read_text())["annotations"]
    with_background = 0
    for image_id in {a["image_id"] for a in annotations}:
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations if a["image_id"] == image_id)]
        with_background += all(not np.logical_or.reduce([box_cell_mask(b, s, (SIZE // s,) * 2) for b in boxes]).all()
                               for s in STRIDES)
    assert {int(r["boxes"]) for r in rows if r["size"] == "background"} == {with_background}
    rows = [r for r in rows if r["size"] != "background"]
    boxes = sum(int(r["boxes"]) for r in rows if r["target_level"] == "0" and r["source_level"] == "0")
    assert boxes == len(annotations)  # every ground-truth box is counted once
    assert FusionStatistics.load(out / "scale_stats.npz").images == 3
    contrasts = read_rows(out / "fusion_contrasts.csv")
    assert {r["contrast"] for r in contrasts} >= {"small - background", "large - small"}
    assert all(int(r["images"]) == 3 for r in contrasts)
    assert first.cache.misses == 3 and first.cache.hits == 0
    before = (out / "scale_stats.csv").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("re-plotting ran the model")

    monkeypatch.setattr(results_cache, "trace_image", no_model)
    monkeypatch.setattr(results_cache.batches, "read_batches", no_model)
    second = run_command(*argv)
    assert second.cache.hits == 3 and second.cache.misses == 0
    assert (out / "scale_stats.csv").read_text() == before
    assert json.loads((out / "run.json").read_text())["cache"]["hits"] == 3
    # From the command line with no checkpoint and no cache: `replot` reads scale_stats.npz and run.json.
    shutil.rmtree(out / "cache")
    (out / "scale_stats.csv").unlink()
    run_command("replot", out)
    assert (out / "scale_stats.csv").read_text() == before
    check_figure(out, "fusion_composition")


def test_gradflow_end_to_end_with_sum_checkpoint(fixture_dir, tmp_path):
    out = tmp_path / "gradflow"
    run_command("gradflow", *dataset_args(fixture_dir), "--weights", fixture_dir / "asff.pt", "--sum-weights",
                fixture_dir / "sum.pt", "--bootstrap", "50", "--sweep", "--out", out)
    sweep = read_rows(out / "gradflow_threshold_sweep.csv")
    assert {(float(r["significance"]), float(r["cosine_threshold"])) for r in sweep} == {
        (s, c) for s in (0.0, 0.05, 0.1, 0.25) for c in (-0.25, 0.0, 0.25)}
    assert {r["control"] for r in sweep} == {"shuffled", "rolled", "uniform"}
    at_default = [r for r in sweep if float(r["significance"]) == 0.1 and float(r["cosine_threshold"]) == 0.0]
    controls_rows = {(r["control"], r["source_level"], r["region"]): r["difference"]
                     for r in read_rows(out / "gradflow_conflict_controls.csv")}
    for row in at_default:  # the sweep at the default thresholds is the controls table itself
        assert row["difference"] == controls_rows[(row["control"], row["source_level"], row["region"])]
    for name in ("gradflow_conflict", "gradflow_shares", "gradflow_paths"):
        check_figure(out, name)
    shares = read_rows(out / "gradflow_shares.csv")
    assert {r["mode"] for r in shares} == {"learned", "uniform", "sum checkpoint"}
    for mode in ("learned", "uniform"):
        for source in "012":
            column = [float(r["energy_share"]) for r in shares if r["mode"] == mode and r["source_level"] == source]
            assert sum(column) == pytest.approx(1.0)
    conflict = read_rows(out / "gradflow_conflict.csv")
    rates = [float(r["conflict_rate"]) for r in conflict if r["conflict_rate"]]
    assert rates and all(0.0 <= rate <= 1.0 for rate in rates)
    assert len(read_rows(out / "gradflow_per_image.csv")) == 3 * 3  # images x modes
    record = json.loads((out / "run.json").read_text())
    assert [c["fusion"] for c in record["checkpoints"]] == ["asff", "sum"]
    # The controls of the conflict metric: learned minus each, paired over the same images.
    check_figure(out, "gradflow_conflict_controls")
    controls = read_rows(out / "gradflow_conflict_controls.csv")
    assert {r["control"] for r in controls} == {"shuffled", "rolled", "uniform", "random", "with_weight_branch"}
    for row in controls:
        if row["difference"]:
            low, value, high = float(row["ci95_low"]), float(row["difference"]), float(row["ci95_high"])
            assert low <= value + 1e-12 and value <= high + 1e-12 and -1 <= value <= 1
    assert record["conflict"]["controls"]["reference"] == "learned"
    # Learned minus the other modes, paired over images: the difference of the two pooled rates of the table.
    check_figure(out, "gradflow_conflict_paired")
    paired = read_rows(out / "gradflow_conflict_paired.csv")
    assert {r["other"] for r in paired} == {"uniform", "sum checkpoint"}
    rate = {(r["mode"], r["source_level"], r["region"]): r["conflict_rate"] for r in conflict}
    for row in paired:
        first, second = rate[("learned", row["source_level"], row["region"])], rate[(row["other"], row["source_level"],
                                                                                      row["region"])]
        if first and second:
            assert float(row["difference"]) == pytest.approx(float(first) - float(second), abs=2e-6)
            assert float(row["ci95_low"]) <= float(row["difference"]) + 1e-12 <= float(row["ci95_high"]) + 2e-12
        else:
            assert row["difference"] == ""

    # Re-plot with no model: the checkpoints are gone, the figures come back equal.
    before = {name: (out / name).read_bytes() for name in ("gradflow_conflict.csv", "gradflow_conflict_controls.csv",
                                                            "gradflow_conflict_paired.csv")}
    for name in before:
        (out / name).unlink()
    (out / "gradflow_conflict.png").unlink()
    with checkpoints_away(fixture_dir, ("asff.pt", "sum.pt"), tmp_path):
        run_command("replot", out)
    assert {name: (out / name).read_bytes() for name in before} == before
    check_figure(out, "gradflow_conflict")
    assert len(json.loads((out / "run.json").read_text())["replots"]) == 1


def test_evolution_end_to_end(fixture_dir, tmp_path):
    out = tmp_path / "evolution"
    run_command("evolution", "--checkpoints", fixture_dir / "asff.pt", fixture_dir / "asff_early.pt",
                *dataset_args(fixture_dir), "--run", fixture_dir / "run", "--out", out)
    for name in ("evolution_fusion", "evolution_training_fusion", "evolution_gradient_norms", "evolution_metrics"):
        check_figure(out, name)
    epochs = sorted({float(r["epoch"]) for r in read_rows(out / "evolution_fusion.csv")})
    assert epochs == [1.0, 4.0]  # from the checkpoints' metadata, in training order
    norms = {(r["group"], r["epoch"]): float(r["grad_norm"]) for r in read_rows(out / "evolution_gradient_norms.csv")}
    assert norms[("backbone", "1")] == pytest.approx(2.0)
    assert norms[("fusion", "0")] == pytest.approx(np.sqrt(2.0), rel=1e-5)  # two fusion layers of norm 1
    # `evolution --replot DIR`: the checkpoints moved away, the same numbers drawn again.
    before = (out / "evolution_fusion.csv").read_bytes()
    (out / "evolution_fusion.csv").unlink()
    shutil.rmtree(out / "cache")
    with checkpoints_away(fixture_dir, ("asff.pt", "asff_early.pt"), tmp_path):
        main(["evolution", "--replot", str(out)])
    assert (out / "evolution_fusion.csv").read_bytes() == before
    check_figure(out, "evolution_metrics")


def test_compare_warns_when_two_variants_are_the_same_weights(fixture_dir, tmp_path, caplog):
    # A copy of one checkpoint under another name: every difference is zero by construction, not a finding.
    copy = tmp_path / "renamed.pt"
    copy.write_bytes((fixture_dir / "asff.pt").read_bytes())
    with caplog.at_level(logging.WARNING):
        run_command("compare", "--weights", fixture_dir / "asff.pt", copy, *dataset_args(fixture_dir), "--show", "1",
                    "--out", tmp_path / "same")
    assert "are the same weights" in caplog.text and "renamed.pt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_command("compare", "--weights", fixture_dir / "asff.pt", "--counterfactual", "uniform",
                    *dataset_args(fixture_dir), "--show", "1", "--out", tmp_path / "other")
    assert "same weights" not in caplog.text


def test_compare_end_to_end(fixture_dir, tmp_path):
    out = tmp_path / "compare"
    run_command("compare", "--weights", fixture_dir / "asff.pt", fixture_dir / "sum.pt", "--counterfactual",
                "uniform", *dataset_args(fixture_dir), "--show", "2", "--out", out)
    for name in ("compare_ap", "compare_recall", "compare_fusion"):
        check_figure(out, name)
    assert (out / "compare_detections.pdf").is_file()
    ap = read_rows(out / "compare_ap.csv")
    assert [r["variant"] for r in ap] == ["asff", "sum", "asff (uniform)"]
    fusion = read_rows(out / "compare_fusion.csv")
    assert {r["variant"] for r in fusion} == {"asff", "asff (uniform)"}  # the sum model has no weights
    uniform = [float(r["mean"]) for r in fusion if r["variant"] == "asff (uniform)" and r["boxes"] != "0"]
    np.testing.assert_allclose(uniform, 1 / 3, atol=1e-6)
    paired = read_rows(out / "compare_ap_paired.csv")
    assert [(r["minus"], r["metric"]) for r in paired] == [("sum", "AP"), ("sum", "AP50"), ("asff (uniform)", "AP"),
                                                           ("asff (uniform)", "AP50")]
    by_variant = {r["variant"]: r for r in ap}
    # `compare --replot DIR` with the checkpoints moved away: the same tables and figures.
    before = {name: (out / name).read_bytes() for name in ("compare_ap.csv", "compare_outcomes.csv",
                                                           "compare_ap_paired.csv", "compare_fusion.csv",
                                                           "compare_detections.csv")}
    for name in before:
        (out / name).unlink()
    shutil.rmtree(out / "cache")
    with checkpoints_away(fixture_dir, ("asff.pt", "sum.pt"), tmp_path):
        main(["compare", "--replot", str(out)])
    assert {name: (out / name).read_bytes() for name in before} == before
    for row in paired:  # the point estimate is the difference of the variants' own AP
        expected = float(by_variant["asff"][row["metric"]]) - float(by_variant[row["minus"]][row["metric"]])
        assert float(row["difference"]) == pytest.approx(expected, abs=2e-6)  # the CSVs keep 6 digits
        low, value, high = float(row["ci95_low"]), float(row["difference"]), float(row["ci95_high"])
        assert low <= value + 1e-6 and value <= high + 1e-6


def test_missing_default_model_and_bad_input_give_clear_errors(fixture_dir, tmp_path, monkeypatch, capsys):
    from asff_viz.analyze import sources

    monkeypatch.setattr(sources, "default_checkpoint_path", lambda: tmp_path / "absent.pt")
    image = next((fixture_dir / "data" / "images" / "val").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        run_command("figure3", "--images", image, "--out", tmp_path / "x")
    assert exit_info.value.code == 2
    assert "--weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_command("scale-stats", "--annotations", tmp_path / "none.json", "--images", tmp_path,
                    "--weights", fixture_dir / "asff.pt", "--out", tmp_path / "y")
    assert "none.json" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["figure3", "scale-stats", "gradflow", "evolution", "compare"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scale_stats_on_gpu_matches_cpu(fixture_dir, tmp_path):
    common = ["scale-stats", *dataset_args(fixture_dir), "--weights", fixture_dir / "asff.pt", "--no-cache"]
    run_command(*common, "--device", "cpu", "--out", tmp_path / "cpu")
    run_command(*common, "--device", "cuda", "--out", tmp_path / "cuda")
    cpu = read_rows(tmp_path / "cpu" / "fusion_by_size.csv")
    cuda = read_rows(tmp_path / "cuda" / "fusion_by_size.csv")
    for a, b in zip(cpu, cuda, strict=True):
        assert a["boxes"] == b["boxes"]
        if a["mean"]:
            assert float(a["mean"]) == pytest.approx(float(b["mean"]), abs=1e-3)


def test_cache_entries_are_keyed_on_the_statistic_version_and_the_code(monkeypatch, tmp_path):
    from asff_viz.analyze import results_cache
    from asff_viz.utils.codeversion import code_identity

    identity = code_identity()
    assert set(identity) == {"package", "source_sha256", "git_sha", "dirty", "diff_sha256"}
    if identity["git_sha"] is not None:  # in a checkout: a commit, and the tree's state
        assert len(identity["git_sha"]) == 40 and isinstance(identity["dirty"], bool)
    key = results_cache.AnalysisCache.key(kind="gradflow", image="x")
    assert results_cache.AnalysisCache.key(kind="gradflow", image="x") == key
    monkeypatch.setitem(results_cache.STATISTIC_VERSIONS, "gradflow", results_cache.STATISTIC_VERSIONS["gradflow"] + 1)
    assert results_cache.AnalysisCache.key(kind="gradflow", image="x") != key, "a new statistic version reused a key"
    monkeypatch.setattr(results_cache, "source_sha256", lambda: "0" * 64)  # other code
    assert results_cache.AnalysisCache.key(kind="gradflow", image="x") != key


def test_the_code_identity_covers_every_source_of_the_package():
    # It once hashed asff_viz/utils/ only: a change to an analysis left its cached numbers in use.
    from pathlib import Path

    import asff_viz
    from asff_viz.utils import codeversion

    package = Path(asff_viz.__file__).resolve().parent
    hashed = {path.relative_to(package).as_posix() for path in codeversion.source_files()}
    assert hashed == {path.relative_to(package).as_posix() for path in package.rglob("*.py")}
    assert {"analyze/gradflow.py", "introspection/decomposition.py", "models/fusion.py"} <= hashed


def test_scale_stats_contrasts_are_paired_over_images(tmp_path):
    statistics = FusionStatistics(["a"])
    rng = np.random.default_rng(0)
    small_bin = int(size_bins([10.0 ** 2])[0])
    large_bin = int(size_bins([200.0 ** 2])[0])
    shift = np.zeros((3, 3))
    shift[2, 2] = 0.05
    for _ in range(6):  # each image: its small boxes are its background + 0.05 at (stride 8, stride 8)
        background = rng.dirichlet([1, 1, 1], size=3)
        statistics.add_image(np.stack([background + shift] * 2), [small_bin, small_bin], background)
    estimate, low, high, images = statistics.contrast("small", "background", samples=300)
    assert images == 6
    np.testing.assert_allclose(estimate, shift, atol=1e-12)
    np.testing.assert_allclose(low, shift, atol=1e-12)  # the same difference in every image: no spread
    np.testing.assert_allclose(high, shift, atol=1e-12)
    # A group missing everywhere gives NaN, not a number.
    assert np.isnan(statistics.contrast("large", "background", samples=50)[0]).all()
    # Two images whose large boxes differ from their small ones by 0.1 and 0.3 (one box each): the estimate
    # pools both (0.2) and the resamples (2, 0), (1, 1), (0, 2) give the interval [0.1, 0.3].
    pair = FusionStatistics(["a"])
    for gap in (0.1, 0.3):
        small = np.full((3, 3), 0.2)
        pair.add_image(np.stack([small, small + gap]), [small_bin, large_bin], None)
    estimate, low, high, _ = pair.contrast("large", "small", samples=4000, seed=2)
    assert estimate[0, 0] == pytest.approx(0.2) and low[0, 0] == pytest.approx(0.1) and high[0, 0] == pytest.approx(0.3)
    path = pair.save(tmp_path / "stats.npz")
    loaded = FusionStatistics.load(path)
    np.testing.assert_array_equal(loaded.image_sums, pair.image_sums)
    np.testing.assert_array_equal(loaded.image_counts, pair.image_counts)
    merged = FusionStatistics(["a"])
    merged.merge(pair)
    merged.merge(statistics)
    assert len(merged.image_counts) == 8


def test_scale_stats_size_bins_in_input_pixels(fixture_dir, tmp_path):
    original, enlarged = tmp_path / "original", tmp_path / "input"
    for out, basis in ((original, "original"), (enlarged, "input")):
        run_command("scale-stats", *dataset_args(fixture_dir), "--weights", fixture_dir / "asff.pt", "--size",
                    "256", "--size-basis", basis, "--out", out)
        assert json.loads((out / "run.json").read_text())["size_bins"]["basis"] == basis

    def boxes_by_size(out):
        rows = read_rows(out / "fusion_by_size.csv")
        return {r["size"]: int(r["boxes"]) for r in rows if r["target_level"] == "0" and r["source_level"] == "0"}

    first, second = boxes_by_size(original), boxes_by_size(enlarged)
    counted = ("small", "medium", "large")
    assert sum(first[s] for s in counted) == sum(second[s] for s in counted)  # the same boxes, other bins
    # The images are smaller than the 256-px input: in input pixels the boxes are larger.
    assert second["small"] <= first["small"] and second != first


def test_docs_figure_data_check_catches_a_changed_number(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "docs" / "check_figure_data.py"
    analysis, figures = tmp_path / "analysis", tmp_path / "figures"
    for command, name in (("scale-stats", "fusion_contrasts.csv"), ("gradflow", "gradflow_conflict_controls.csv"),
                          ("gradflow", "gradflow_conflict_paired.csv"), ("compare", "compare_ap_paired.csv")):
        (analysis / command).mkdir(parents=True, exist_ok=True)
        figures.mkdir(exist_ok=True)
        for folder in (analysis / command, figures):
            (folder / name).write_text("contrast,difference,images\nsmall - background,-0.004,500\n")

    def check():
        return subprocess.run([sys.executable, str(script), str(analysis), str(figures)], capture_output=True,
                              text=True)

    assert check().returncode == 0
    (analysis / "gradflow" / "gradflow_conflict_controls.csv").write_text(
        "contrast,difference,images\nsmall - background,-0.0041,500\n")
    result = check()
    assert result.returncode == 1 and "committed -0.004, regenerated -0.0041" in result.stderr


def test_docs_figure_data_check_covers_every_committed_csv(tmp_path):
    # It checked four tables of the 22: the data drawn in a figure (fusion_by_size.csv, the renamed
    # figure3_example.csv, the threshold sweep) could change without the check noticing.
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "docs" / "check_figure_data.py"
    analysis, figures = tmp_path / "analysis", tmp_path / "figures"
    figures.mkdir()
    table = "level,weight\n8,0.25\n"
    for committed, fresh in (("fusion_by_size.csv", "scale-stats/fusion_by_size.csv"),
                             ("figure3_example.csv", "figure3/figure3_000002.csv"),
                             ("gradflow_threshold_sweep.csv", "gradflow_sweep/gradflow_threshold_sweep.csv"),
                             ("evolution_metrics.csv", "evolution/evolution_metrics.csv")):
        (figures / committed).write_text(table)
        (analysis / fresh).parent.mkdir(parents=True, exist_ok=True)
        (analysis / fresh).write_text(table)

    def check():
        return subprocess.run([sys.executable, str(script), str(analysis), str(figures)], capture_output=True,
                              text=True)

    result = check()
    assert result.returncode == 0 and "4 tables regenerated identically" in result.stdout
    for fresh in ("scale-stats/fusion_by_size.csv", "figure3/figure3_000002.csv",
                  "gradflow_sweep/gradflow_threshold_sweep.csv"):
        (analysis / fresh).write_text("level,weight\n8,0.26\n")
        result = check()
        assert result.returncode == 1 and "committed 0.25, regenerated 0.26" in result.stderr, fresh
        (analysis / fresh).write_text(table)
    (analysis / "evolution" / "evolution_metrics.csv").unlink()
    result = check()
    assert result.returncode == 1 and "evolution_metrics.csv: not regenerated" in result.stderr
    (analysis / "evolution" / "evolution_metrics.csv").write_text(table)
    (figures / "unknown_table.csv").write_text(table)
    result = check()
    assert result.returncode == 1 and "unknown_table.csv: no command is known to make it" in result.stderr


def test_docs_figure_data_check_reads_a_run_without_a_dataset(tmp_path):
    # figure3 runs on images named one by one and records "dataset": null; a difference in its table made the check
    # stop with a traceback instead of listing what differs.
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "docs" / "check_figure_data.py"
    analysis, figures = tmp_path / "analysis", tmp_path / "figures"
    (analysis / "figure3").mkdir(parents=True)
    figures.mkdir()
    (figures / "figure3_example.csv").write_text("level,weight\n8,0.25\n")
    (analysis / "figure3" / "figure3_000002.csv").write_text("level,weight\n8,0.26\n")
    run = {"dataset": None, "images": [{"file": "000002.jpg", "sha256": "1" * 64}], "checkpoints": None}
    (figures / "figure3_run.json").write_text(json.dumps(run))
    run["images"][0]["sha256"] = "2" * 64
    (analysis / "figure3" / "run.json").write_text(json.dumps(run))
    result = subprocess.run([sys.executable, str(script), str(analysis), str(figures)], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "committed 0.25, regenerated 0.26" in result.stderr
    assert "1 of 1 images have other bytes (first 000002.jpg)" in result.stderr


def test_docs_figure_data_check_says_when_the_inputs_differ(tmp_path):
    # A regeneration on data drawn by another OpenCV differs without any code change: the check says so.
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "docs" / "check_figure_data.py"
    analysis, figures = tmp_path / "analysis", tmp_path / "figures"
    figures.mkdir()
    for command, name in (("scale-stats", "fusion_contrasts.csv"), ("gradflow", "gradflow_conflict_controls.csv"),
                          ("gradflow", "gradflow_conflict_paired.csv"), ("compare", "compare_ap_paired.csv")):
        (analysis / command).mkdir(parents=True, exist_ok=True)
        (figures / name).write_text("contrast,difference\nsmall - background,-0.004\n")
        (analysis / command / name).write_text("contrast,difference\nsmall - background,-0.005\n")
    run = {"dataset": {"annotations_sha256": "a" * 64}, "checkpoints": [{"label": "m", "sha256": "c" * 64}],
           "images": [{"file": "000000.jpg", "sha256": "1" * 64}, {"file": "000001.jpg", "sha256": "2" * 64}]}
    for command in ("scale-stats", "gradflow", "compare"):
        (figures / f"{command.replace('-', '_')}_run.json").write_text(json.dumps(run))
        (analysis / command / "run.json").write_text(json.dumps(run))

    def check():
        return subprocess.run([sys.executable, str(script), str(analysis), str(figures)], capture_output=True,
                              text=True)

    same_inputs = check()
    assert same_inputs.returncode == 1 and "did not run on the committed inputs" not in same_inputs.stderr
    run["images"][1]["sha256"] = "3" * 64
    run["dataset"]["annotations_sha256"] = "b" * 64
    (analysis / "gradflow" / "run.json").write_text(json.dumps(run))
    result = check()
    assert result.returncode == 1
    assert "gradflow did not run on the committed inputs" in result.stderr
    assert "1 of 2 images have other bytes (first 000001.jpg)" in result.stderr
    assert "the annotation file differs" in result.stderr and "scale-stats did not run" not in result.stderr


def test_the_loss_objective_of_the_analyses_uses_trainings_boxes():
    # gradflow's "training loss" and its positives: with the continuous [x, y, x+w, y+h] boxes, 11 % of the
    # validation boxes took another positive cell or level than training gives them.
    from asff_viz.analyze.sources import AnalysisDataset
    from asff_viz.data.coco import COCODetection
    from asff_viz.samples import ANNOTATIONS_FILE, SAMPLES_DIR

    analysis = AnalysisDataset(ANNOTATIONS_FILE, SAMPLES_DIR)
    training = COCODetection(ANNOTATIONS_FILE, SAMPLES_DIR)
    for index, image in enumerate(analysis):
        assert training.info(index)["file_name"] == image.file_name
        targets = training.targets(index)
        truth = image.ground_truth
        np.testing.assert_allclose(truth.training_boxes, targets[:, 1:], atol=1e-4)
        np.testing.assert_array_equal(truth.labels, targets[:, 0].astype(np.int64))
        np.testing.assert_allclose(truth.boxes[:, 2:] - truth.training_boxes[:, 2:], 1.0, atol=1e-4)  # 1 px wider
