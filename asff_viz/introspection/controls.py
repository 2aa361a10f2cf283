"""Controls for the conflict metric: fusion weights that keep the learned weights' statistics but not their
placement (shuffled, rolled), plain uniform weights, and random gradient directions. A conflict rate means
something only next to what these give."""

from __future__ import annotations

import torch

# Controls of the conflict metric, each computed from the same backward pass as the learned weights (the same
# upstream gradient dO/dy^l, only the weights of the value path changed):
#   shuffled: each level's learned weight vectors moved to random locations (same distribution, no spatial
#             targeting); rolled: the sources permuted, alpha_k <- alpha_{k+1} (same peakedness at every
#             location, other sources); uniform: 1/3 everywhere (the plain sum's directions).
# Two more are computed from the learned terms: random: each term's direction replaced by a random one of the
# same norm (the null of cosines); with_weight_branch: value + weight-branch terms (the whole fusion gradient).
CONTROLS = ("shuffled", "rolled", "uniform")


ALL_CONTROLS = (*CONTROLS, "random", "with_weight_branch")


def control_weight_maps(weights: list, seed: int = 0) -> dict[str, list]:
    """The control weights of `CONTROLS` for 3 weight tensors (B, 3, H_l, W_l); seeded, so reproducible."""
    generator = torch.Generator().manual_seed(seed)
    shuffled, rolled, uniform = [], [], []
    for level_weights in weights:
        height, width = level_weights.shape[-2:]
        order = torch.randperm(height * width, generator=generator).to(level_weights.device)
        shuffled.append(level_weights.flatten(2)[:, :, order].reshape(level_weights.shape))
        rolled.append(level_weights.roll(-1, dims=1))
        uniform.append(torch.full_like(level_weights, 1.0 / 3.0))
    return {"shuffled": shuffled, "rolled": rolled, "uniform": uniform}


def random_direction_terms(terms: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(L, C, H, W) terms -> terms of the same per-location norms in random (isotropic) directions."""
    noise = torch.randn(terms.shape, generator=generator, dtype=torch.float64).to(terms.device)
    noise = noise / noise.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return noise * terms.double().norm(dim=1, keepdim=True)
