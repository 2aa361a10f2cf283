"""Data: synthetic dataset generator, COCO-format dataset, official training augmentation.

Names are imported lazily so that ``python -m asff_viz.data.synthetic`` (and its worker processes) do not
pay for importing torch.

- ``synthetic``: ``generate``, ``render_image``, ``CLASS_NAMES``.
- ``coco``: ``COCODetection``, ``load_rgb_image``, ``convert_coco_bbox``, ``xyxy_to_coco_bbox``.
- ``augment``: ``TrainTransform``, ``ValTransform``, ``MixupDataset``, ``TrainDataset``, ``ValDataset``,
  ``MultiScaleBatchSampler``, ``collate``.
- ``errors``: ``DatasetError``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CLASS_NAMES": "synthetic",
    "generate": "synthetic",
    "render_image": "synthetic",
    "COCODetection": "coco",
    "load_rgb_image": "coco",
    "convert_coco_bbox": "coco",
    "xyxy_to_coco_bbox": "coco",
    "TrainTransform": "augment",
    "ValTransform": "augment",
    "MixupDataset": "augment",
    "TrainDataset": "augment",
    "ValDataset": "augment",
    "MultiScaleBatchSampler": "augment",
    "collate": "augment",
    "DatasetError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
