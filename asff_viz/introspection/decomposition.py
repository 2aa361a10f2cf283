"""The paper's consistency analysis made measurable: which target level sends which gradient to which source.

ASFF fuses y^l = sum_k alpha^l_k * R_{k->l}(x^k) (alpha: per-pixel softmax weights, R: the resize of source
level k to target level l). Treating the weights as given, as the paper does, the gradient an objective O
sends to source feature x^k through the fusion's value path is

    sum_l  J_{R_{k->l}}^T ( alpha^l_k * dO/dy^l ),

one term per target level l, each carried back through the resize. A location that is a positive at one level
and background at another receives conflicting terms; the learned alpha can switch one of them off.

What the decomposition contains (all computed with `torch.autograd.grad` on tensors captured by
`asff_viz.capture(keep_graph=True)`, never with module backward hooks), for each source k:

* ``value[l][k]``: the term above for target level l (the paper's quantity);
* ``weight_branch[l][k]``: the gradient that reaches x^k through level l's weight branch (the 1x1 convs,
  logits and softmax that compute alpha^l from the resized maps), which the paper's argument leaves out;
* ``fusion_total[k]``: dO/dx^k through the fusion as a whole, by autograd; it equals
  sum_l (value[l][k] + weight_branch[l][k]) (the identity the tests check);
* ``neck_path[k]``: what reaches the neck output x^k through the neck's own top-down path (x^0 feeds x^1 and
  x^2, x^1 feeds x^2), i.e. total[k] - fusion_total[k]; zero for x^2;
* ``total[k]``: dO/dx^k by autograd, all paths: value paths + weight branches + neck path.

Conflict is measured on the value-path terms only (see `conflict_statistics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .capture import (
    Counterfactual,
    as_counterfactual,
    capture,
    gradient_through_offsets,
    has_fusion_weights,
)
from .controls import ALL_CONTROLS, CONTROLS, ControlSeed, control_generator, control_weight_maps, random_direction_gram
from .objectives import TrainingLoss, ground_truth_cells, resample_mask


@dataclass
class GradientDecomposition:
    """Gradient tensors at the three sources (see the module docstring); batch dimension removed.

    value[l][k], weight_branch[l][k]: (C_k, H_k, W_k). fusion_total[k], neck_path[k], total[k]: (C_k, H_k, W_k).
    fused_gradient[l]: dO/dy^l (C_l, H_l, W_l). weights[l]: the fusion weights used, (3, H_l, W_l).
    """

    objective_value: float
    value: list
    weight_branch: list
    fusion_total: list
    neck_path: list
    total: list
    fused_gradient: list
    weights: list
    counterfactual: Counterfactual
    controls: dict = field(default_factory=dict)  # control name -> value terms [l][k] (see `CONTROLS`)


def input_batch(model: nn.Module, image_tensor: torch.Tensor, *, single: bool = True) -> torch.Tensor:
    """One normalized image (3, S, S) or (1, 3, S, S) -> a fresh (1, 3, S, S) leaf on the model's device and dtype,
    requiring grad: gradients with respect to the input are what the analyses take. single=False also takes a
    batch (B, 3, S, S)."""
    if image_tensor.dim() == 3:
        image_tensor = image_tensor.unsqueeze(0)
    if single and (image_tensor.dim() != 4 or image_tensor.shape[0] != 1 or image_tensor.shape[1] != 3):
        raise ValueError(f"expected one normalized image (3, S, S) or (1, 3, S, S), got {tuple(image_tensor.shape)}")
    if image_tensor.dim() != 4 or image_tensor.shape[0] < 1 or image_tensor.shape[1] != 3:
        raise ValueError(f"expected normalized images (3, S, S) or (B, 3, S, S), got {tuple(image_tensor.shape)}")
    parameter = next(model.parameters())
    return image_tensor.detach().to(device=parameter.device, dtype=parameter.dtype).clone().requires_grad_(True)


def decompose_gradients(model: nn.Module, image_tensor: torch.Tensor, objective,
                        counterfactual: Counterfactual | str | None = None, *,
                        through_offsets: bool = False, control_weights=None) -> GradientDecomposition:
    """Split the gradient of `objective` at the three neck outputs by path (see the module docstring).

    Args:
        model: an ASFF model, expected in eval mode (its mode and parameters are not changed).
        image_tensor: (3, S, S) or (1, 3, S, S) normalized image.
        objective: callable (model, raw outputs) -> scalar tensor, e.g. `DetectionScore(row)`.
        counterfactual: fusion weights to use instead of the learned ones (e.g. "uniform").
        through_offsets: also differentiate through the head's deformable offsets, which the model computes
            from detached guided anchors. Off by default: the analysis is about the gradients training
            sees, and training stops them there.
        control_weights: optional callable (the 3 weight tensors used, (1, 3, H_l, W_l)) -> {name: 3 weight
            tensors}; for each, the value-path terms those weights would give under the same upstream gradient
            dO/dy^l, computed in this pass (`GradientDecomposition.controls`). See `control_weight_maps`.
    """
    if image_tensor.dim() == 4 and image_tensor.shape[0] != 1:
        raise ValueError(f"expected one normalized image (3, S, S) or (1, 3, S, S), got {tuple(image_tensor.shape)}; "
                         "decompose_gradient_batch takes a batch")
    return decompose_gradient_batch(model, image_tensor, [objective], counterfactual, through_offsets=through_offsets,
                                    control_weights=control_weights)[0]


def decompose_gradient_batch(model: nn.Module, images: torch.Tensor, objectives, counterfactual=None, *,
                             through_offsets: bool = False, control_weights=None) -> list[GradientDecomposition]:
    """`decompose_gradients` of B images in one forward and one set of backward passes; one decomposition per
    image, each that image's own (to float round-off).

    images: (B, 3, S, S); objectives: B callables, objective i applied to image i's outputs alone. Every image's
    objective depends on its own outputs only (the model in eval mode mixes nothing across the batch), so the
    gradient of their sum at image i's tensors is the gradient of objective i.
    """
    return _images_of(_decompose_batch(model, images, objectives, counterfactual, through_offsets=through_offsets,
                                       control_weights=control_weights))


def _decompose_batch(model: nn.Module, images: torch.Tensor, objectives, counterfactual=None, *,
                     through_offsets: bool = False, control_weights=None) -> GradientDecomposition:
    """`decompose_gradient_batch` before the split into images: every tensor keeps the batch dimension in front,
    objective_value is a (B,) tensor."""
    # A sum-fusion model is y^l = sum_k R_{k->l}(x^k): the same decomposition with every alpha^l_k = 1.
    plain_sum = not has_fusion_weights(model) and getattr(getattr(model, "fusion", None), "mode", None) == "sum"
    if not has_fusion_weights(model) and not plain_sum:
        raise ValueError(f"the {model.config.variant!r} model has no ASFF fusion to analyse.")
    counterfactual = as_counterfactual(counterfactual)
    images = input_batch(model, images, single=False)
    if len(objectives) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images need as many objectives, got {len(objectives)}")
    with torch.enable_grad():
        with capture(model, keep_graph=True, counterfactual=counterfactual) as recorder:
            if through_offsets:
                with gradient_through_offsets(model):
                    outputs = model(images)
            else:
                outputs = model(images)
        values = torch.stack([_objective_of_image(objective, model, outputs, index, len(objectives))
                              for index, objective in enumerate(objectives)])
        resized = [[recorder.resized[l][k] for k in range(3)] for l in range(3)]
        inputs = [*recorder.fused, *(r for row in resized for r in row), *recorder.sources, *recorder.neck_outputs]
        gradients = torch.autograd.grad(values.sum(), inputs, retain_graph=True, allow_unused=True)
        gradients = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gradients, strict=True)]
        fused_gradient = gradients[0:3]
        resized_gradient = [gradients[3 + 3 * l: 6 + 3 * l] for l in range(3)]
        fusion_total, total = gradients[12:15], gradients[15:18]

        def back_through_resize(level: int, source: int, gradient: torch.Tensor) -> torch.Tensor:
            result = torch.autograd.grad(resized[level][source], recorder.sources[source], grad_outputs=gradient,
                                         retain_graph=True, allow_unused=True)[0]
            return torch.zeros_like(recorder.sources[source]) if result is None else result

        value_terms = [[None] * 3 for _ in range(3)]
        weight_terms = [[None] * 3 for _ in range(3)]
        used_weights = [None] * 3
        for level in range(3):
            weights = (recorder.fusion_weights[level].detach() if not plain_sum else
                       fused_gradient[level].new_ones(fused_gradient[level].shape[0], 3,
                                                      *fused_gradient[level].shape[2:]))
            used_weights[level] = weights
            for source in range(3):
                # dO/dR_{k->l} through the value path: the fused sum multiplies R by alpha^l_k.
                direct = weights[:, source:source + 1] * fused_gradient[level]
                value_terms[level][source] = back_through_resize(level, source, direct)
                weight_terms[level][source] = back_through_resize(
                    level, source, resized_gradient[level][source] - direct)
        controls = {}
        if control_weights is not None:
            # Each image's control draws come from its own seed, so an image gets the controls it gets alone.
            for name, weights in control_weights(used_weights).items():
                controls[name] = [[back_through_resize(level, source, weights[level][:, source:source + 1]
                                                       * fused_gradient[level]) for source in range(3)]
                                  for level in range(3)]
    neck_path = [t - f for t, f in zip(total, fusion_total, strict=True)]
    return GradientDecomposition(
        objective_value=values.detach(), value=value_terms, weight_branch=weight_terms,
        fusion_total=[g.detach() for g in fusion_total], neck_path=[g.detach() for g in neck_path],
        total=[g.detach() for g in total], fused_gradient=[g.detach() for g in fused_gradient],
        weights=[w.detach() for w in used_weights], counterfactual=counterfactual, controls=controls)


def _images_of(batched: GradientDecomposition) -> list[GradientDecomposition]:
    """A batched decomposition (`_decompose_batch`) -> one per image, each with its own tensors (views)."""
    return [GradientDecomposition(
        objective_value=float(batched.objective_value[i]),
        value=[[term[i] for term in row] for row in batched.value],
        weight_branch=[[term[i] for term in row] for row in batched.weight_branch],
        fusion_total=[g[i] for g in batched.fusion_total], neck_path=[g[i] for g in batched.neck_path],
        total=[g[i] for g in batched.total], fused_gradient=[g[i] for g in batched.fused_gradient],
        weights=[w[i] for w in batched.weights], counterfactual=batched.counterfactual,
        controls={name: [[term[i] for term in row] for row in terms] for name, terms in batched.controls.items()},
    ) for i in range(len(batched.objective_value))]


def _objective_of_image(objective, model: nn.Module, outputs: list, index: int, batch: int) -> torch.Tensor:
    """objective(model, outputs of image `index` alone) as a scalar tensor."""
    if batch > 1:
        outputs = [type(output)(*(tensor[index:index + 1] for tensor in output)) for output in outputs]
    value = objective(model, outputs)
    if value.dim() != 0:
        raise ValueError(f"the objective must return a scalar, got shape {tuple(value.shape)}")
    return value


@dataclass
class ConflictStatistics:
    """How the value-path terms of the three target levels agree at each location of one source.

    norms: (3, H, W) per-target norms over channels. cancellation: (H, W) 1 - |sum_l g_l| / sum_l |g_l| in
    [0, 1]: 0 when the terms point the same way (or only one is present), near 1 when they cancel.
    cosine, sign_agreement: (3, 3, H, W) pairwise cosine similarity and fraction of channels whose signs
    agree (NaN where a term is zero; sign_agreement None when not asked for, or when the terms are known only by
    their Gram matrix). active: (H, W) locations with a non-negligible gradient. conflicting: active locations
    where two significant terms (each >= `significance` x the largest there) have cosine below
    `cosine_threshold`. rate: conflicting / active (NaN when no location is active). (Random directions in C
    channels have cosines of about +-1/sqrt(C), so a threshold of 0 counts near-orthogonal pairs too;
    `mean_cancellation` weighs each location by its gradient and is the magnitude-aware summary.)
    mean_cancellation: the cancellation averaged over active locations, weighted by sum_l |g_l|.
    """

    norms: np.ndarray
    cancellation: np.ndarray
    cosine: np.ndarray
    sign_agreement: np.ndarray | None
    active: np.ndarray
    conflicting: np.ndarray
    rate: float
    mean_cancellation: float = 0.0


def conflict_statistics(terms: torch.Tensor, significance: float = 0.1, active_fraction: float = 1e-3,
                        cosine_threshold: float = 0.0, *, sign_agreement: bool = True) -> ConflictStatistics:
    """terms: (L, C, H, W) gradient contributions of L target levels to one source -> ConflictStatistics."""
    products = TermProducts.of(terms.unsqueeze(0), sign_agreement=sign_agreement)
    return products.statistics(significance, active_fraction, cosine_threshold)[0]


def conflict_statistics_from_gram(gram: torch.Tensor, sum_norm: torch.Tensor, significance: float = 0.1,
                                  active_fraction: float = 1e-3, cosine_threshold: float = 0.0) -> ConflictStatistics:
    """`conflict_statistics` of terms known by their (L, L, H, W) Gram matrix (float64, the channel sums of their
    pairwise products) and (H, W) the norm of their sum; sign_agreement is None (it needs the terms)."""
    return TermProducts(gram.unsqueeze(0), sum_norm.unsqueeze(0)).statistics(
        significance, active_fraction, cosine_threshold)[0]


@dataclass
class TermProducts:
    """What the conflict statistics of M sets of L terms (one image's gradient contributions of L target levels to
    one source, each (C, H, W)) need, whatever the thresholds: gram (M, L, L, H, W) float64, the channel sums of
    the terms' pairwise products; sum_norm (M, H, W) the norm of their sum; sign_agreement (M, L, L, H, W) float32
    numpy, or None. Computed once for a batch of images, and measured at any thresholds (`statistics`)."""

    gram: torch.Tensor
    sum_norm: torch.Tensor
    sign_agreement: np.ndarray | None = None

    @classmethod
    def of(cls, terms: torch.Tensor, *, sign_agreement: bool = False) -> TermProducts:
        """terms: (M, L, C, H, W) -> the products of each of the M sets."""
        terms = terms.detach()
        terms = terms if terms.dtype == torch.float64 else terms.float()
        batch, count = terms.shape[:2]
        flat = terms.flatten(3)  # (M, L, C, H * W)
        # Every pairwise quantity is a sum over channels of a product of two terms: one pass per pair of levels, the
        # sums in float64 (a product of float32 terms is rounded like the terms themselves are).
        gram = _channel_products(flat, flat).view(batch, count, count, *terms.shape[3:])
        summed = flat.sum(dim=1)  # exact to the terms' own rounding; |sum| taken from the gram would lose digits
        sum_norm = (summed * summed).double().sum(dim=1).sqrt().view(batch, *terms.shape[3:])
        products = cls(gram, sum_norm)
        if sign_agreement:
            # Signs s in {-1, 0, 1}: s_a * s_b is 1 where two channels agree, -1 where they disagree, 0 where either
            # is zero, so (|s_a||s_b| + s_a s_b) / 2 counts agreeing channels among those where both are non-zero.
            signs = torch.sign(flat)
            nonzero = _channel_products(signs.abs(), signs.abs())
            agree = (nonzero + _channel_products(signs, signs)) / 2
            present = gram.diagonal(dim1=1, dim2=2).movedim(-1, 1) > 0  # as exact as the gram, unlike float32 norms
            both = present.unsqueeze(1) & present.unsqueeze(2)
            products.sign_agreement = torch.where(both, (agree / nonzero.clamp(min=1)).view_as(gram),
                                                  torch.full_like(gram, math.nan)).float().numpy()
        return products

    def statistics(self, significance: float = 0.1, active_fraction: float = 1e-3, cosine_threshold: float = 0.0
                   ) -> list[ConflictStatistics]:
        """The M sets' `ConflictStatistics` at these thresholds (see `conflict_statistics`)."""
        gram, sum_norm = self.gram, self.sum_norm
        batch, count = gram.shape[:2]
        norms = gram.diagonal(dim1=1, dim2=2).movedim(-1, 1).clamp(min=0).sqrt()  # (M, L, H, W)
        norm_sum = norms.sum(dim=1)
        tiny = torch.finfo(torch.float64).tiny
        cancellation = torch.where(norm_sum > 0, 1 - sum_norm / norm_sum.clamp(min=tiny),
                                   torch.zeros_like(norm_sum)).clamp(0, 1)
        present = norms > 0
        both = present.unsqueeze(1) & present.unsqueeze(2)
        scale = (norms.unsqueeze(1) * norms.unsqueeze(2)).clamp(min=tiny)
        cosine = torch.where(both, (gram / scale).clamp(-1, 1), torch.full_like(gram, math.nan))
        maximum = norm_sum.flatten(1).max(dim=1).values.view(batch, 1, 1)  # NaN where a norm is NaN: none active
        active = (norm_sum > active_fraction * maximum) & (maximum > 0)
        significant = norms >= significance * norms.max(dim=1, keepdim=True).values
        significant &= present
        pair = significant.unsqueeze(1) & significant.unsqueeze(2)
        pair &= ~torch.eye(count, dtype=torch.bool).view(1, count, count, 1, 1)
        conflicting = (pair & (torch.nan_to_num(cosine, nan=1.0) < cosine_threshold)).flatten(1, 2).any(dim=1)
        conflicting &= active
        active_count = active.flatten(1).sum(dim=1)
        rates = (conflicting.flatten(1).sum(dim=1) / active_count).tolist()  # 0 of 0 is not 0 %: NaN
        weight = torch.where(active, norm_sum, torch.zeros_like(norm_sum)).flatten(1)
        weight_sum = weight.sum(dim=1)
        mean_cancellation = ((cancellation.flatten(1) * weight).sum(dim=1) / weight_sum).tolist()
        arrays = [norms.float().numpy(), cancellation.float().numpy(), cosine.float().numpy(), active.numpy(),
                  conflicting.numpy()]
        return [ConflictStatistics(
            *(array[m] for array in arrays[:3]),
            None if self.sign_agreement is None else self.sign_agreement[m], *(array[m] for array in arrays[3:]),
            rate=rates[m] if active_count[m] > 0 else math.nan,
            mean_cancellation=mean_cancellation[m] if weight_sum[m] > 0 else 0.0) for m in range(batch)]


def _channel_products(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(M, L, C, N), (M, L, C, N) -> (M, L, L, N) float64: sum over channels of first[:, a] * second[:, b]
    (symmetric inputs: each pair computed once)."""
    count = first.shape[1]
    result = first.new_empty(first.shape[0], count, count, first.shape[3], dtype=torch.float64)
    for a in range(count):
        for b in range(a, count):
            # (Converted, then summed: the same sums as sum(dtype=float64), twice as fast.)
            result[:, a, b] = (first[:, a] * second[:, b]).double().sum(dim=1)
            if b != a:
                result[:, b, a] = (result[:, a, b] if first is second
                                   else (first[:, b] * second[:, a]).double().sum(dim=1))
    return result


@dataclass
class GradientFlow:
    """The gradient-flow analysis of one image and objective, as numpy summaries (see `gradient_flow`).

    matrix: (3, 3) Frobenius norms of the value-path terms, row = target level l, column = source level k.
    weight_branch_matrix: (3, 3) the same for the weight-branch terms.
    maps[l][k]: (H_k, W_k) per-location channel norm of the value-path term l -> k, at the source's resolution.
    weight_branch_maps[l][k]: the same for the weight branch.
    fusion_total_maps, neck_path_maps, total_maps: 3 arrays (H_k, W_k); *_norms: (3,) their Frobenius norms.
    conflict: 3 `ConflictStatistics`, one per source; conflict_maps[k] = conflict[k].cancellation;
    conflict_rate: (3,) per source; overall_conflict_rate: conflicting / active over all sources (NaN where
    nothing is active);
    mean_cancellation: (3,) per source, gradient-weighted mean of the conflict map.
    positives, background: 3 bool (H_l, W_l) from ground truth (None without it); positives_at_source[k],
    background_at_source[k]: (3, H_k, W_k) bool, target level l's cells mapped onto source k's grid;
    conflict_rate_at_objects: (3,) conflict rate among active locations of source k that are a positive of
    some level (None without ground truth).
    weights: 3 arrays (3, H_l, W_l), the fusion weights used. strides: per level.
    """

    objective: str
    objective_value: float
    counterfactual: dict
    matrix: np.ndarray
    weight_branch_matrix: np.ndarray
    maps: list
    weight_branch_maps: list
    fusion_total_maps: list
    neck_path_maps: list
    total_maps: list
    fusion_total_norms: np.ndarray
    neck_path_norms: np.ndarray
    total_norms: np.ndarray
    conflict: list
    conflict_rate: np.ndarray
    overall_conflict_rate: float
    weights: list
    strides: tuple
    positives: list | None = None
    background: list | None = None
    positives_at_source: list | None = None
    background_at_source: list | None = None
    conflict_rate_at_objects: np.ndarray | None = None
    controls: dict = field(default_factory=dict)  # name -> GradientFlow of that control (see `ALL_CONTROLS`)
    sweep: dict = field(default_factory=dict)  # (weights, significance, cosine) -> GradientFlow, see `gradient_flow`

    @property
    def mean_cancellation(self) -> np.ndarray:
        return np.array([statistics.mean_cancellation for statistics in self.conflict])

    @property
    def conflict_maps(self) -> list:
        return [statistics.cancellation for statistics in self.conflict]

    @property
    def counterfactual_label(self) -> str:
        return Counterfactual.from_dict(self.counterfactual).describe()

    @property
    def finite(self) -> bool:
        """Whether the objective and every gradient norm are finite. An untrained model's loss can overflow (box
        sizes through exp), and a NaN gradient makes every location inactive: its rates mean nothing."""
        return bool(np.isfinite(self.objective_value) and np.isfinite(self.matrix).all()
                    and np.isfinite(self.weight_branch_matrix).all() and np.isfinite(self.total_norms).all())

    @property
    def targets_reached(self) -> int:
        """How many target levels send any value-path gradient. Under 2, no location can conflict (one
        detection's score reaches only its own level), so a conflict rate of 0 says nothing about filtering."""
        return int((np.asarray(self.matrix).sum(axis=1) > 0).sum())


def gradient_flow(model: nn.Module, image_tensor: torch.Tensor, objective,
                  counterfactual: Counterfactual | str | None = None, *, ground_truth=None,
                  significance: float = 0.1, active_fraction: float = 1e-3, cosine_threshold: float = 0.0,
                  through_offsets: bool = False, controls: bool = False, control_seed: ControlSeed = 0,
                  sweep: tuple = ()) -> GradientFlow:
    """The gradient-flow analysis of `objective` on one image.

    Args:
        model: an ASFF model (eval mode expected; not modified).
        image_tensor: (3, S, S) or (1, 3, S, S) normalized image.
        objective: `DetectionScore(row)`, `SumOfScores()`, `TrainingLoss(labels)`, or any callable
            (model, raw outputs) -> scalar tensor (with an optional `describe()`).
        counterfactual: e.g. "uniform" for the plain-sum comparison the paper argues from.
        ground_truth: (M, 5) [class, cx, cy, w, h] in input pixels to mark positives/background; taken from a
            `TrainingLoss` objective when not given.
        significance, active_fraction, cosine_threshold: thresholds of `conflict_statistics`.
        through_offsets: see `decompose_gradients` (off: the gradients training sees).
        controls: also compute the conflict statistics of every control of `ALL_CONTROLS` in this pass
            (`GradientFlow.controls`, each a GradientFlow whose conflict fields are the control's); seeded by
            `control_seed` (an int or a tuple of ints; over a dataset, each image's own: `image_control_seed`).
        sweep: (significance, cosine threshold) pairs at which the learned weights and the weight controls
            (`SWEPT`) are measured again, from the same terms (`GradientFlow.sweep`); needs `controls`.
    """
    if image_tensor.dim() == 4 and image_tensor.shape[0] != 1:
        raise ValueError(f"expected one normalized image (3, S, S) or (1, 3, S, S), got {tuple(image_tensor.shape)}; "
                         "gradient_flows takes a batch")
    return gradient_flows(model, image_tensor, [objective], counterfactual, ground_truths=[ground_truth],
                          significance=significance, active_fraction=active_fraction,
                          cosine_threshold=cosine_threshold, through_offsets=through_offsets, controls=controls,
                          control_seeds=[control_seed], sweep=sweep)[0]


def gradient_flows(model: nn.Module, images: torch.Tensor, objectives, counterfactual=None, *, ground_truths=None,
                   significance: float = 0.1, active_fraction: float = 1e-3, cosine_threshold: float = 0.0,
                   through_offsets: bool = False, controls: bool = False, control_seeds=None,
                   sweep: tuple = (), sign_agreement: bool = True) -> list[GradientFlow]:
    """`gradient_flow` of B images (B, 3, S, S), objective i and ground truth i for image i, in one forward and
    one set of backward passes (`decompose_gradient_batch`); each flow equals the image's own to round-off.
    control_seeds: with `controls`, image i's control seed (`gradient_flow`'s control_seed), one per image:
    controls drawn alike for every image would be one draw for the whole dataset.
    sign_agreement=False leaves `ConflictStatistics.sign_agreement` None (dataset statistics do not use it)."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    ground_truths = list(ground_truths) if ground_truths is not None else [None] * images.shape[0]
    if controls and (control_seeds is None or len(control_seeds) != images.shape[0]):
        raise ValueError(f"controls need one control seed per image: got {control_seeds!r} for "
                         f"{images.shape[0]} image(s)")
    seeds = list(control_seeds) if controls else [None] * images.shape[0]
    batched = _decompose_batch(
        model, images, objectives, counterfactual, through_offsets=through_offsets,
        control_weights=(lambda weights: control_weight_maps(weights, seeds)) if controls else None)
    thresholds = {"significance": significance, "active_fraction": active_fraction,
                  "cosine_threshold": cosine_threshold, "sign_agreement": sign_agreement}
    return _flows_of(model, batched, objectives, ground_truths, int(images.shape[-1]), thresholds, controls=controls,
                     control_seeds=seeds, sweep=sweep)


SWEPT = ("learned", *CONTROLS)  # the weights a threshold sweep measures


def _flows_of(model: nn.Module, batched: GradientDecomposition, objectives, ground_truths, size: int,
              thresholds: dict, *, controls: bool, control_seeds: list, sweep: tuple) -> list[GradientFlow]:
    """The statistics of a batch's decomposition (`_decompose_batch`), one `GradientFlow` per image.

    Each statistic is computed for the whole batch at once (per source and set of weights, one set of channel
    products, `TermProducts`, measured at every threshold asked for); every image's numbers are its own."""
    significance, active_fraction = thresholds["significance"], thresholds["active_fraction"]
    cosine_threshold, agreement = thresholds["cosine_threshold"], thresholds["sign_agreement"]
    value = batched.value
    terms_of = {"learned": value}
    if controls:
        terms_of.update(batched.controls)
        terms_of["with_weight_branch"] = [[value[l][k] + batched.weight_branch[l][k] for k in range(3)]
                                          for l in range(3)]
    products = {name: [TermProducts.of(torch.stack([terms[l][k].cpu() for l in range(3)], dim=1),
                                       sign_agreement=agreement) for k in range(3)]
                for name, terms in terms_of.items()}

    def conflicts(name: str, significance: float = significance, cosine: float = cosine_threshold) -> list:
        """Per image, the 3 sources' ConflictStatistics of the terms `name`."""
        return _per_image([p.statistics(significance, active_fraction, cosine) for p in products[name]])

    value_norm, weight_norm = _frobenius_norms(value), _frobenius_norms(batched.weight_branch)
    weight_branch_maps = [[_norm_maps(batched.weight_branch[l][k]) for k in range(3)] for l in range(3)]
    paths = {name: ([_norm_maps(g) for g in getattr(batched, name)], _frobenius_norms([getattr(batched, name)])[:, 0])
             for name in ("fusion_total", "neck_path", "total")}
    weights = [w.float().cpu().numpy() for w in batched.weights]
    flows = []
    for i, (objective, ground_truth, conflict) in enumerate(zip(objectives, ground_truths, conflicts("learned"),
                                                                strict=True)):
        flow = GradientFlow(
            objective=objective.describe() if hasattr(objective, "describe") else repr(objective),
            objective_value=float(batched.objective_value[i]),
            counterfactual=batched.counterfactual.to_dict(),
            matrix=value_norm[i], weight_branch_matrix=weight_norm[i],
            maps=[[conflict[k].norms[l] for k in range(3)] for l in range(3)],  # = channel norms of the terms
            weight_branch_maps=[[maps[i] for maps in row] for row in weight_branch_maps],
            fusion_total_maps=[maps[i] for maps in paths["fusion_total"][0]],
            neck_path_maps=[maps[i] for maps in paths["neck_path"][0]],
            total_maps=[maps[i] for maps in paths["total"][0]],
            fusion_total_norms=paths["fusion_total"][1][i], neck_path_norms=paths["neck_path"][1][i],
            total_norms=paths["total"][1][i],
            conflict=conflict, conflict_rate=np.array([c.rate for c in conflict]),
            overall_conflict_rate=_overall_rate(conflict),
            weights=[w[i] for w in weights], strides=tuple(model.strides),
        )
        if ground_truth is None and isinstance(objective, TrainingLoss):
            ground_truth = objective.batched_labels()[0].numpy()
        if ground_truth is not None:
            positives, background = ground_truth_cells(np.asarray(ground_truth, dtype=np.float64), model.config, size)
            flow.positives, flow.background = positives, background
            flow.positives_at_source, flow.background_at_source = [], []
            for source in range(3):
                shape = flow.maps[0][source].shape
                flow.positives_at_source.append(np.stack([resample_mask(p, shape) for p in positives]))
                flow.background_at_source.append(np.stack([resample_mask(b, shape) for b in background]))
            flow.conflict_rate_at_objects = _rates_at_objects(conflict, flow.positives_at_source)
        flows.append(flow)
    if not controls:
        return flows
    # The controls (see `ALL_CONTROLS`): each the learned flow with the control's conflict statistics, at the
    # learned thresholds, so that each difference is the weights' alone.
    control_conflicts = {name: conflicts(name) for name in (*batched.controls, "with_weight_branch")}
    control_conflicts["random"] = _random_direction_conflicts(
        flows, [term.shape[1] for term in value[0]], control_seeds, significance, active_fraction, cosine_threshold)
    for i, flow in enumerate(flows):
        flow.controls = {name: _flow_with_conflict(flow, control_conflicts[name][i]) for name in ALL_CONTROLS}
    for swept_significance, swept_cosine in sweep:
        for name in SWEPT:
            swept = conflicts(name, swept_significance, swept_cosine)
            for flow, conflict in zip(flows, swept, strict=True):
                flow.sweep[(name, float(swept_significance), float(swept_cosine))] = _flow_with_conflict(flow, conflict)
    return flows


def _per_image(per_source: list) -> list:
    """[source][image] -> [image][source]."""
    return [list(statistics) for statistics in zip(*per_source, strict=True)]


def _frobenius_norms(terms: list) -> np.ndarray:
    """[l][k] tensors (B, ...) -> (B, rows, columns) float64 norm of each image's term."""
    return np.stack([[[float(term[i].double().norm()) for term in row] for row in terms]
                     for i in range(len(terms[0][0]))])


def _norm_maps(tensor: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) -> (B, H, W) float32 norm over channels, per location."""
    return tensor.detach().double().norm(dim=1).float().cpu().numpy()


def _random_direction_conflicts(flows: list, channels: list, control_seeds: list, significance: float,
                                active_fraction: float, cosine_threshold: float) -> list:
    """Per image, the 3 sources' conflict statistics of the "random" control: the learned terms' norms, in
    uniformly random directions of each source's `channels`, drawn from the image's own generator (the same draws
    in any batch)."""
    grams = []
    for flow, seed in zip(flows, control_seeds, strict=True):
        generator = control_generator(seed, "random")
        grams.append([random_direction_gram(torch.from_numpy(flow.conflict[source].norms),
                                            channels[source], generator) for source in range(3)])
    per_source = []
    for source in range(3):
        gram = torch.stack([image_grams[source] for image_grams in grams])
        per_source.append(TermProducts(gram, gram.sum(dim=(1, 2)).clamp(min=0).sqrt()).statistics(
            significance, active_fraction, cosine_threshold))
    return _per_image(per_source)


def _overall_rate(conflict: list) -> float:
    """Conflicting over active locations of all sources (NaN when nothing is active: 0 of 0 is not 0 %)."""
    active_total = sum(int(c.active.sum()) for c in conflict)
    return sum(int(c.conflicting.sum()) for c in conflict) / active_total if active_total else math.nan


def _flow_with_conflict(flow: GradientFlow, conflict: list) -> GradientFlow:
    """`flow` with other conflict statistics (one per source), and the maps and rates that follow from them."""
    overall = _overall_rate(conflict)
    result = replace(flow, conflict=conflict, conflict_rate=np.array([c.rate for c in conflict]),
                     overall_conflict_rate=overall, controls={}, sweep={},
                     maps=[[conflict[k].norms[l] for k in range(3)] for l in range(3)])
    if flow.positives_at_source is not None:
        result.conflict_rate_at_objects = _rates_at_objects(conflict, flow.positives_at_source)
    return result


def _rates_at_objects(conflict: list, positives_at_source: list) -> np.ndarray:
    """(3,) conflict rate among the active locations of each source that are a positive of some level."""
    rates = []
    for source, statistics in enumerate(conflict):
        objects = np.asarray(positives_at_source[source]).any(axis=0) & statistics.active
        rates.append(float((statistics.conflicting & objects).sum() / objects.sum()) if objects.any() else math.nan)
    return np.array(rates)


def compare_with_uniform(model: nn.Module, image_tensor: torch.Tensor, objective, **kwargs
                         ) -> tuple[GradientFlow, GradientFlow]:
    """(learned, uniform) gradient flows of the same image and objective: the paper's comparison."""
    return (gradient_flow(model, image_tensor, objective, None, **kwargs),
            gradient_flow(model, image_tensor, objective, "uniform", **kwargs))
