"""Model configuration: a small dataclass, saved into checkpoints as a plain dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The anchors of the released Darknet checkpoints. The 9th anchor is (121, 240), not YOLOv3's (373, 326):
# the official models were trained with it, so their box-size outputs only make sense with it.
OFFICIAL_ANCHORS: tuple[tuple[int, int], ...] = (
    (10, 13), (16, 30), (33, 23),
    (30, 61), (62, 45), (42, 119),
    (116, 90), (156, 198), (121, 240),
)
# The MobileNetV2 checkpoints were trained with the corrected 9th anchor, YOLOv3's (373, 326).
MOBILENET_ANCHORS: tuple[tuple[int, int], ...] = (*OFFICIAL_ANCHORS[:8], (373, 326))
FUSION_MODES = ("asff", "weighted", "sum", "concat", "baseline")
BACKBONES = ("darknet53", "mobilenet_v2")


@dataclass
class ModelConfig:
    """Architecture of a YOLOv3-ASFF model.

    Level 0 is stride 32 (coarsest), level 1 stride 16, level 2 stride 8, as in the official code.
    `width` scales every channel count and `depth` the number of residual blocks, so that tests and the
    embedded default can use small models; (1.0, 1.0) is the official network.

    `backbone` picks the family: "darknet53" (LeakyReLU 0.1, deformable feature adaption in the head, the
    released Darknet checkpoints' anchors) or "mobilenet_v2" (torchvision's MobileNetV2, ReLU6 everywhere, a
    head without feature adaption, the corrected 9th anchor; `models/mobilenet.py`). `anchors` left at None
    takes the family's.
    """

    num_classes: int = 80
    fusion: str = "asff"
    rfb: bool = False
    width: float = 1.0
    depth: float = 1.0
    compress_channels: int | None = None
    anchors: tuple[tuple[int, int], ...] | None = None
    anchor_masks: tuple[tuple[int, ...], ...] = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
    strides: tuple[int, ...] = (32, 16, 8)
    dropblock: bool = False
    backbone: str = "darknet53"

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.rfb and self.backbone != "darknet53":
            raise ValueError("rfb (ASFF*) is a Darknet-53 head option; the MobileNetV2 head has no feature adaption")
        if self.anchors is None:
            self.anchors = MOBILENET_ANCHORS if self.backbone == "mobilenet_v2" else OFFICIAL_ANCHORS
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.width <= 0 or self.depth <= 0:
            raise ValueError(f"width and depth must be positive, got {self.width}, {self.depth}")
        self.anchors = tuple(tuple(int(v) for v in a) for a in self.anchors)
        self.anchor_masks = tuple(tuple(int(v) for v in m) for m in self.anchor_masks)
        self.strides = tuple(int(s) for s in self.strides)

    @property
    def fusion_compress_channels(self) -> int:
        """Channels of each level's weight branch: 16 for ASFF, 8 for ASFF* (rfb), as officially."""
        if self.compress_channels is not None:
            return self.compress_channels
        return 8 if self.rfb else 16

    def channels(self, base: int) -> int:
        """`base` official channels scaled by `width`, kept a multiple of 8 so the 4 deformable groups split evenly."""
        if self.width == 1.0:
            return base
        return max(8, int(round(base * self.width / 8)) * 8)

    def blocks(self, base: int) -> int:
        """`base` official residual blocks scaled by `depth` (at least one)."""
        return max(1, int(round(base * self.depth)))

    @property
    def activation(self) -> str:
        """The units' activation: "leaky" (LeakyReLU 0.1, Darknet-53) or "relu6" (MobileNetV2)."""
        return "relu6" if self.backbone == "mobilenet_v2" else "leaky"

    @property
    def feature_adaption(self) -> bool:
        """Whether the head adapts its features with a deformable conv driven by the guided anchors (Darknet)."""
        return self.backbone == "darknet53"

    @property
    def variant(self) -> str:
        """Short name: 'asff', 'asff_rfb', 'baseline', 'sum', 'concat' (with '_rfb' when the RFB head is on),
        prefixed 'mobilenet_v2_' for the MobileNetV2 family."""
        name = self.fusion + ("_rfb" if self.rfb else "")
        return name if self.backbone == "darknet53" else f"{self.backbone}_{name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)
