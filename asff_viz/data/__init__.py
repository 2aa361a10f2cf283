"""Data: synthetic dataset generator, COCO-format dataset, official training augmentation and loading.

Names are imported lazily so that ``python -m asff_viz.data.synthetic`` (and its worker processes) do not
pay for importing torch.

- ``synthetic``: ``generate``, ``render_image``, ``CLASS_NAMES``.
- ``coco``: ``COCODetection``, ``load_rgb_image``, ``convert_coco_bbox``, ``xyxy_to_coco_bbox``.
- ``augment``: ``TrainTransform``, ``ValTransform`` (the official augmentation).
- ``loading``: ``MixupDataset``, ``TrainDataset``, ``ValDataset``, ``MultiScaleBatchSampler``, ``collate``.
- ``drawing``: backgrounds, textures and shape masks of the synthetic images.
- ``class_names``: COCO's class names and matching class lists by name.
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
    "MixupDataset": "loading",
    "TrainDataset": "loading",
    "ValDataset": "loading",
    "MultiScaleBatchSampler": "loading",
    "collate": "loading",
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
