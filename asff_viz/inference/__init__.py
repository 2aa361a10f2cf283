"""Inference: the `Detector` (pre-processing, forward, decoding, NMS), the letterbox transform, the fast paths
(channels-last, fused BN, bf16, compile) and COCO evaluation."""

from .detector import DetectionResult, Detector

__all__ = ["DetectionResult", "Detector"]
