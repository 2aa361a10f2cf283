"""Darknet-53 with named stages that declare their channels and stride; `build_backbone` picks the family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import ConvBNAct, ResidualStack
from .config import ModelConfig


@dataclass(frozen=True)
class FeatureInfo:
    """What a stage outputs: its module name, channels and cumulative stride."""

    name: str
    channels: int
    stride: int


class Stage(nn.Module):
    """A stride-2 3x3 conv that doubles the channels, then a stack of residual bottlenecks."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int) -> None:
        super().__init__()
        self.downsample = ConvBNAct(in_channels, out_channels, 3, 2)
        self.residual = ResidualStack(out_channels, num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(self.downsample(x))


class Darknet53(nn.Module):
    """Darknet-53: a 3x3 stem then five stages (64, 128, 256, 512, 1024 channels; 1, 2, 8, 8, 4 blocks).

    `forward` returns [dark3 (B, 256w, H/8, W/8), dark4 (B, 512w, H/16, W/16), dark5 (B, 1024w, H/32, W/32)]
    (the order of `feature_info`: stride 8, 16, 32), with w the width multiplier.
    """

    STAGES = (("dark1", 64, 1), ("dark2", 128, 2), ("dark3", 256, 8), ("dark4", 512, 8), ("dark5", 1024, 4))
    OUTPUTS = ("dark3", "dark4", "dark5")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        stem_channels = config.channels(32)
        self.stem = ConvBNAct(3, stem_channels, 3, 1)
        in_channels, stride = stem_channels, 1
        self.feature_info: list[FeatureInfo] = []
        for name, base_channels, base_blocks in self.STAGES:
            out_channels = config.channels(base_channels)
            self.add_module(name, Stage(in_channels, out_channels, config.blocks(base_blocks)))
            in_channels, stride = out_channels, stride * 2
            if name in self.OUTPUTS:
                self.feature_info.append(FeatureInfo(f"backbone.{name}", out_channels, stride))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for name, _, _ in self.STAGES:
            x = getattr(self, name)(x)
            if name in self.OUTPUTS:
                outputs.append(x)
        return outputs

    def conv_layers(self) -> list[ConvBNAct]:
        """The 52 conv-BN units in Darknet's file order (stem, then per stage: downsample, bottlenecks)."""
        return [m for m in self.modules() if isinstance(m, ConvBNAct)]


def build_backbone(config: ModelConfig) -> nn.Module:
    """The backbone `config.backbone` names; each declares its outputs in `feature_info` (stride 8, 16, 32)."""
    if config.backbone == "mobilenet_v2":
        from .mobilenet import MobileNetV2

        return MobileNetV2(config)
    return Darknet53(config)
