"""The guided-anchor detection head (official `YOLOv3Head`): with deformable feature adaption (sep=False, the
Darknet models) or without (sep=True, the MobileNetV2 models)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .deform_conv import DeformConv2d

SLOTS = 4  # three anchor-based slots and one anchor-free slot per cell


class LevelOutput(NamedTuple):
    """Raw predictions of one pyramid level.

    prediction: (B, 4, 5 + C, H, W) logits tx, ty, tw, th, objectness, classes; slot 3 is anchor-free.
    anchor_logwh: (B, 4, 2, H, W) guided-anchor log(w, h), relative to the slot's base anchor.
    """

    prediction: torch.Tensor
    anchor_logwh: torch.Tensor


class RFB(nn.Module):
    """Receptive field block of ASFF*: four branches of plain biased convs (no BN, no activation), concatenated."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inter = channels // 4
        self.branch_0 = nn.Sequential(nn.Conv2d(channels, inter, 1))
        self.branch_1 = nn.Sequential(nn.Conv2d(channels, inter, 1), nn.Conv2d(inter, inter, 3, padding=1))
        self.branch_2 = nn.Sequential(
            nn.Conv2d(channels, inter, 1),
            nn.Conv2d(inter, inter, 3, padding=1),
            nn.Conv2d(inter, inter, 3, padding=2, dilation=2),
        )
        self.branch_3 = nn.Sequential(
            nn.Conv2d(channels, inter, 1),
            nn.Conv2d(inter, inter, 5, padding=2),
            nn.Conv2d(inter, inter, 3, padding=3, dilation=3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(x)], dim=1)


class FeatureAdaption(nn.Module):
    """Offsets from the (detached) guided-anchor shapes drive a 3x3 deformable conv over the features.

    Group g of `conv_offset` turns slot g's predicted (log w, log h) into the 18 offsets of deformable group g.
    No BN or activation follows the deformable conv.
    """

    def __init__(self, channels: int, rfb: bool = False) -> None:
        super().__init__()
        self.conv_offset = nn.Conv2d(2 * SLOTS, SLOTS * 2 * 9, 1, groups=SLOTS)
        self.dconv = DeformConv2d(channels, channels, 3, padding=1, groups=SLOTS)
        self.rfb = RFB(channels) if rfb else None

    def forward(self, x: torch.Tensor, anchor_logwh: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(anchor_logwh.detach())
        if self.rfb is not None:
            x = self.rfb(x)
        return self.dconv(x, offset)


class GuidedAnchorHead(nn.Module):
    """One level's head: guided anchor shapes, feature adaption, then the 1x1 prediction conv.

    Without `adaption` (the MobileNetV2 models' `sep=True` head, whose `Feature_adaption` returns its input)
    the prediction conv reads the features directly: `self.adaption` is None.
    """

    def __init__(self, in_channels: int, num_classes: int, rfb: bool = False, adaption: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.guide_wh = nn.Conv2d(in_channels, 2 * SLOTS, 1)
        self.adaption = FeatureAdaption(in_channels, rfb) if adaption else None
        self.predict = nn.Conv2d(in_channels, SLOTS * (5 + num_classes), 1)

    def forward(self, x: torch.Tensor) -> LevelOutput:
        batch, _, height, width = x.shape
        anchor_logwh = self.guide_wh(x)  # (B, 8, H, W)
        features = self.adaption(x, anchor_logwh) if self.adaption is not None else x
        prediction = self.predict(features)  # (B, 4 * (5 + C), H, W)
        return LevelOutput(
            prediction.view(batch, SLOTS, 5 + self.num_classes, height, width),
            anchor_logwh.view(batch, SLOTS, 2, height, width),
        )


class Head(nn.Module):
    """The three level heads; `levels[0]` is stride 32."""

    def __init__(self, in_channels: tuple[int, int, int], num_classes: int, rfb: bool = False,
                 adaption: bool = True) -> None:
        super().__init__()
        self.levels = nn.ModuleList(GuidedAnchorHead(c, num_classes, rfb, adaption) for c in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[LevelOutput]:
        return [head(x) for head, x in zip(self.levels, features, strict=True)]


def build_head(in_channels: tuple[int, int, int], num_classes: int, rfb: bool = False,
               adaption: bool = True) -> Head:
    return Head(in_channels, num_classes, rfb, adaption)
