"""Pure tensor operations on boxes: conversions, IoU, NMS."""

from .boxes import box_area, box_iou, cxcywh_to_xyxy, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh
from .nms import batched_nms, nms

__all__ = ["batched_nms", "box_area", "box_iou", "cxcywh_to_xyxy", "nms", "xywh_to_xyxy", "xyxy_to_cxcywh",
           "xyxy_to_xywh"]
