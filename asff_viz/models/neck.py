"""The YOLOv3 top-down neck with SPP (official `module_list[11..32]`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SPP, ConvBNAct, DropBlock, ResidualStack
from .config import ModelConfig


class YOLOv3Neck(nn.Module):
    """Top-down path from Darknet stages to three pyramid features.

    Input: the backbone dict (dark3 /8, dark4 /16, dark5 /32). Output: [x0 (B, 512w, H/32, W/32),
    x1 (B, 256w, H/16, W/16), x2 (B, 256w, H/8, W/8)], level 0 first. x0 and x1 are 1x1-compressed features,
    x2 is the output of a 3x3 conv, exactly as the official ASFF model feeds its fusion modules.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.channels
        self.level0 = nn.Sequential(
            ResidualStack(c(1024), 1, shortcut=False),
            ConvBNAct(c(1024), c(512), 1),
            SPP(),
            ConvBNAct(c(2048), c(512), 1),
            ConvBNAct(c(512), c(1024), 3),
            DropBlock(),
            ConvBNAct(c(1024), c(512), 1),
        )
        self.lateral1 = ConvBNAct(c(512), c(256), 1)
        self.level1 = nn.Sequential(
            ConvBNAct(c(256) + c(512), c(256), 1),
            ConvBNAct(c(256), c(512), 3),
            DropBlock(),
            ResidualStack(c(512), 1, shortcut=False),
            ConvBNAct(c(512), c(256), 1),
        )
        self.lateral2 = ConvBNAct(c(256), c(128), 1)
        self.level2 = nn.Sequential(
            ConvBNAct(c(128) + c(256), c(128), 1),
            ConvBNAct(c(128), c(256), 3),
            DropBlock(),
            ResidualStack(c(256), 1, shortcut=False),
            ConvBNAct(c(256), c(128), 1),
            ConvBNAct(c(128), c(256), 3),
        )
        self.out_channels = (c(512), c(256), c(256))

    def forward(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        x0 = self.level0(features["dark5"])
        up = F.interpolate(self.lateral1(x0), scale_factor=2, mode="nearest")
        x1 = self.level1(torch.cat((up, features["dark4"]), dim=1))
        up = F.interpolate(self.lateral2(x1), scale_factor=2, mode="nearest")
        x2 = self.level2(torch.cat((up, features["dark3"]), dim=1))
        return [x0, x1, x2]

    def dropblocks(self) -> list[DropBlock]:
        return [m for m in self.modules() if isinstance(m, DropBlock)]


def build_neck(config: ModelConfig) -> YOLOv3Neck:
    return YOLOv3Neck(config)
