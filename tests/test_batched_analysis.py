"""Dataset passes in batches: every image's result is the one it gets alone (traces, detections, gradient flows),
cached and computed entries come back in order, and a bad image in a batch is named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asff_viz.analyze import batches, results_cache
from asff_viz.analyze.results_cache import AnalysisCache
from asff_viz.analyze.sources import AnalysedModel, AnalysisDataset, AnalysisError
from asff_viz.checkpoint import load_model
from asff_viz.inference.transforms import preprocess
from asff_viz.introspection.capture import as_counterfactual
from asff_viz.introspection.controls import random_direction_gram
from asff_viz.introspection.decomposition import (
    TermProducts,
    conflict_statistics,
    conflict_statistics_from_gram,
    gradient_flow,
    gradient_flows,
)
from asff_viz.introspection.objectives import TrainingLoss
from asff_viz.introspection.trace import trace_batch, trace_image
from tests.test_analyze import SIZE as SIZE_ANALYZE
from tests.test_analyze import calibrated_model, fixture_dir  # noqa: F401  (fixture_dir is a fixture)
from tests.test_capture import SIZE, tiny_model

LABELS = [np.array([[0, 20.0, 24.0, 16.0, 30.0]], dtype=np.float32),
          np.array([[1, 40.0, 30.0, 40.0, 28.0], [2, 10.0, 50.0, 8.0, 8.0]], dtype=np.float32)]


def random_images(count: int, seed: int = 3) -> list[np.ndarray]:
    """RGB uint8 images of different sizes (so each has its own transform)."""
    generator = np.random.default_rng(seed)
    return [generator.integers(0, 256, (SIZE + 16 * i, SIZE + 8 * i, 3), dtype=np.uint8) for i in range(count)]


def analysed(model, name: str = "tiny") -> AnalysedModel:
    return AnalysedModel(model, name, "0" * 64, name)


# ------------------------------------------------------------------------------------------------- traces


def test_each_trace_of_a_batch_is_the_images_own():
    model = tiny_model()
    images = random_images(3)
    singles = [trace_image(model, image, size=SIZE, conf_threshold=0.0) for image in images]
    prepared = [preprocess(image, SIZE) for image in images]
    traced = trace_batch(model, torch.stack([tensor for tensor, _ in prepared]), [t for _, t in prepared],
                         image_shapes=[image.shape for image in images], image_names=["a", "b", "c"],
                         conf_threshold=0.0, light=False)
    # float32 round-off only: a batch runs other conv kernels, summing in another order (1e-5 here).
    for single, batched in zip(singles, traced, strict=True):
        for level in range(3):
            np.testing.assert_allclose(batched.fusion_weights[level], single.fusion_weights[level], atol=2e-4)
        np.testing.assert_allclose(batched.decoded, single.decoded, rtol=1e-3, atol=1e-3)
        assert len(batched.detections) > 0
        np.testing.assert_allclose([d.box_xyxy for d in batched.detections[:5]],
                                   [d.box_xyxy for d in single.detections[:5]], rtol=1e-3, atol=1e-2)
        assert batched.metadata["image_shape"] == single.metadata["image_shape"]
    # The batch mixes images that differ: their weights differ, so a copy of one image's result cannot pass.
    assert not np.allclose(traced[0].fusion_weights[2], traced[1].fusion_weights[2], atol=1e-3)


def test_fast_path_of_an_analysed_model_traces_as_the_model_as_built():
    model = analysed(tiny_model())
    fast = model.fast(grad=False)
    assert fast is model.fast(grad=False) and fast is not model.model  # made once, a copy
    assert fast.inference_settings["folded_batchnorms"] > 0
    prepared = [preprocess(image, SIZE) for image in random_images(2)]
    batch = torch.stack([tensor for tensor, _ in prepared])
    common = {"image_shapes": [(SIZE, SIZE, 3)] * 2, "image_names": ["a", "b"], "conf_threshold": 0.0}
    reference = trace_batch(model.model, batch, [t for _, t in prepared], **common)
    optimized = trace_batch(fast, batch, [t for _, t in prepared], **common)
    for expected, actual in zip(reference, optimized, strict=True):
        for level in range(3):
            np.testing.assert_allclose(actual.fusion_weights[level], expected.fusion_weights[level], atol=2e-4)
        assert actual.decoded.shape[0] == 0  # light: no decoded rows kept
        np.testing.assert_allclose([d.box_xyxy for d in actual.detections[:5]],
                                   [d.box_xyxy for d in expected.detections[:5]], rtol=1e-3, atol=1e-2)


def test_a_fast_model_traces_a_large_batch_in_its_chunks_and_each_image_keeps_its_trace():
    from asff_viz.inference.fast import optimize_for_inference

    model = tiny_model()
    whole = optimize_for_inference(model, cpu_chunk_pixels=0)
    chunked = optimize_for_inference(model, cpu_chunk_pixels=2 * SIZE * SIZE)
    prepared = [preprocess(image, SIZE) for image in random_images(5)]
    batch = torch.stack([tensor for tensor, _ in prepared])
    common = {"image_shapes": [(SIZE, SIZE, 3)] * 5, "image_names": list("abcde"), "conf_threshold": 0.0}
    sizes = []
    handle = chunked.fusion.levels[0].softmax.register_forward_hook(lambda _m, inputs, _o: sizes.append(
        inputs[0].shape[0]))
    try:
        traced = trace_batch(chunked, batch, [t for _, t in prepared], **common)
    finally:
        handle.remove()
    assert sizes == [2, 2, 1]  # captured chunk by chunk, as the unhooked forward would run
    expected = trace_batch(whole, batch, [t for _, t in prepared], **common)
    assert [t.metadata["image_name"] for t in traced] == list("abcde")
    for actual, reference in zip(traced, expected, strict=True):
        for level in range(3):
            np.testing.assert_allclose(actual.fusion_weights[level], reference.fusion_weights[level], atol=2e-4)
        np.testing.assert_allclose([d.box_xyxy for d in actual.detections[:5]],
                                   [d.box_xyxy for d in reference.detections[:5]], rtol=1e-3, atol=1e-2)


# ---------------------------------------------------------------------------------------- gradient flow


def test_gradient_flows_of_a_batch_are_each_images_own():
    model = tiny_model().double()
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    objectives = [TrainingLoss(labels) for labels in LABELS]
    seeds = [(3, 11), (3, 12)]
    batched = gradient_flows(model, images, objectives, controls=True, control_seeds=seeds, sweep=((0.05, 0.0),))
    for index, flow in enumerate(batched):
        single = gradient_flow(model, images[index], objectives[index], controls=True, control_seed=seeds[index],
                               sweep=((0.05, 0.0),))
        assert flow.objective_value == pytest.approx(single.objective_value, rel=1e-9)
        np.testing.assert_allclose(flow.matrix, single.matrix, rtol=1e-9)
        np.testing.assert_allclose(flow.weight_branch_matrix, single.weight_branch_matrix, rtol=1e-9)
        np.testing.assert_allclose(flow.total_norms, single.total_norms, rtol=1e-9)
        np.testing.assert_array_equal(flow.conflict_rate, single.conflict_rate)
        np.testing.assert_array_equal(flow.conflict_rate_at_objects, single.conflict_rate_at_objects)
        for name, control in single.controls.items():
            np.testing.assert_array_equal(flow.controls[name].conflict_rate, control.conflict_rate)
        assert flow.sweep.keys() == single.sweep.keys()
    # Two images with different ground truth: different objectives, different flows.
    assert batched[0].objective_value != pytest.approx(batched[1].objective_value)
    assert not np.allclose(batched[0].matrix, batched[1].matrix)


def test_the_gradient_pass_differentiates_features_only(fixture_dir, monkeypatch):  # noqa: F811
    # Its copy's parameters are frozen, so the deformable convs' offsets need no gradient and their sampling
    # takes the cheaper backward; the model as built keeps its parameters trainable.
    from asff_viz.models import deform_conv

    dataset = AnalysisDataset(fixture_dir / "val.json", fixture_dir / "data" / "images" / "val")
    model = analysed(load_model(fixture_dir / "asff.pt"), "asff")
    trainable = [p.requires_grad for p in model.model.parameters()]
    calls = []
    apply = deform_conv._SampleColumns.apply
    monkeypatch.setattr(deform_conv._SampleColumns, "apply", lambda *a: calls.append(1) or apply(*a))
    image = next(iter(dataset))
    flows = list(batches.flows(model, [image.path], [(image.ground_truth.boxes, image.ground_truth.labels)],
                               size=SIZE, counterfactual=as_counterfactual(None), significance=0.1,
                               active_fraction=1e-3, cosine_threshold=0.0, controls=False, control_seeds=None,
                               sweep=()))
    assert len(flows) == 1 and np.isfinite(flows[0].matrix).all() and flows[0].matrix.sum() > 0
    assert calls, "the deformable sampling took embedding_bag's backward"
    assert not any(p.requires_grad for p in model.fast(grad=True).parameters())
    assert [p.requires_grad for p in model.model.parameters()] == trainable and any(trainable)


def test_each_image_draws_its_own_controls():
    # Controls once drew the same shuffle and random directions for every image: one draw for the whole dataset,
    # whose randomness the paired bootstrap over images cannot see (two such draws differed by 0.012 in a rate
    # whose 95 % interval was +-0.004). The same image twice in a batch: its own seed, its own draws.
    model = tiny_model().double()
    image = torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    images, objectives = torch.stack([image, image]), [TrainingLoss(LABELS[1])] * 2
    same = gradient_flows(model, images, objectives, controls=True, control_seeds=[(0, 5), (0, 5)])
    other = gradient_flows(model, images, objectives, controls=True, control_seeds=[(0, 5), (0, 6)])
    for name in ("shuffled", "random"):
        for source in range(3):
            np.testing.assert_array_equal(same[0].controls[name].conflict[source].conflicting,
                                          same[1].controls[name].conflict[source].conflicting)
        assert any(not np.array_equal(other[0].controls[name].conflict[source].conflicting,
                                      other[1].controls[name].conflict[source].conflicting) for source in range(3))
    with pytest.raises(ValueError, match="one control seed per image"):
        gradient_flows(model, images, objectives, controls=True, control_seeds=[(0, 5)])


def test_a_datasets_control_seeds_follow_the_image_not_its_place(fixture_dir, monkeypatch):  # noqa: F811
    dataset = AnalysisDataset(fixture_dir / "val.json", fixture_dir / "data" / "images" / "val")
    model = analysed(load_model(fixture_dir / "asff.pt"), "asff")
    items = [(image.path, image.ground_truth.boxes, image.ground_truth.labels) for image in dataset]
    seen = {}
    flows = batches.flows

    def recording(model, paths, truths, **options):
        for path, seed in zip(paths, options["control_seeds"], strict=True):
            seen.setdefault(path, set()).add(seed)
        return flows(model, paths, truths, **options)

    monkeypatch.setattr(batches, "flows", recording)
    for order in (items, items[::-1]):
        list(AnalysisCache(None).gradient_summaries(model, order, size=SIZE, controls=True, control_seed=4,
                                                    batch_size=2))
    assert all(len(seeds) == 1 for seeds in seen.values()), "an image's draws depended on its batch or order"
    firsts = [next(iter(seeds)) for seeds in seen.values()]
    assert len(set(firsts)) == len(items) >= 3 and all(seed[0] == 4 for seed in firsts)


def reference_conflict(terms: torch.Tensor, significance: float = 0.1, active_fraction: float = 1e-3):
    """The conflict definition written out location by location (slow): cosines of unit vectors."""
    terms = terms.double()
    count, _, height, width = terms.shape
    norms = terms.norm(dim=1)
    norm_sum = norms.sum(0)
    active = norm_sum > active_fraction * norm_sum.max()
    cosine = np.full((count, count, height, width), math.nan)
    conflicting = np.zeros((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            largest = norms[:, y, x].max()
            for a in range(count):
                for b in range(count):
                    if norms[a, y, x] > 0 and norms[b, y, x] > 0:
                        cosine[a, b, y, x] = float(terms[a, :, y, x] @ terms[b, :, y, x]
                                                   / (norms[a, y, x] * norms[b, y, x]))
                        significant = (norms[a, y, x] >= significance * largest
                                       and norms[b, y, x] >= significance * largest)
                        if a != b and significant and cosine[a, b, y, x] < 0 and active[y, x]:
                            conflicting[y, x] = True
    return norms.numpy(), cosine, active.numpy(), conflicting


def test_conflict_statistics_follow_the_definition():
    generator = torch.Generator().manual_seed(11)
    terms = torch.randn(3, 5, 4, 6, generator=generator, dtype=torch.float64)
    terms[1, :, 0] = 0  # a target that sends nothing to a row of locations
    terms[2, :, :, 0] = 0.01 * terms[2, :, :, 0]  # one too small to count there
    norms, cosine, active, conflicting = reference_conflict(terms)
    statistics = conflict_statistics(terms)
    np.testing.assert_allclose(statistics.norms, norms, rtol=1e-6)
    np.testing.assert_allclose(statistics.cosine, cosine, atol=1e-6)
    np.testing.assert_array_equal(statistics.active, active)
    np.testing.assert_array_equal(statistics.conflicting, conflicting)
    assert 0 < statistics.conflicting.sum() < statistics.active.sum()
    # Sign agreement: the fraction of channels, among those where both are non-zero, whose signs agree.
    signs = torch.sign(terms)
    both = (signs[0] != 0) & (signs[1] != 0)
    agree = ((signs[0] == signs[1]) & both).sum(0).double() / both.sum(0).clamp(min=1)
    np.testing.assert_allclose(statistics.sign_agreement[0, 1][1:], agree[1:].numpy(), atol=1e-7)
    assert conflict_statistics(terms, sign_agreement=False).sign_agreement is None


def test_exactly_orthogonal_terms_are_not_a_conflict():
    terms = torch.zeros(3, 4, 1, 1, dtype=torch.float64)
    terms[0, :, 0, 0] = torch.tensor([3.0, 0.0, 1.0, 0.0])
    terms[1, :, 0, 0] = torch.tensor([0.0, 7.0, 0.0, 2.0])  # cosine exactly 0 with the first
    statistics = conflict_statistics(terms)
    assert statistics.cosine[0, 1, 0, 0] == 0.0 and not statistics.conflicting[0, 0]
    terms[1, 0, 0, 0] = -1e-3  # a hair of opposite direction is a conflict
    assert conflict_statistics(terms).conflicting[0, 0]


# ------------------------------------------------------------------------------------ cache and batches


def test_cached_and_computed_results_come_back_in_order(fixture_dir, tmp_path, monkeypatch):  # noqa: F811
    dataset = AnalysisDataset(fixture_dir / "val.json", fixture_dir / "data" / "images" / "val")
    model = analysed(load_model(fixture_dir / "asff.pt"), "asff")
    paths = [image.path for image in dataset]
    alone = [AnalysisCache(None).image_result(model, path, size=SIZE) for path in paths]
    cache = AnalysisCache(tmp_path)
    cache.image_result(model, paths[1], size=SIZE)  # the middle image is cached
    computed = []
    real = batches.light_traces

    def recording(model, paths, **kwargs):
        computed.append(list(paths))
        return real(model, paths, **kwargs)

    monkeypatch.setattr(batches, "light_traces", recording)
    results = list(cache.image_results(model, paths, size=SIZE, batch_size=2, workers=1))
    assert computed == [[paths[0], paths[2]]]  # one pass over the images without an entry, in order
    assert (cache.hits, cache.misses) == (1, 3)
    for expected, actual in zip(alone, results, strict=True):
        assert actual.transform == expected.transform
        np.testing.assert_allclose(actual.fusion_weights[0], expected.fusion_weights[0], atol=2e-4)
        np.testing.assert_allclose(actual.scores[:5], expected.scores[:5], rtol=1e-3)
    again = list(cache.image_results(model, paths, size=SIZE))
    assert cache.hits == 4 and len(computed) == 1 and len(again) == 3


def test_gradient_summaries_in_batches_equal_one_by_one(fixture_dir):  # noqa: F811
    dataset = AnalysisDataset(fixture_dir / "val.json", fixture_dir / "data" / "images" / "val")
    model = analysed(load_model(fixture_dir / "asff.pt"), "asff")
    items = [(image.path, image.ground_truth.boxes, image.ground_truth.labels) for image in dataset]
    options = {"size": SIZE, "controls": True, "control_seed": 2}
    together = list(AnalysisCache(None).gradient_summaries(model, items, batch_size=3, **options))
    for item, summary in zip(items, together, strict=True):
        alone = AnalysisCache(None).gradient_summary(model, *item, **options)
        # float32 round-off: the norms to 1e-3, and the counts of thresholded locations to a location or two.
        np.testing.assert_allclose(summary["value_norms"], alone["value_norms"], rtol=1e-3, atol=1e-12)
        assert np.abs(summary["active"] - alone["active"]).sum() <= 2
        assert np.abs(summary["conflicting"] - alone["conflicting"]).sum() <= 2
        assert summary["controls"].keys() == alone["controls"].keys()


def test_a_bad_image_in_a_batch_is_named(fixture_dir, tmp_path):  # noqa: F811
    dataset = AnalysisDataset(fixture_dir / "val.json", fixture_dir / "data" / "images" / "val")
    model = analysed(calibrated_model(), "asff")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [image.path for image in dataset] + [broken]
    with pytest.raises(AnalysisError, match="broken.jpg"):
        list(AnalysisCache(None).image_results(model, paths, size=SIZE, batch_size=4, workers=1))


def test_results_cache_runs_nothing_when_every_entry_is_cached(fixture_dir, tmp_path, monkeypatch):  # noqa: F811
    dataset = AnalysisDataset(fixture_dir / "val.json", fixture_dir / "data" / "images" / "val")
    model = analysed(load_model(fixture_dir / "asff.pt"), "asff")
    paths = [image.path for image in dataset]
    cache = AnalysisCache(tmp_path)
    list(cache.image_results(model, paths, size=SIZE))

    def no_model(*args, **kwargs):
        raise AssertionError("a cached pass ran the model")

    monkeypatch.setattr(results_cache.batches, "read_batches", no_model)
    assert len(list(cache.image_results(model, paths, size=SIZE))) == 3


# ------------------------------------------------------------------------------------------------ benchmark


def test_bench_dataset_section_times_the_real_commands_and_reports_them(fixture_dir, tmp_path):  # noqa: F811
    from asff_viz.bench.dataset import measure_model
    from asff_viz.bench.report import format_table, targets

    lines = []
    result = measure_model("checkpoint", str(fixture_dir / "asff.pt"), fixture_dir / "val.json",
                           fixture_dir / "data" / "images" / "val", 2, SIZE_ANALYZE, tmp_path, lines.append,
                           commands=("scale-stats", "gradflow (learned)", "evaluate"))
    assert result["images"] == 2  # the subset: the first two of the three images
    rows = {row["command"]: row for row in result["rows"]}
    assert list(rows) == ["scale-stats", "gradflow (learned)", "evaluate"]
    for name, row in rows.items():
        assert row["plain_s"] > 0 and row["cold_s"] > 0
        # The cached re-run ran no model (measure_model raises otherwise), so it is the fixed cost of the command;
        # with two tiny images it may take as long as the cold run, and then no pass rate is claimed.
        assert (row["cached_s"] is None) == (name == "evaluate")
        assert (row["pass_s"] is None) == (row["pass_ratio"] is None)
        if row["pass_s"] is not None:
            assert math.isclose(row["pass_ratio"], row["plain_s"] / row["pass_s"])
    assert rows["evaluate"]["pass_s"] == rows["evaluate"]["cold_s"]  # no cache: the whole command is its pass
    # Each command wrote its real outputs.
    assert (tmp_path / "checkpoint_0" / "run.json").is_file()
    assert (tmp_path / "checkpoint_2" / "metrics.json").is_file()
    results = {"dataset": [result], "ceilings": {}, "flops": {}, "settings": {"mode": "quick", "repeats": 1},
               "environment": {"cpu": "test", "torch_threads": 1, "torch": "x", "device": "cpu", "cpu_flags": []}}
    checked = {row["target"]: row for row in targets(results)}
    assert {"scale-stats", "gradflow (learned)", "evaluate"} == {name.split(" / ")[0] for name in checked}
    table = format_table(results)
    assert "| gradflow (learned) | 1 |" in table and "pass / plain" in table


def test_objectness_shift_is_the_bias_shift_and_thins_detections_monotonically(fixture_dir):  # noqa: F811
    from asff_viz.bench.dataset import detections_per_image, with_objectness_shift
    from asff_viz.training.params import set_objectness_prior

    model = calibrated_model()
    images = torch.randn(2, 3, SIZE_ANALYZE, SIZE_ANALYZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        set_objectness_prior(model, 0.05)
        outputs = model(images)
        # Moving the objectness bias by `shift` in the model gives the rows with_objectness_shift computes.
        shift = -1.5
        set_objectness_prior(model, float(torch.sigmoid(torch.logit(torch.tensor(0.05, dtype=torch.float64))
                                                        + shift)))
        moved = model.decode(model(images)).float()
        torch.testing.assert_close(with_objectness_shift(model, outputs, shift), moved, rtol=1e-5, atol=1e-6)
        counts = [detections_per_image(with_objectness_shift(model, outputs, s), 0.01)
                  for s in (-8.0, -2.0, 0.0, 3.0)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_conflict_statistics_from_a_gram_matrix_equal_those_from_the_terms():
    terms = torch.randn(3, 16, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    terms[0, :, 1] = 0
    direct = conflict_statistics(terms, sign_agreement=False)
    gram = torch.einsum("acij,bcij->abij", terms, terms)
    from_gram = conflict_statistics_from_gram(gram, terms.sum(0).norm(dim=0))
    for name in ("norms", "cancellation", "cosine"):
        np.testing.assert_allclose(getattr(from_gram, name), getattr(direct, name), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(from_gram.conflicting, direct.conflicting)
    assert from_gram.rate == direct.rate and from_gram.sign_agreement is None


@pytest.mark.parametrize("sign_agreement", [False, True])
def test_conflict_statistics_of_many_sets_at_once_are_each_sets_own(sign_agreement):
    # A batch's statistics come from one set of channel products for all its images (and weight sets): each set's
    # must be exactly its own, whatever the others hold: an all-zero set (nothing active: NaN rate), a set with a
    # NaN (a non-finite gradient: nothing active), a set whose largest location is 1e6 times another's.
    generator = torch.Generator().manual_seed(4)
    sets = torch.randn(5, 3, 6, 4, 5, generator=generator)
    sets[1] = 0
    sets[2, 1, 0, 2, 3] = math.nan
    sets[3] *= 1e6
    sets[4, 2] = 0  # one level sends nothing
    products = TermProducts.of(sets, sign_agreement=sign_agreement)
    for thresholds in [(0.1, 1e-3, 0.0), (0.3, 0.2, -0.2)]:
        batched = products.statistics(*thresholds)
        for terms, statistics in zip(sets, batched, strict=True):
            alone = conflict_statistics(terms, *thresholds, sign_agreement=sign_agreement)
            for name in ("norms", "cancellation", "cosine", "sign_agreement", "active", "conflicting"):
                if alone.sign_agreement is None and name == "sign_agreement":
                    assert statistics.sign_agreement is None
                    continue
                np.testing.assert_array_equal(getattr(statistics, name), getattr(alone, name), err_msg=name)
            assert statistics.rate == alone.rate or (math.isnan(statistics.rate) and math.isnan(alone.rate))
            assert statistics.mean_cancellation == alone.mean_cancellation
    assert math.isnan(batched[1].rate) and math.isnan(batched[2].rate) and batched[1].mean_cancellation == 0.0
    assert not batched[2].active.any()


@pytest.mark.parametrize("channels", [64, 2])
def test_random_directions_sampled_through_their_gram_matrix_match_random_vectors(channels):
    """The random control draws the Gram matrix of random directions (Bartlett's decomposition of a Wishart
    matrix) instead of the vectors: the same distribution of cosines and of conflict, and the given norms."""
    shape = (3, 200, 100)  # 20,000 locations
    norms = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    gram = random_direction_gram(norms, channels, np.random.default_rng(0))
    torch.testing.assert_close(gram.diagonal(dim1=0, dim2=1).movedim(-1, 0), norms ** 2)
    vectors = torch.randn(3, channels, *shape[1:], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    terms = vectors / vectors.norm(dim=1, keepdim=True) * norms[:, None]
    explicit = torch.einsum("acij,bcij->abij", terms, terms)
    cosines = [(g[0, 1] / (norms[0] * norms[1])).flatten().numpy() for g in (gram, explicit)]
    # Two samples of 20,000 from one distribution: means within 5 standard errors, a two-sample
    # Kolmogorov-Smirnov statistic well under its 1 % critical value (1.63 * sqrt(2 / 20000) = 0.016).
    spread = cosines[1].std()
    assert abs(cosines[0].mean() - cosines[1].mean()) < 5 * spread * np.sqrt(2 / cosines[0].size)
    grid = np.sort(np.concatenate(cosines))
    ks = np.abs(np.searchsorted(np.sort(cosines[0]), grid, side="right")
                - np.searchsorted(np.sort(cosines[1]), grid, side="right")).max() / cosines[0].size
    assert ks < 0.016
    if channels > 3:
        assert spread == pytest.approx(1 / np.sqrt(channels), rel=0.05)
    rates = [conflict_statistics_from_gram(g, g.sum(dim=(0, 1)).clamp(min=0).sqrt()).rate for g in (gram, explicit)]
    assert rates[0] == pytest.approx(rates[1], abs=0.02)
