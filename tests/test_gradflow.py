"""The gradient-flow decomposition: its identity with autograd, counterfactuals, objectives and conflict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asff_viz.inference.transforms import ImageTransform
from asff_viz.introspection.capture import hook_count
from asff_viz.introspection.decomposition import (
    compare_with_uniform,
    conflict_statistics,
    decompose_gradients,
    gradient_flow,
)
from asff_viz.introspection.objectives import (
    DetectionScore,
    SumOfScores,
    TrainingLoss,
    ground_truth_cells,
    ground_truth_labels,
)
from asff_viz.models.config import ModelConfig
from tests.test_capture import SIZE, tiny_model

LABELS = np.array([[0, 40.0, 50.0, 30.0, 60.0], [2, 70.0, 20.0, 12.0, 12.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    return tiny_model().double()


@pytest.fixture(scope="module")
def image():
    return torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


@pytest.fixture(scope="module")
def best_row(model, image):
    with torch.no_grad():
        decoded = model.decode(model(image[None]))[0]
    return int((decoded[:, 4] * decoded[:, 5:].max(dim=1).values).argmax())


@pytest.fixture(scope="module")
def decomposition(model, image, best_row):
    return decompose_gradients(model, image, DetectionScore(best_row))


def test_value_and_weight_branch_terms_sum_to_the_fusion_gradient(decomposition):
    for source in range(3):
        summed = sum(decomposition.value[l][source] + decomposition.weight_branch[l][source] for l in range(3))
        scale = decomposition.fusion_total[source].abs().max()
        assert scale > 0
        torch.testing.assert_close(summed, decomposition.fusion_total[source], rtol=0, atol=1e-10 * scale)
        # Both kinds of path really carry gradient, so the identity is not satisfied by zeros.
        assert sum(decomposition.value[l][source].abs().sum() for l in range(3)) > 0
        assert sum(decomposition.weight_branch[l][source].abs().sum() for l in range(3)) > 0


def test_total_gradient_matches_autograd_at_the_neck_outputs(model, image, best_row, decomposition):
    neck_outputs = {}
    handle = model.neck.register_forward_hook(lambda module, inputs, output: neck_outputs.setdefault("x", output))
    try:
        images = image[None].clone().requires_grad_(True)
        objective = DetectionScore(best_row)(model, model(images))
    finally:
        handle.remove()
    expected = torch.autograd.grad(objective, neck_outputs["x"])
    for source in range(3):
        parts = decomposition.fusion_total[source] + decomposition.neck_path[source]
        torch.testing.assert_close(decomposition.total[source], expected[source][0], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(parts, expected[source][0], rtol=1e-9, atol=1e-14)
    # x^2 feeds nothing but the fusion; x^0 also feeds the neck's top-down path.
    assert decomposition.neck_path[2].abs().max() == 0
    assert decomposition.neck_path[0].abs().max() > 0
    assert objective.item() == pytest.approx(decomposition.objective_value)
    assert hook_count(model) == 0


def test_identity_resize_value_term_is_weight_times_fused_gradient(decomposition):
    for level in range(3):  # R_{l->l} is the identity: the term is alpha^l_l * dO/dy^l exactly
        expected = decomposition.weights[level][level:level + 1] * decomposition.fused_gradient[level]
        torch.testing.assert_close(decomposition.value[level][level], expected, rtol=0, atol=0)


def test_uniform_weights_leave_no_weight_branch_gradient(model, image, best_row):
    uniform = decompose_gradients(model, image, DetectionScore(best_row), "uniform")
    for level in range(3):
        assert torch.allclose(uniform.weights[level], torch.full_like(uniform.weights[level], 1 / 3))
        for source in range(3):
            assert uniform.weight_branch[level][source].abs().max() == 0
    for source in range(3):
        torch.testing.assert_close(sum(uniform.value[l][source] for l in range(3)), uniform.fusion_total[source])


def test_one_hot_sends_gradient_only_to_the_chosen_source(model, image, best_row):
    one_hot = decompose_gradients(model, image, DetectionScore(best_row), {"kind": "one_hot", "source": 1})
    for level in range(3):
        assert one_hot.value[level][0].abs().max() == 0 and one_hot.value[level][2].abs().max() == 0
    assert sum(one_hot.value[l][1].abs().sum() for l in range(3)) > 0


def test_training_loss_of_one_level_reaches_only_that_levels_fusion(model, image):
    flow = gradient_flow(model, image, TrainingLoss(LABELS, levels=(1,)))
    assert np.all(flow.matrix[0] == 0) and np.all(flow.matrix[2] == 0)
    assert np.all(flow.matrix[1] > 0)
    whole = gradient_flow(model, image, TrainingLoss(LABELS))
    assert np.all(whole.matrix > 0)
    # Ground truth from the objective marks the positives.
    assert sum(int(p.sum()) for p in whole.positives) == 2
    assert [m.shape for m in whole.positives_at_source] == [(3, 3, 3), (3, 6, 6), (3, 12, 12)]
    obj_only = gradient_flow(model, image, TrainingLoss(LABELS, terms=("obj",)))
    assert obj_only.objective_value < whole.objective_value


def test_gradient_flow_summary_shapes_and_ranges(model, image, best_row):
    learned, uniform = compare_with_uniform(model, image, SumOfScores(), ground_truth=LABELS)
    for flow in (learned, uniform):
        assert flow.matrix.shape == (3, 3) and (flow.matrix > 0).all()
        for source in range(3):
            cells = SIZE // (32, 16, 8)[source]
            assert flow.maps[0][source].shape == (cells, cells)
            assert flow.conflict_maps[source].shape == (cells, cells)
            assert 0 <= flow.conflict_maps[source].min() and flow.conflict_maps[source].max() <= 1
            assert 0 <= flow.conflict_rate[source] <= 1
            np.testing.assert_allclose(np.sqrt((flow.maps[1][source].astype(np.float64) ** 2).sum()),
                                       flow.matrix[1, source], rtol=1e-5)
        np.testing.assert_allclose(flow.total_norms[2], flow.fusion_total_norms[2], rtol=1e-6)
    assert learned.counterfactual["kind"] == "learned" and uniform.counterfactual["kind"] == "uniform"
    assert np.all(uniform.weight_branch_matrix == 0) and np.all(learned.weight_branch_matrix > 0)


def test_conflict_statistics_on_hand_built_gradients():
    terms = torch.zeros(3, 2, 1, 3, dtype=torch.float64)  # 3 targets, 2 channels, a 1x3 source
    terms[0, :, 0, 0], terms[1, :, 0, 0] = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])  # aligned
    terms[0, :, 0, 1], terms[1, :, 0, 1] = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])  # opposite
    terms[0, :, 0, 2], terms[2, :, 0, 2] = torch.tensor([1.0, 0.0]), torch.tensor([-0.01, 0.0])  # one negligible
    statistics = conflict_statistics(terms, significance=0.1)
    np.testing.assert_allclose(statistics.cancellation[0], [0.0, 1.0, 0.02 / 1.01], atol=1e-6)
    assert statistics.conflicting[0].tolist() == [False, True, False]
    assert statistics.rate == pytest.approx(1 / 3)
    assert statistics.cosine[0, 1, 0, 0] == pytest.approx(1.0) and statistics.cosine[0, 1, 0, 1] == pytest.approx(-1)
    assert statistics.sign_agreement[0, 1, 0, 0] == 1.0 and statistics.sign_agreement[0, 1, 0, 1] == 0.0
    assert np.isnan(statistics.cosine[0, 2, 0, 0])  # target 2 sends nothing there


def test_a_conflict_rate_with_nothing_to_compare_is_undefined_not_zero(model, image):
    # 0 conflicting of 0 active locations is no measurement; reported as 0 % it read as perfect filtering.
    assert np.isnan(conflict_statistics(torch.zeros(3, 2, 2, 2, dtype=torch.float64)).rate)
    dropped = gradient_flow(model, image, SumOfScores(), {"kind": "drop", "source": 1})
    assert np.isnan(dropped.conflict_rate[1]) and np.isfinite(dropped.conflict_rate[[0, 2]]).all()
    # One target level reached: no location can conflict, whatever the weights do.
    one_level = gradient_flow(model, image, TrainingLoss(LABELS, levels=(1,)))
    assert one_level.targets_reached == 1 and one_level.overall_conflict_rate == 0
    from asff_viz.figures.gradients import conflict_text

    assert conflict_text(one_level, one_level.overall_conflict_rate) == "n/a (one target level)"
    summed = gradient_flow(model, image, SumOfScores())
    assert summed.targets_reached == 3 and summed.finite


def test_a_non_finite_gradient_is_flagged_and_keeps_the_others_scale(model, image):
    # An untrained model's loss can overflow: NaN gradients make every location inactive and the rate 0 of 0.
    import dataclasses

    from asff_viz.figures.gradients import conflict_text, finite_max, rate_text

    flow = gradient_flow(model, image, SumOfScores())
    matrix = flow.matrix.copy()
    matrix[1] = np.nan
    broken = dataclasses.replace(flow, matrix=matrix)
    assert flow.finite and not broken.finite
    assert finite_max([broken.matrix, flow.matrix]) == pytest.approx(flow.matrix.max())
    assert finite_max([np.full(3, np.nan), np.zeros(2)]) == 1.0
    assert rate_text(float("nan")) == "n/a" and rate_text(0.25) == "25.0%"
    assert conflict_text(broken, 0.25) == "n/a (gradient not finite)" and conflict_text(flow, 0.25) == "25.0%"


def test_ground_truth_cells_follow_the_loss_assignment():
    config = ModelConfig(width=0.125, depth=0.33, num_classes=3)
    # (121, 240) is anchor 8, in level 0's mask; (10, 13) is anchor 0, in level 2's mask.
    labels = np.array([[0, 100.0, 50.0, 121.0, 240.0], [1, 20.0, 90.0, 10.0, 13.0]])
    positives, background = ground_truth_cells(labels, config, 128)
    assert [p.shape for p in positives] == [(4, 4), (8, 8), (16, 16)]
    assert np.argwhere(positives[0]).tolist() == [[1, 3]] and np.argwhere(positives[2]).tolist() == [[11, 2]]
    assert not positives[1].any()
    assert np.argwhere(background[1]).tolist() == [[3, 6], [5, 1]]
    assert background[0][2, 0] and background[2][6, 12]
    transform = ImageTransform(original_height=256, original_width=64, size=128)
    converted = ground_truth_labels(np.array([[10.0, 20.0, 30.0, 60.0]]), [4], transform)
    np.testing.assert_allclose(converted, [[4, 40.0, 20.0, 40.0, 20.0]])


def test_identity_also_holds_through_the_heads_offsets(model, image, best_row, decomposition):
    rerouted = decompose_gradients(model, image, DetectionScore(best_row), through_offsets=True)
    for source in range(3):
        summed = sum(rerouted.value[l][source] + rerouted.weight_branch[l][source] for l in range(3))
        torch.testing.assert_close(summed, rerouted.fusion_total[source], rtol=0,
                                   atol=1e-10 * rerouted.fusion_total[source].abs().max())
    # The detached offsets of the head are a real difference between training gradients and true derivatives.
    assert not torch.allclose(rerouted.total[0], decomposition.total[0])
    assert hook_count(model) == 0


# ------------------------------------------------------------------------------ controls of the conflict metric


def test_each_control_is_what_it_says(model, image, best_row):
    from asff_viz.introspection.controls import ALL_CONTROLS, control_weight_maps

    flow = gradient_flow(model, image, TrainingLoss(LABELS), controls=True, control_seed=3)
    assert set(flow.controls) == set(ALL_CONTROLS)
    weights = [torch.from_numpy(w)[None] for w in flow.weights]
    maps = control_weight_maps(weights, [3])
    for level in range(3):
        learned, shuffled = weights[level][0], maps["shuffled"][level][0]
        # Shuffled: the same weight vectors, at other places (same distribution, no spatial targeting).
        assert sorted(map(tuple, learned.flatten(1).T.tolist())) == sorted(map(tuple, shuffled.flatten(1).T.tolist()))
        assert not torch.equal(learned, shuffled)
        # Rolled: the sources permuted at every location (same peakedness).
        torch.testing.assert_close(maps["rolled"][level][0], learned.roll(-1, dims=0), rtol=0, atol=0)
        torch.testing.assert_close(maps["uniform"][level], torch.full_like(weights[level], 1 / 3))
    # The uniform control of this pass equals the uniform counterfactual's value terms up to the upstream gradient:
    # with weights 1/3, the terms are R^T(dO/dy / 3), whatever dO/dy is; so each control's maps are its own.
    assert not np.allclose(flow.controls["uniform"].maps[0][0], flow.maps[0][0])
    # Random directions keep the learned norms: the same maps, other directions.
    np.testing.assert_allclose(flow.controls["random"].maps[1][2], flow.maps[1][2])


def test_learned_weights_that_equal_their_shuffle_give_a_zero_paired_difference(image):
    from asff_viz.analyze.flow_statistics import GradientFlowStatistics, summarize_flow

    flat = tiny_model().double()
    with torch.no_grad():  # the same weight vector everywhere: shuffling changes nothing
        for level in flat.fusion.levels:
            level.weight_logits.weight.zero_()
            level.weight_logits.bias.copy_(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    statistics = GradientFlowStatistics(["learned", "shuffled"])
    for seed in range(3):
        noisy = image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(seed),
                                          dtype=torch.float64)
        flow = gradient_flow(flat, noisy, TrainingLoss(LABELS), controls=True, control_seed=seed)
        for source in range(3):
            np.testing.assert_array_equal(flow.controls["shuffled"].conflict[source].conflicting,
                                          flow.conflict[source].conflicting)
        statistics.add("learned", summarize_flow(flow), f"image{seed}")
        statistics.add("shuffled", summarize_flow(flow.controls["shuffled"]), f"image{seed}")
    difference, low, high = statistics.paired_difference("learned", "shuffled", samples=200)
    finite = np.isfinite(difference)
    assert finite.any()
    assert (difference[finite] == 0).all() and (low[finite] == 0).all() and (high[finite] == 0).all()


def test_peaked_random_terms_do_not_lower_the_controlled_metric():
    """The audit's case: random 64-channel terms conflict at a high rate; shrinking two of three terms (peaked
    weights) drops the rate against uniform with directions unchanged. Against the rolled control (the same
    peakedness, other sources) the difference is about zero: the controlled metric is not fooled."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(3, 64, 32, 32, generator=generator, dtype=torch.float64)
    winner = torch.randint(0, 3, (32, 32), generator=generator)
    peaked = torch.full((3, 32, 32), 0.05, dtype=torch.float64)
    peaked.scatter_(0, winner[None], 0.9)
    uniform_rate = conflict_statistics(directions / 3).rate
    learned_rate = conflict_statistics(directions * peaked[:, None]).rate
    rolled_rate = conflict_statistics(directions * peaked.roll(-1, dims=0)[:, None]).rate
    assert uniform_rate > 0.8  # the null rate is high
    assert learned_rate < uniform_rate - 0.5  # peakedness alone "filters" against uniform...
    assert abs(learned_rate - rolled_rate) < 0.03  # ...but not against the control with the same peakedness


def test_paired_bootstrap_against_hand_computed_cases():
    from asff_viz.analyze.flow_statistics import REGIONS, GradientFlowStatistics

    def record(active, conflicting):
        counts = np.zeros((3, len(REGIONS)), dtype=np.int64)
        counts[0, 0] = active
        conflicts = np.zeros_like(counts)
        conflicts[0, 0] = conflicting
        return {"active": counts, "conflicting": conflicts, "objective": 0.0, "value_norms": np.zeros((3, 3)),
                "weight_branch_norms": np.zeros((3, 3)), "neck_norms": np.zeros(3), "total_norms": np.zeros(3),
                "fusion_total_norms": np.zeros(3), "region_energy": np.zeros((3, 3, len(REGIONS))),
                "cancellation": np.zeros((3, len(REGIONS))), "weighted_cancellation": np.zeros((3, len(REGIONS))),
                "gradient_weight": np.zeros((3, len(REGIONS)))}

    # Two images of 10 active locations: differences 0.1 and 0.3. Resamples are (2, 0), (1, 1), (0, 2) with
    # probabilities 1/4, 1/2, 1/4, giving 0.1, 0.2, 0.3: the 95 % interval is [0.1, 0.3], the estimate 0.2.
    statistics = GradientFlowStatistics(["a", "b"])
    for name, (a, b) in {"one": (5, 4), "two": (7, 4)}.items():
        statistics.add("a", record(10, a), name)
        statistics.add("b", record(10, b), name)
    estimate, low, high = statistics.paired_difference("a", "b", samples=4000, seed=1)
    assert estimate[0, 0] == pytest.approx(0.2)
    assert low[0, 0] == pytest.approx(0.1) and high[0, 0] == pytest.approx(0.3)
    # The same per-image difference everywhere: the interval collapses to it, while the unpaired intervals of
    # the two modes are wide and overlap.
    constant = GradientFlowStatistics(["a", "b"])
    for name, b in {"one": 1, "two": 5, "three": 9}.items():
        constant.add("a", record(10, b + 1), name)
        constant.add("b", record(10, b), name)
    estimate, low, high = constant.paired_difference("a", "b", samples=500)
    assert estimate[0, 0] == pytest.approx(0.1) and low[0, 0] == pytest.approx(0.1) and high[0, 0] == pytest.approx(0.1)
    low_a, high_a = constant.bootstrap_interval("a", samples=500)
    low_b, high_b = constant.bootstrap_interval("b", samples=500)
    assert low_a[0, 0] < high_b[0, 0]  # the separate intervals overlap
    with pytest.raises(ValueError, match="same images"):
        statistics.add("a", record(10, 1), "three")
        statistics.paired_difference("a", "b")
