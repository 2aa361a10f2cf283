"""YOLOv3-ASFF composed from its parts, and the eval-time decode of its raw outputs."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import build_backbone
from .config import ModelConfig
from .fusion import Fusion, build_fusion
from .head import SLOTS, Head, LevelOutput, build_head
from .neck import YOLOv3Neck, build_neck


class YOLOv3ASFF(nn.Module):
    """YOLOv3 with adaptively spatial feature fusion (or an ablation fusion, see `ModelConfig.fusion`).

    Input: (B, 3, S, S) images, RGB, ImageNet-normalized, S a multiple of 32 (square, as the official code).
    `forward` returns the raw outputs, a list of three `LevelOutput`, level 0 (stride 32) first; the same in
    training and eval. `decode` turns them into boxes; loss and NMS live elsewhere.
    """

    def __init__(self, backbone: nn.Module, neck: YOLOv3Neck, fusion: Fusion, head: Head,
                 config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.strides = tuple(config.strides)
        self.backbone, self.neck, self.fusion, self.head = backbone, neck, fusion, head
        bases = []
        for level, mask in enumerate(config.anchor_masks):
            free = 4 * config.strides[level]  # the anchor-free slot's base size
            bases.append([list(config.anchors[i]) for i in mask] + [[free, free]])
        # Not persistent: the official checkpoints carry no anchors, and ours keep them in the config.
        self.register_buffer("anchor_bases", torch.tensor(bases, dtype=torch.float32), persistent=False)
        self.metadata: dict = {}

    def forward(self, images: torch.Tensor) -> list[LevelOutput]:
        return self.head(self.fusion(self.neck(self.backbone(images))))

    def base_anchors(self, level: int) -> torch.Tensor:
        """(4, 2) base (w, h) in input pixels of the level's slots: its three anchors, then 4 * stride."""
        return self.anchor_bases[level]

    def decode(self, outputs: list[LevelOutput]) -> torch.Tensor:
        """Raw outputs to (B, N, 5 + C): cx, cy, w, h in input pixels, objectness, class probabilities.

        Rows are level 0 (stride 32) first; inside a level (slot, row, col), as the official code orders them,
        N = 4 * sum_l H_l * W_l.
        """
        return torch.cat([decode_level(out, self.anchor_bases[level], self.strides[level])
                          for level, out in enumerate(outputs)], dim=1)

    def grid_sizes(self, image_size: int) -> list[tuple[int, int]]:
        """(H_l, W_l) of each level for a square input of `image_size` pixels."""
        return [(image_size // s, image_size // s) for s in self.strides]


def decode_level(output: LevelOutput, base_anchors: torch.Tensor, stride: int) -> torch.Tensor:
    """Decode one level: (B, 4, 5 + C, H, W) logits to (B, 4 * H * W, 5 + C) boxes in (slot, row, col) order."""
    prediction, anchor_logwh = output
    batch, slots, channels, height, width = prediction.shape
    prediction = prediction.float()
    anchor_wh = torch.exp(anchor_logwh.float()) * base_anchors.view(1, slots, 2, 1, 1)  # (B, 4, 2, H, W)
    cols = torch.arange(width, device=prediction.device, dtype=torch.float32).view(1, 1, 1, width)
    rows = torch.arange(height, device=prediction.device, dtype=torch.float32).view(1, 1, height, 1)
    center_x = (torch.sigmoid(prediction[:, :, 0]) + cols) * stride
    center_y = (torch.sigmoid(prediction[:, :, 1]) + rows) * stride
    size = torch.exp(prediction[:, :, 2:4]) * anchor_wh
    scores = torch.sigmoid(prediction[:, :, 4:])
    boxes = torch.cat((center_x.unsqueeze(2), center_y.unsqueeze(2), size, scores), dim=2)  # (B, 4, 5+C, H, W)
    return boxes.permute(0, 1, 3, 4, 2).reshape(batch, slots * height * width, channels)


def build_model(config: ModelConfig | None = None, **overrides) -> YOLOv3ASFF:
    """The model for `config` (official YOLOv3-ASFF, 80 classes, when None), with fields overridden by keyword."""
    if config is None:
        config = ModelConfig(**overrides)
    elif overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    backbone = build_backbone(config)
    neck = build_neck(config, tuple(info.channels for info in backbone.feature_info))
    fusion = build_fusion(config, neck.out_channels)
    head = build_head(fusion.out_channels, config.num_classes, config.rfb, config.feature_adaption)
    return YOLOv3ASFF(backbone, neck, fusion, head, config)


__all__ = ["SLOTS", "LevelOutput", "YOLOv3ASFF", "build_model", "decode_level"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
