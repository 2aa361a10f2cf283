"""Controls for the conflict metric: fusion weights that keep the learned weights' statistics but not their
placement (shuffled, rolled), plain uniform weights, and random gradient directions. A conflict rate means
something only next to what these give."""

from __future__ import annotations

import numpy as np
import torch

# Controls of the conflict metric, each computed from the same backward pass as the learned weights (the same
# upstream gradient dO/dy^l, only the weights of the value path changed):
#   shuffled: each level's learned weight vectors moved to random locations (same distribution, no spatial
#             targeting); rolled: the sources permuted, alpha_k <- alpha_{k+1} (same peakedness at every
#             location, other sources); uniform: 1/3 everywhere (the plain sum's directions).
# Two more are computed from the learned terms: random: each term's direction replaced by a random one of the
# same norm (the null of cosines; sampled through its Gram matrix, `random_direction_gram`); with_weight_branch:
# value + weight-branch terms (the whole fusion gradient).
CONTROLS = ("shuffled", "rolled", "uniform")


ALL_CONTROLS = (*CONTROLS, "random", "with_weight_branch")


# The seed of one image's control draws: an int, or a tuple of ints such as (run seed, image id). Every image
# needs its own draws: controls shared by all images are one draw, whose randomness the paired bootstrap over
# images cannot see, so their intervals would be too narrow (`image_control_seed`).
ControlSeed = int | tuple


def image_control_seed(seed: int, image_sha256: str) -> tuple[int, int]:
    """The control seed of an image in a run seeded by `seed`: its own, and the same in any batch or order."""
    return int(seed), int(image_sha256[:16], 16)


def control_generator(seed: ControlSeed, stream: str) -> np.random.Generator:
    """The generator of one image's draws for one control ("shuffled" or "random"): independent streams."""
    entropy = [int(value) for value in seed] if isinstance(seed, tuple) else [int(seed)]
    return np.random.default_rng([*entropy, ("shuffled", "random").index(stream)])


def control_weight_maps(weights: list, seeds: list) -> dict[str, list]:
    """The control weights of `CONTROLS` for 3 weight tensors (B, 3, H_l, W_l), image i's shuffle drawn from
    seeds[i] (a `ControlSeed`), so reproducible and independent between images."""
    batch = weights[0].shape[0]
    if len(seeds) != batch:
        raise ValueError(f"one control seed per image: {len(seeds)} seeds for {batch} images")
    generators = [control_generator(seed, "shuffled") for seed in seeds]
    shuffled, rolled, uniform = [], [], []
    for level_weights in weights:
        height, width = level_weights.shape[-2:]
        orders = torch.from_numpy(np.stack([generator.permutation(height * width) for generator in generators]))
        index = orders.to(level_weights.device)[:, None, :].expand(-1, level_weights.shape[1], -1)
        shuffled.append(level_weights.flatten(2).gather(2, index).reshape(level_weights.shape))
        rolled.append(level_weights.roll(-1, dims=1))
        uniform.append(torch.full_like(level_weights, 1.0 / 3.0))
    return {"shuffled": shuffled, "rolled": rolled, "uniform": uniform}


def random_direction_gram(norms: torch.Tensor, channels: int, generator: np.random.Generator) -> torch.Tensor:
    """(L, H, W) per-location norms of L terms in `channels` dimensions -> the (L, L, H, W) float64 Gram matrix of
    terms with these norms in independent, uniformly random directions: sampled exactly, without the vectors.

    The Gram matrix of L independent standard normal vectors in C dimensions is Wishart(C, I_L); by Bartlett's
    decomposition it is B B^T with B lower triangular, B_ii^2 ~ chi^2(C - i) and B_ij ~ N(0, 1) below the
    diagonal. Scaled to a unit diagonal it holds the cosines of L uniformly random directions. This costs L(L+1)/2
    draws per location instead of L * C (and the channel products of the vectors).
    """
    count, shape = norms.shape[0], tuple(norms.shape[1:])
    if channels >= count:
        lower = np.zeros((count, count, *shape))
        for row in range(count):
            lower[row, row] = np.sqrt(generator.chisquare(channels - row, size=shape))
            lower[row, :row] = generator.standard_normal((row, *shape))
        gram = np.einsum("ai...,bi...->ab...", lower, lower)
    else:  # fewer channels than terms (a Wishart matrix of rank C): the vectors themselves are as cheap
        vectors = generator.standard_normal((count, channels, *shape))
        gram = np.einsum("ac...,bc...->ab...", vectors, vectors)
    gram = torch.from_numpy(gram)
    lengths = gram.diagonal(dim1=0, dim2=1).movedim(-1, 0).sqrt()  # (L, H, W), > 0 almost surely
    scale = norms.double() / lengths.clamp(min=torch.finfo(torch.float64).tiny)
    return gram * scale.unsqueeze(0) * scale.unsqueeze(1)
