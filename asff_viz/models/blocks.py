"""Building blocks shared by the backbones, neck and fusion: conv-BN-activation, residual stacks, SPP, DropBlock."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def activation(kind: str) -> nn.Module:
    """"leaky": LeakyReLU(0.1) (Darknet-53 models); "relu6": ReLU6 (MobileNetV2 models)."""
    if kind == "leaky":
        return nn.LeakyReLU(0.1)
    if kind == "relu6":
        return nn.ReLU6()
    raise ValueError(f"activation must be 'leaky' or 'relu6', got {kind!r}")


class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm + activation: the official `add_conv` (LeakyReLU 0.1, or ReLU6 with
    `leaky=False`) and torchvision's `ConvBNReLU` (ReLU6, optional groups), padding (k - 1) // 2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                 act: str = "leaky", groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 halving conv then 3x3 restoring conv, with an optional residual add (no activation after it).

    `in_channels` other than `channels` (no shortcut then) gives the MobileNetV2 neck's `ressepblock`, e.g.
    1280 -> 512 -> 1024.
    """

    def __init__(self, channels: int, shortcut: bool = True, *, act: str = "leaky",
                 in_channels: int | None = None) -> None:
        super().__init__()
        in_channels = channels if in_channels is None else in_channels
        if shortcut and in_channels != channels:
            raise ValueError("a residual bottleneck needs as many input as output channels")
        self.reduce = ConvBNAct(in_channels, channels // 2, 1, act=act)
        self.expand = ConvBNAct(channels // 2, channels, 3, act=act)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.reduce(x))
        return x + out if self.shortcut else out


class ResidualStack(nn.Module):
    """`num_blocks` bottlenecks in sequence: the official `resblock`."""

    def __init__(self, channels: int, num_blocks: int, shortcut: bool = True, *, act: str = "leaky",
                 in_channels: int | None = None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Bottleneck(channels, shortcut, act=act, in_channels=in_channels if i == 0
                                                 else None) for i in range(num_blocks)))

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
