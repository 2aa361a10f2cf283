"""Detection on whole images: load a model once, then image (path or RGB array) -> boxes in original pixels.

    detector = Detector("yolov3_asff.pth", size=608)
    result = detector("street.jpg")
    result.boxes            # (K, 4) xyxy, original-image pixels
    result.to_records("street.jpg")

The pipeline is the official evaluation's: plain square resize to `size` (no letterbox), ImageNet
normalization, forward, decode, score = objectness x best class probability >= conf_threshold, per-class NMS,
boxes scaled back to the original image with no clipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..checkpoint import OFFICIAL_INPUT_SIZE, load_model
from ..data.class_names import COCO_CATEGORY_IDS, COCO_CLASSES
from ..ops.boxes import xyxy_to_xywh
from .postprocess import DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD, Detections, postprocess
from .transforms import ImageTransform, preprocess, read_image

ImageInput = str | os.PathLike | np.ndarray


@dataclass
class DetectionResult:
    """Detections of one image.

    boxes: (K, 4) float32 xyxy in original-image pixels (not clipped to the image, as officially);
    scores: (K,) objectness x best class probability, decreasing; labels: (K,) int64 class indices;
    class_names: K names, one per box; category_ids: K dataset category ids, one per box (see `Detector`).
    detections: the same boxes in input pixels (the `size` x `size` network input) with objectness, class
    confidence and `indices`, the rows of `decoded` that produced them (see
    `asff_viz.inference.postprocess.row_location`).
    transform: the resize geometry; decoded: (N, 5 + C) every decoded row of this image (cx, cy, w, h in input
    pixels, sigmoid objectness, sigmoid class probabilities), level 0 first, (slot, row, col) inside a level.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    detections: Detections
    transform: ImageTransform
    decoded: torch.Tensor
    category_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_records(self, image_name: str, **extra) -> list[dict]:
        """One JSON-ready dict per box: {image, bbox [x, y, w, h] original pixels, score, category_id,
        category_name}, plus any `extra` entries (e.g. frame=12) in every record."""
        boxes = xyxy_to_xywh(self.boxes).tolist()
        category_ids = self.category_ids or [int(label) for label in self.labels.tolist()]
        rows = zip(boxes, self.scores.tolist(), category_ids, self.class_names, strict=True)
        return [
            {"image": image_name, **extra, "bbox": [float(v) for v in box], "score": float(score),
             "category_id": int(category_id), "category_name": name}
            for box, score, category_id, name in rows
        ]


class Detector:
    """A loaded model plus the pre- and post-processing to run it on images.

    Args:
        weights: a checkpoint path (official ASFF or asff_viz), None for the embedded default model, or an
            already built model (an `nn.Module` returning `LevelOutput`s, with a `metadata` dict).
        device: where the network runs; results are returned on the CPU.
        size: square network input in pixels, a multiple of 32; default the checkpoint's `input_size`.
        conf_threshold: keep boxes whose objectness x class probability is at least this.
        nms_threshold: per-class NMS IoU threshold.

    Category ids: the checkpoint's `metadata["category_ids"]` when present, the COCO ids when the class
    names are COCO's 80, else the class index.
    """

    def __init__(self, weights: str | os.PathLike | nn.Module | None = None, *, device: str | torch.device = "cpu",
                 size: int | None = None, conf_threshold: float = DISPLAY_CONF_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'.")
        if isinstance(weights, nn.Module):
            model = weights.to(self.device).eval()
        else:
            model = load_model(weights, device=self.device)
        self.model = model
        self.metadata: dict = dict(getattr(model, "metadata", None) or {})
        self.size = int(size if size is not None else self.metadata.get("input_size", OFFICIAL_INPUT_SIZE))
        if self.size <= 0 or self.size % 32:
            raise ValueError(f"input size must be a positive multiple of 32, got {self.size}")
        if not 0.0 <= conf_threshold <= 1.0 or not 0.0 <= nms_threshold <= 1.0:
            raise ValueError(f"thresholds must lie in [0, 1], got conf {conf_threshold}, nms {nms_threshold}")
        self.conf_threshold, self.nms_threshold = float(conf_threshold), float(nms_threshold)
        num_classes = model.num_classes
        self.class_names = [str(name) for name in
                            (self.metadata.get("class_names") or [f"class_{i}" for i in range(num_classes)])]
        if len(self.class_names) != num_classes:
            raise ValueError(f"the model predicts {num_classes} classes but its metadata names "
                             f"{len(self.class_names)}")
        self.category_ids = _category_ids(self.metadata, self.class_names)

    def __call__(self, image: ImageInput) -> DetectionResult:
        """Detect objects in one image: a file path, or an RGB uint8 (H, W, 3) array."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Iterable[ImageInput], batch_size: int = 8) -> list[DetectionResult]:
        """Detect objects in several images (paths or RGB arrays, any sizes), `batch_size` per forward pass."""
        images = list(images)
        results: list[DetectionResult] = []
        for start in range(0, len(images), max(1, batch_size)):
            chunk = [self.load(image) for image in images[start:start + max(1, batch_size)]]
            prepared = [preprocess(image, self.size) for image in chunk]
            batch = torch.stack([tensor for tensor, _ in prepared]).to(self.device)
            decoded = self.decode(batch)
            detections = postprocess(decoded, self.conf_threshold, self.nms_threshold)
            for rows, found, (_, transform) in zip(decoded, detections, prepared, strict=True):
                results.append(self._result(rows, found, transform))
        return results

    def decode(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized images -> (B, N, 5 + C) decoded rows on the CPU (see `YOLOv3ASFF.decode`)."""
        with torch.inference_mode():
            decoded = self.model.decode(self.model(batch)).float().cpu()
        # Tensors made under inference_mode refuse later in-place edits and autograd; hand out ordinary ones.
        return decoded.clone() if decoded.is_inference() else decoded

    @staticmethod
    def load(image: ImageInput) -> np.ndarray:
        """A path (read as RGB) or an RGB uint8 (H, W, 3) / gray (H, W) array -> RGB uint8 (H, W, 3)."""
        if isinstance(image, (str, os.PathLike)):
            return read_image(image)
        if not isinstance(image, np.ndarray):
            raise TypeError(f"expected an image path or an RGB uint8 numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 array, got dtype {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) array, got shape {image.shape}")
        return np.ascontiguousarray(image)

    def _result(self, decoded: torch.Tensor, detections: Detections, transform: ImageTransform) -> DetectionResult:
        labels = detections.labels
        return DetectionResult(
            boxes=transform.boxes_to_original(detections.boxes),
            scores=detections.scores,
            labels=labels,
            class_names=[self.class_names[i] for i in labels.tolist()],
            detections=detections,
            transform=transform,
            decoded=decoded,
            category_ids=[self.category_ids[i] for i in labels.tolist()],
        )


def _category_ids(metadata: dict, class_names: list[str]) -> list[int]:
    explicit = metadata.get("category_ids")
    if explicit is not None and len(explicit) == len(class_names):
        return [int(i) for i in explicit]
    if tuple(class_names) == COCO_CLASSES:
        return list(COCO_CATEGORY_IDS)
    return list(range(len(class_names)))


__all__ = ["DetectionResult", "Detector"]
