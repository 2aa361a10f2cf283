"""What an analysis reads: models (with their file hash), a COCO-format dataset with ground truth, images.

Errors are `AnalysisError`s whose message names the file and what to do; the command line prints them
without a traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError, default_checkpoint_path, file_sha256, load_model
from ..data.class_names import ClassMismatchError, match_classes
from ..data.coco import convert_coco_bbox
from ..inference.transforms import ImageError, read_image
from ..introspection.capture import has_fusion_weights

logger = logging.getLogger(__name__)


class AnalysisError(ValueError):
    """Bad input to an analysis; the message names the file or option and what to do."""


def resolve_device(device: str | None) -> torch.device:
    """'auto' / None -> cuda when available, else cpu; a clear error for an unavailable CUDA device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(f"--device {device}: CUDA is not available on this machine; use --device cpu.")
    return resolved


# ------------------------------------------------------------------------------------------------- models


@dataclass
class AnalysedModel:
    """A loaded model plus what identifies it: path, sha256 (of the file), a short label for figures."""

    model: nn.Module
    path: str
    sha256: str
    label: str
    _fast: dict = field(default_factory=dict, repr=False, compare=False)

    def fast(self, *, grad: bool = False) -> nn.Module:
        """The model's float32 fast path for dataset passes (`optimize_for_inference`: BatchNorm folded,
        channels-last; with oneDNN's fused conv + activation when no gradient is needed, since that op has no
        backward). Same outputs and gradients as the model as built, to float round-off; made once.

        With `grad`, gradients are taken with respect to features, never parameters, so the copy's parameters
        are frozen: the deformable convs' offsets then need no gradient (their anchors are detached), and the
        sampling takes its cheaper backward (`models.deform_conv._SampleColumns`)."""
        if grad not in self._fast:
            from ..inference.fast import optimize_for_inference

            network = optimize_for_inference(self.model, fuse_activation=False if grad else None)
            if grad:
                network.requires_grad_(False)
            self._fast[grad] = network
        return self._fast[grad]

    @property
    def metadata(self) -> dict:
        return dict(getattr(self.model, "metadata", {}) or {})

    @property
    def has_fusion_weights(self) -> bool:
        return has_fusion_weights(self.model)

    @property
    def class_names(self) -> list[str]:
        names = self.metadata.get("class_names")
        return list(names) if names else [f"class_{i}" for i in range(self.model.num_classes)]

    @property
    def input_size(self) -> int:
        return int(self.metadata.get("input_size") or 416)

    @property
    def fusion_mode(self) -> str:
        return str(getattr(self.model.config, "fusion", "asff"))

    def require_fusion_weights(self, what: str) -> None:
        """AnalysisError naming the file when the model has no ASFF weights: `what` says what needs them."""
        if not self.has_fusion_weights:
            raise AnalysisError(f"{self.path}: a {self.fusion_mode!r}-fusion model has no fusion weights; {what}")

    def record(self, role: str) -> dict:
        """The run.json entry of this checkpoint."""
        metadata = self.metadata
        return {"role": role, "label": self.label, "path": self.path, "sha256": self.sha256,
                "variant": metadata.get("variant"), "fusion": self.fusion_mode, "epoch": metadata.get("epoch"),
                "input_size": metadata.get("input_size"), "class_names": self.class_names}


def load_analysed_model(weights: str | os.PathLike | None, device: torch.device, label: str | None = None
                        ) -> AnalysedModel:
    """Load a checkpoint (None: the embedded default) in eval mode; AnalysisError with what to do if it fails."""
    path = Path(weights) if weights is not None else default_checkpoint_path()
    if weights is None and not path.is_file():
        raise AnalysisError(f"the embedded default model {path} is not there (it ships with the repository "
                            "once trained); pass --weights PATH with an asff_viz or official ASFF checkpoint.")
    try:
        model = load_model(path, device=device)
    except CheckpointError as error:
        raise AnalysisError(str(error)) from None
    sha256 = model.metadata.get("sha256") or file_sha256(path)
    return AnalysedModel(model, str(path), sha256, label or (path.stem if weights is not None else "default"))


# ------------------------------------------------------------------------------------------------ dataset


@dataclass
class GroundTruth:
    """The annotated objects of one image, in original pixels.

    boxes: (M, 4) xyxy = the annotation's [x, y, x + w, y + h], clipped to the image (continuous pixels: the
    object's extent, for weights inside it and for matching). labels: (M,) class indices (rank of the category
    id). areas: (M,) the annotation's `area` (COCO's size measure: mask area, or w * h when absent).
    crowd: (M,) bool iscrowd. training_boxes: (M, 4) the same boxes as training converts them (the official
    conversion, 1 px narrower: `data.coco.convert_coco_bbox`), for the training-loss objective and its
    positives: the continuous boxes move 11 % of the validation boxes' positive cell or level at 416.
    """

    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    crowd: np.ndarray
    training_boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.training_boxes is None:
            self.training_boxes = self.boxes

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DatasetImage:
    """One image of the dataset: COCO id, file name, path, size and ground truth."""

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    ground_truth: GroundTruth


class AnalysisDataset:
    """A COCO-format dataset with ground truth, read through `asff_viz.data.coco.COCODetection`.

    Images are listed in the annotation file's order; `limit` keeps the first N (with existing files).
    """

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike, limit: int | None = None) -> None:
        from ..data.coco import COCODetection
        from ..data.errors import DatasetError

        self.annotation_path, self.image_dir = Path(annotations), Path(images)
        try:
            self.coco_dataset = COCODetection(self.annotation_path, self.image_dir)
        except (DatasetError, FileNotFoundError, OSError) as error:
            raise AnalysisError(str(error)) from None
        if limit is not None and limit <= 0:
            raise AnalysisError(f"--limit must be a positive number of images, got {limit}")
        self.coco = self.coco_dataset.coco
        self.category_ids = list(self.coco_dataset.category_ids)
        self.class_names = list(self.coco_dataset.class_names)
        count = len(self.coco_dataset) if limit is None else min(limit, len(self.coco_dataset))
        self.image_ids = list(self.coco_dataset.image_ids[:count])
        self._class_index = {category: index for index, category in enumerate(self.category_ids)}
        self._annotation_sha256: str | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def annotation_sha256(self) -> str:
        if self._annotation_sha256 is None:
            self._annotation_sha256 = file_sha256(self.annotation_path)
        return self._annotation_sha256

    def __iter__(self) -> Iterator[DatasetImage]:
        for index in range(len(self.image_ids)):
            yield self[index]

    def __getitem__(self, index: int) -> DatasetImage:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        width, height = int(info["width"]), int(info["height"])
        boxes, training, labels, areas, crowd = [], [], [], [], []
        for annotation in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
            x, y, w, h = (float(v) for v in annotation["bbox"])
            if w <= 0 or h <= 0:
                continue
            box = [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            boxes.append(box)
            training.append(convert_coco_bbox((x, y, w, h), width, height) or box)
            labels.append(self._class_index[annotation["category_id"]])
            areas.append(float(annotation.get("area", w * h)))
            crowd.append(bool(annotation.get("iscrowd", 0)))
        truth = GroundTruth(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                            np.asarray(areas, dtype=np.float64), np.asarray(crowd, dtype=bool),
                            np.asarray(training, dtype=np.float64).reshape(-1, 4))
        return DatasetImage(image_id, info["file_name"], self.image_dir / info["file_name"], width, height, truth)

    def record(self) -> dict:
        """The run.json entry of the dataset."""
        return {"annotations": str(self.annotation_path), "annotations_sha256": self.annotation_sha256,
                "images": str(self.image_dir), "num_images": len(self.image_ids),
                "num_images_in_file": len(self.coco.imgs), "class_names": self.class_names}

    def check_classes(self, model: AnalysedModel) -> None:
        """Refuse a model whose classes are not the dataset's, by name and in the same order (statistics by
        class, true and false positives compare class indices); a model without class names is matched by
        position, with a warning."""
        try:
            mapping, note = match_classes(model.class_names, self.class_names, model.path,
                                          str(self.annotation_path))
        except ClassMismatchError as error:
            raise AnalysisError(str(error)) from None
        if mapping != list(range(len(mapping))):
            raise AnalysisError(f"{self.annotation_path} orders its categories differently from {model.path} "
                                "(the same names at other positions); analyses compare class indices, so "
                                "reorder the categories to the checkpoint's class order.")
        if note:
            logger.warning("warning: %s", note)


def loss_truths(images) -> list[tuple]:
    """(path, boxes, labels) of each `DatasetImage` for the training-loss objective: its non-crowd boxes as training
    converts them (`GroundTruth.training_boxes`), so that the loss and its positives are training's own."""
    return [(image.path, image.ground_truth.training_boxes[~image.ground_truth.crowd],
             image.ground_truth.labels[~image.ground_truth.crowd]) for image in images]


def check_image_paths(paths) -> list[Path]:
    """Image paths given on the command line -> Paths, each read once before any model runs; AnalysisError naming
    the first one that is missing, a folder, or not a readable image."""
    result = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise AnalysisError(f"{path} is a folder; pass the image files in it to --images (for example "
                                f"{path / '*.jpg'}).")
        if not path.is_file():
            raise AnalysisError(f"{path}: no such image file; pass existing image files to --images.")
        try:
            read_image(path)
        except ImageError as error:
            raise AnalysisError(str(error)) from None
        result.append(path)
    return result


__all__ = ["AnalysedModel", "AnalysisDataset", "AnalysisError", "DatasetImage", "GroundTruth",
           "check_image_paths", "file_sha256", "load_analysed_model", "loss_truths", "resolve_device"]
