"""The YOLOv3-ASFF network, one module per architectural part."""

from .backbone import Darknet53, FeatureInfo
from .deform_conv import DeformConv2d, deform_conv2d
from .detector import YOLOv3ASFF, build_model, decode_level, unwrap_model
from .fusion import Fusion, LevelFusion, reset_fusion_weights
from .head import SLOTS, GuidedAnchorHead, LevelOutput
from .neck import YOLOv3Neck

__all__ = [
    "SLOTS", "Darknet53", "DeformConv2d", "FeatureInfo", "Fusion", "GuidedAnchorHead", "LevelFusion",
    "LevelOutput", "YOLOv3ASFF", "YOLOv3Neck", "build_model", "decode_level", "deform_conv2d",
    "reset_fusion_weights", "unwrap_model",
]
