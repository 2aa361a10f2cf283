"""MobileNetV2 (Sandler et al. 2018) as the backbone of the official light YOLOv3 models, in torchvision's form.

The official `models/yolov3_mobilev2.py` builds its backbone from torchvision's MobileNetV2 at width 1.0: a
3x3 stride-2 `ConvBNReLU` stem, 17 inverted residual blocks and a 1x1 `ConvBNReLU` to 1280 channels, ReLU6
everywhere. The neck takes three of its outputs: after block 6 (32 channels, stride 8), after block 13 (96,
stride 16) and the last (1280, stride 32). Here the parts have names (`stem`, `blocks[i]` with `expand`,
`depthwise`, `project`, `project_bn`, `last`); `models.official` maps the official (`module_list.N`) and
torchvision (`features.N`) keys onto them. `width` scales every channel count and `depth` the blocks per
group (at least one), as for Darknet-53, so that small models can be trained.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import FeatureInfo
from .blocks import ConvBNAct
from .config import ModelConfig

# (expansion t, channels c, blocks n, stride s) of each group, torchvision's `inverted_residual_setting`.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
ROUTE_GROUPS = (2, 4)  # the neck's stride-8 and stride-16 routes: the last blocks of these groups (32 and 96 ch)


class InvertedResidual(nn.Module):
    """1x1 expansion (absent when t = 1), 3x3 depthwise conv with the block's stride, linear 1x1 projection + BN;
    a residual add when the stride is 1 and the channels are unchanged."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.expand = ConvBNAct(in_channels, hidden, 1, act="relu6") if expansion != 1 else None
        self.depthwise = ConvBNAct(hidden, hidden, 3, stride, act="relu6", groups=hidden)
        self.project = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project_bn(self.project(self.depthwise(out)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """`forward` returns [stride 8 (B, 32w, S/8), stride 16 (B, 96w, S/16), stride 32 (B, 1280w, S/32)]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config.channels
        self.stem = ConvBNAct(3, c(32), 3, 2, act="relu6")
        blocks, routes, in_channels, stride = [], [], c(32), 2
        self.feature_info: list[FeatureInfo] = []
        for group, (expansion, channels, count, group_stride) in enumerate(SETTINGS):
            for index in range(config.blocks(count)):
                block_stride = group_stride if index == 0 else 1
                blocks.append(InvertedResidual(in_channels, c(channels), block_stride, expansion))
                in_channels, stride = c(channels), stride * block_stride
            if group in ROUTE_GROUPS:
                routes.append(len(blocks) - 1)
                self.feature_info.append(FeatureInfo(f"backbone.blocks.{len(blocks) - 1}", in_channels, stride))
        self.blocks = nn.ModuleList(blocks)
        self.last = ConvBNAct(in_channels, c(1280), 1, act="relu6")
        self.feature_info.append(FeatureInfo("backbone.last", c(1280), stride))
        self.routes = tuple(routes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.routes:
                outputs.append(x)
        outputs.append(self.last(x))
        return outputs
