"""Building blocks shared by the backbone, neck and fusion: conv-BN-leaky, residual stacks, SPP, DropBlock."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm + LeakyReLU(0.1): the official `add_conv`, padding (k - 1) // 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 halving conv then 3x3 restoring conv, with an optional residual add (no activation after it)."""

    def __init__(self, channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.reduce = ConvBNAct(channels, channels // 2, 1)
        self.expand = ConvBNAct(channels // 2, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.reduce(x))
        return x + out if self.shortcut else out


class ResidualStack(nn.Module):
    """`num_blocks` bottlenecks in sequence: the official `resblock`."""

    def __init__(self, channels: int, num_blocks: int, shortcut: bool = True) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Bottleneck(channels, shortcut) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class SPP(nn.Module):
    """Spatial pyramid pooling: concat of x and its 5/9/13 stride-1 max pools, so 4x the channels."""

    def __init__(self, kernel_sizes: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        self.kernel_sizes = kernel_sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [F.max_pool2d(x, k, stride=1, padding=k // 2) for k in self.kernel_sizes]
        return torch.cat([x, *pooled], dim=1)


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018). Identity in eval mode or when `keep_prob == 1`, as officially built.

    Training code turns it on by setting `block_size` and `keep_prob` (the official schedule grows the block
    size over training). No parameters, so it never shows in a state_dict.
    """

    def __init__(self, block_size: int = 1, keep_prob: float = 1.0) -> None:
        super().__init__()
        self.block_size = block_size
        self.keep_prob = keep_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.keep_prob >= 1.0:
            return x
        height, width = x.shape[-2:]
        block = min(self.block_size, height, width)
        valid = (width - block + 1) * (height - block + 1)
        gamma = (1.0 - self.keep_prob) / block**2 * (width * height) / max(valid, 1)
        seeds = (torch.rand_like(x) < gamma).to(x.dtype)
        mask = 1.0 - F.max_pool2d(seeds, block, stride=1, padding=block // 2)[..., :height, :width]
        return x * mask * (mask.numel() / mask.sum().clamp(min=1.0))
