"""Adaptively spatial feature fusion (ASFF) and the ablation fusions it is compared with.

Every level l gets all three neck features, resizes them to its own resolution and channel count
(`resize[k]` maps source k to level l), and combines them. In ASFF mode the combination is a per-pixel
softmax over the three sources: y^l = sum_k alpha^l_k * R_{k->l}(x^k), with the weights alpha^l the output of
the named `softmax` submodule, (B, 3, H_l, W_l), channel k for source k. `fused` (an identity) marks the fused
map before the `expand` conv, so hooks can observe it without any flag in `forward`.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNAct
from .config import ModelConfig


def _resize_paths(level: int, in_channels: tuple[int, int, int], act: str) -> nn.ModuleList:
    """Official resizing: stride-2 3x3 convs (plus a max pool for 4x) down, 1x1 compress + nearest up."""
    target = in_channels[level]
    if level == 0:
        paths = [
            nn.Identity(),
            ConvBNAct(in_channels[1], target, 3, 2, act=act),
            nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), ConvBNAct(in_channels[2], target, 3, 2, act=act)),
        ]
    elif level == 1:
        paths = [
            nn.Sequential(ConvBNAct(in_channels[0], target, 1, act=act), nn.Upsample(scale_factor=2, mode="nearest")),
            nn.Identity(),
            ConvBNAct(in_channels[2], target, 3, 2, act=act),
        ]
    elif level == 2:
        # In the Darknet model source 1 already has level 2's channel count and is upsampled with no compress
        # conv; in the MobileNetV2 model (ASFFmobile) it has twice as many and gets `compress_level_1` first.
        upsample = nn.Upsample(scale_factor=2, mode="nearest")
        paths = [
            nn.Sequential(ConvBNAct(in_channels[0], target, 1, act=act), nn.Upsample(scale_factor=4, mode="nearest")),
            (upsample if in_channels[1] == target
             else nn.Sequential(ConvBNAct(in_channels[1], target, 1, act=act), upsample)),
            nn.Identity(),
        ]
    else:
        raise ValueError(f"level must be 0, 1 or 2, got {level}")
    return nn.ModuleList(paths)


class FastNormalizedWeights(nn.Module):
    """BiFPN's fast normalized fusion weights (Tan et al., EfficientDet, 2020): w_k = relu(p_k) / (eps + sum_j
    relu(p_j)) of one learned scalar p_k per source, broadcast to (B, 3, H, W) so that observers see the same
    shape as ASFF's per-pixel weights (here constant over the map)."""

    def __init__(self, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        weights = torch.relu(raw)
        weights = weights / (self.eps + weights.sum())
        return weights.to(like.dtype).view(1, 3, 1, 1).expand(like.shape[0], 3, *like.shape[2:])


class LevelFusion(nn.Module):
    """Fusion into one pyramid level: `mode` 'asff' (learned per-pixel softmax weights), 'weighted' (learned
    per-source scalars, BiFPN's fast normalized fusion), 'sum' or 'concat'.

    Input: [x0, x1, x2] neck features. Output: (B, out_channels, H_l, W_l). The weights of 'asff' are the output of
    `softmax`, those of 'weighted' of `normalize` (`weights_module` names whichever there is).
    """

    def __init__(self, level: int, in_channels: tuple[int, int, int], out_channels: int, mode: str,
                 compress_channels: int, act: str = "leaky") -> None:
        super().__init__()
        self.level, self.mode = level, mode
        inter = in_channels[level]
        self.resize = _resize_paths(level, in_channels, act)
        if mode == "asff":
            self.weight_convs = nn.ModuleList(ConvBNAct(inter, compress_channels, 1, act=act) for _ in range(3))
            self.weight_logits = nn.Conv2d(3 * compress_channels, 3, 1)
            self.softmax = nn.Softmax(dim=1)
        elif mode == "weighted":
            self.source_weights = nn.Parameter(torch.ones(3))  # EfficientDet initialises them to 1
            self.normalize = FastNormalizedWeights()
        elif mode == "concat":
            self.project = ConvBNAct(3 * inter, inter, 1, act=act)
        elif mode != "sum":
            raise ValueError(f"unknown fusion mode {mode!r}")
        self.fused = nn.Identity()
        self.expand = ConvBNAct(inter, out_channels, 3, act=act)

    @property
    def weights_module(self) -> nn.Module | None:
        """The module whose output is this level's fusion weights (B, 3, H_l, W_l), or None (sum, concat)."""
        return getattr(self, "softmax", None) or getattr(self, "normalize", None)

    def _weights(self, resized: list[torch.Tensor]) -> torch.Tensor | None:
        """(B, 3, H_l, W_l) fusion weights: ASFF's per-pixel softmax, the weighted mode's scalars (flat over the
        map), or None (sum, concat)."""
        if self.mode == "asff":
            logits = self.weight_logits(
                torch.cat([conv(r) for conv, r in zip(self.weight_convs, resized, strict=True)], 1))
            return self.softmax(logits)
        if self.mode == "weighted":
            return self.normalize(self.source_weights, resized[0])
        return None

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        resized = [path(x) for path, x in zip(self.resize, features, strict=True)]
        weights = self._weights(resized)
        if weights is not None:
            fused = resized[0] * weights[:, 0:1] + resized[1] * weights[:, 1:2] + resized[2] * weights[:, 2:3]
        elif self.mode == "sum":
            fused = resized[0] + resized[1] + resized[2]
        else:
            fused = self.project(torch.cat(resized, dim=1))
        return self.expand(self.fused(fused))


class BaselineLevel(nn.Module):
    """No fusion: the official YOLOv3 baseline's 3x3 pre-head conv (none at stride 8, where the neck ends in one)."""

    def __init__(self, level: int, in_channels: tuple[int, int, int], out_channels: int, act: str = "leaky") -> None:
        super().__init__()
        self.level = level
        channels = in_channels[level]
        self.expand = ConvBNAct(channels, out_channels, 3, act=act) if channels != out_channels else nn.Identity()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.expand(features[self.level])


class Fusion(nn.Module):
    """The three per-level fusions; `levels[0]` is stride 32. Returns [y0, y1, y2] head inputs."""

    def __init__(self, config: ModelConfig, in_channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.mode = config.fusion
        c = config.channels
        self.out_channels = (c(1024), c(512), c(256))
        act = config.activation
        if config.fusion == "baseline":
            levels = [BaselineLevel(l, in_channels, self.out_channels[l], act) for l in range(3)]
        else:
            levels = [LevelFusion(l, in_channels, self.out_channels[l], config.fusion,
                                  config.fusion_compress_channels, act) for l in range(3)]
        self.levels = nn.ModuleList(levels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [level(features) for level in self.levels]


def reset_fusion_weights(model: nn.Module) -> int:
    """Make every ASFF level fuse uniformly again: zero each `weight_logits` conv, so alpha = 1/3 everywhere.

    The weight convs before it keep their values and the weights are learned afresh from there: the way to ask
    whether a trained model's fusion pattern is re-learned or an accident of early training. Returns the number
    of levels reset; a model without ASFF weights is an error.
    """
    levels = [level for level in model.fusion.levels if getattr(level, "mode", None) == "asff"]
    if not levels:
        raise ValueError(f"this model fuses by {model.fusion.mode!r}; only an ASFF model has fusion weights to reset")
    with torch.no_grad():
        for level in levels:
            level.weight_logits.weight.zero_()
            level.weight_logits.bias.zero_()
    return len(levels)


def build_fusion(config: ModelConfig, in_channels: tuple[int, int, int]) -> Fusion:
    return Fusion(config, in_channels)
