"""The YOLOv3 top-down neck with SPP (official `module_list[11..32]`, MobileNetV2: `module_list[19..39]`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SPP, ConvBNAct, DropBlock, ResidualStack
from .config import ModelConfig


class YOLOv3Neck(nn.Module):
    """Top-down path from the backbone's three outputs to three pyramid features.

    Input: the backbone's [stride 8, stride 16, stride 32] features (`route_channels` channels). Output:
    [x0 (B, 512w, H/32, W/32), x1 (B, 256w, H/16, W/16), x2 (B, 256w or 128w, H/8, W/8)], level 0 first. x0 and
    x1 are 1x1-compressed features; x2 is, for Darknet-53, the output of a further 3x3 conv (256w channels) and,
    for MobileNetV2 (`module_list[19..39]`), the 1x1-compressed 128w features, exactly as the official models
    feed their fusion modules. `act` is the units' activation (LeakyReLU 0.1 or ReLU6).
    """

    def __init__(self, config: ModelConfig, route_channels: tuple[int, int, int]) -> None:
        super().__init__()
        c, act = config.channels, config.activation
        stride8, stride16, stride32 = route_channels
        self.level0 = nn.Sequential(
            ResidualStack(c(1024), 1, shortcut=False, act=act, in_channels=stride32),
            ConvBNAct(c(1024), c(512), 1, act=act),
            SPP(),
            ConvBNAct(c(2048), c(512), 1, act=act),
            ConvBNAct(c(512), c(1024), 3, act=act),
            DropBlock(),
            ConvBNAct(c(1024), c(512), 1, act=act),
        )
        self.lateral1 = ConvBNAct(c(512), c(256), 1, act=act)
        self.level1 = nn.Sequential(
            ConvBNAct(c(256) + stride16, c(256), 1, act=act),
            ConvBNAct(c(256), c(512), 3, act=act),
            DropBlock(),
            ResidualStack(c(512), 1, shortcut=False, act=act),
            ConvBNAct(c(512), c(256), 1, act=act),
        )
        self.lateral2 = ConvBNAct(c(256), c(128), 1, act=act)
        level2 = [
            ConvBNAct(c(128) + stride8, c(128), 1, act=act),
            ConvBNAct(c(128), c(256), 3, act=act),
            DropBlock(),
            ResidualStack(c(256), 1, shortcut=False, act=act),
            ConvBNAct(c(256), c(128), 1, act=act),
        ]
        if config.backbone == "darknet53":
            level2.append(ConvBNAct(c(128), c(256), 3, act=act))
        self.level2 = nn.Sequential(*level2)
        self.out_channels = (c(512), c(256), c(256) if config.backbone == "darknet53" else c(128))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        stride8, stride16, stride32 = features
        x0 = self.level0(stride32)
        up = F.interpolate(self.lateral1(x0), scale_factor=2, mode="nearest")
        x1 = self.level1(torch.cat((up, stride16), dim=1))
        up = F.interpolate(self.lateral2(x1), scale_factor=2, mode="nearest")
        x2 = self.level2(torch.cat((up, stride8), dim=1))
        return [x0, x1, x2]

    def dropblocks(self) -> list[DropBlock]:
        return [m for m in self.modules() if isinstance(m, DropBlock)]


def build_neck(config: ModelConfig, route_channels: tuple[int, int, int]) -> YOLOv3Neck:
    return YOLOv3Neck(config, route_channels)
