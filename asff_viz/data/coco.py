"""COCO-format detection dataset (pycocotools), with the official box conversion and class mapping.

``COCODetection(annotation_file, image_dir)[i]`` returns ``(image, targets, info)``:

- image: (H, W, 3) uint8 RGB (or whatever ``transform`` makes of it),
- targets: (N, 5) float32 rows ``[class_index, x1, y1, x2, y2]`` in original-image pixels,
- info: dict with ``image_id``, ``file_name``, ``path``, ``original_height``, ``original_width``.

Official conventions (kept so that results compare with the published ones):

- class_index is the rank of the category id in ``sorted(coco.getCatIds())``;
- COCO ``[x, y, w, h]`` becomes ``x1 = max(0, x)``, ``y1 = max(0, y)``,
  ``x2 = min(W - 1, x1 + max(0, w - 1))``, ``y2 = min(H - 1, y1 + max(0, h - 1))``; a box is kept when its
  area > 0 and ``x2 >= x1``, ``y2 >= y1``. The conversion treats pixels as inclusive indices, so a box comes
  out 1 px narrower than its COCO width; ``xyxy_to_coco_bbox`` is its inverse for writing detections;
- crowd annotations are ordinary targets unless ``include_crowd=False``.

Broken input: problems that can be fixed by leaving something out (a missing image file, a box of
non-positive size or outside its image, an annotation of an unknown image or category) are skipped and
summed up in one log line; problems that leave nothing sensible to load raise ``DatasetError``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from asff_viz.data.coco_document import (
    check_image_dir,
    inside_folder,
    is_bbox,
    is_finite_number,
    is_int,
    load_annotation_document,
)
from asff_viz.data.errors import DatasetError
from asff_viz.inference.transforms import MAX_PIXELS, ImageError, check_pixel_count

logger = logging.getLogger(__name__)

# Log wording of each skip reason, in the order they are reported.
_SKIP_REASONS = {
    "non_positive_box": "boxes with non-positive size",
    "outside_box": "boxes outside their image",
    "missing_image": "images whose file is missing",
    "unsafe_path": "images whose file_name leaves the image folder (absolute or with '..')",
    "malformed_box": "annotations without a valid bbox",
    "malformed_field": "annotations whose image_id, category_id, iscrowd or area is not a valid value",
    "unknown_image": "annotations of unknown images",
    "unknown_category": "annotations of unknown categories",
    "crowd": "crowd annotations (include_crowd=False)",  # a choice, not a problem
    "empty_image": "images without annotations",  # kept as negatives unless asked otherwise
}


def load_rgb_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, as the official loader does (``cv2.imread``, colour).

    The image-reading policy of every tool: images over ``max_pixels`` are refused from their header, before
    decoding. Raises ``DatasetError`` naming the file if it is missing, unreadable, too large or not an image.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"image file {path} does not exist; check image_dir or the annotation file") from None
    except IsADirectoryError:
        raise DatasetError(f"image file {path} is a folder, not an image") from None
    except PermissionError:
        raise DatasetError(f"image file {path} cannot be read: permission denied") from None
    except OSError as error:
        raise DatasetError(f"image file {path} cannot be read: {error.strerror or error}") from None
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        check_pixel_count(buffer, str(path), max_pixels)
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    except ImageError as error:
        raise DatasetError(str(error)) from None
    except cv2.error:
        image = None
    if image is None:
        raise DatasetError(
            f"could not decode image {path}: the file is corrupt or not an image; "
            "replace it or remove its entry from the annotation file"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def convert_coco_bbox(bbox: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Official COCO ``[x, y, w, h]`` -> ``(x1, y1, x2, y2)`` conversion; None when the box is dropped."""
    x, y, box_width, box_height = (float(value) for value in bbox)
    x1 = max(0.0, x)
    y1 = max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, box_width - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, box_height - 1.0))
    if x2 >= x1 and y2 >= y1:
        return x1, y1, x2, y2
    return None


def xyxy_to_coco_bbox(boxes: np.ndarray) -> np.ndarray:
    """Inverse of the official conversion: (N, 4) ``x1, y1, x2, y2`` -> (N, 4) COCO ``[x, y, w, h]``.

    The conversion made boxes 1 px narrower (``x2 = x1 + w - 1``), so a model trained on its targets
    predicts boxes 1 px narrower too; adding the pixel back when writing detections makes a perfect
    prediction score IoU 1 against the original annotation. (The official evaluator writes
    ``w = x2 - x1``, which costs a little AP on small objects.)
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack(
        [boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0] + 1.0, boxes[:, 3] - boxes[:, 1] + 1.0], axis=1
    )


class COCODetection(Dataset):
    """A COCO-format detection dataset read with pycocotools.

    Args:
        annotation_file: COCO annotation JSON ('images', 'annotations', 'categories').
        image_dir: folder holding the files named by each image's 'file_name'.
        include_crowd: keep ``iscrowd=1`` annotations as ordinary targets (official: True).
        transform: optional ``transform(image, targets) -> (image, targets)`` applied in ``__getitem__``.
        skip_images_without_annotations: drop images that have no usable box (official: False; such
            images are kept as pure negatives for training and must stay in for evaluation).

    Attributes:
        coco: the pycocotools ``COCO`` index of the whole annotation file (for ``COCOeval``).
        category_ids: sorted category ids; ``category_ids[class_index]`` is the COCO id of a class.
        class_names: category names in class-index order.
        image_ids: the COCO ids of the images this dataset serves, in index order (images whose file is
            missing are left out: restrict ``COCOeval.params.imgIds`` to these).
        skipped: Counter of skipped items by reason (keys of ``_SKIP_REASONS``).
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        *,
        include_crowd: bool = True,
        transform: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]] | None = None,
        skip_images_without_annotations: bool = False,
    ) -> None:
        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        self.include_crowd = include_crowd
        self.transform = transform
        self.skip_images_without_annotations = skip_images_without_annotations
        document = load_annotation_document(self.annotation_file)
        check_image_dir(self.image_dir)

        self.skipped: Counter[str] = Counter()
        annotations = self._clean_annotations(document)
        document["annotations"] = annotations
        # pycocotools prints progress to stdout; keep the caller's output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = document
            self.coco.createIndex()

        self.category_ids: list[int] = sorted(self.coco.getCatIds())
        class_index_of = {category_id: index for index, category_id in enumerate(self.category_ids)}
        self.class_names: list[str] = [self.coco.cats[category_id]["name"] for category_id in self.category_ids]

        self.image_ids: list[int] = []
        self._records: list[dict[str, Any]] = []
        for image_id in self.coco.getImgIds():
            image = self.coco.imgs[image_id]
            if not inside_folder(image["file_name"]):
                self.skipped["unsafe_path"] += 1
                continue
            path = self.image_dir / image["file_name"]
            if not path.is_file():
                self.skipped["missing_image"] += 1
                continue
            targets = self._image_targets(image, class_index_of)
            if len(targets) == 0:
                self.skipped["empty_image"] += 1
                if self.skip_images_without_annotations:
                    continue
            self.image_ids.append(image_id)
            self._records.append(
                {"image_id": image_id, "file_name": image["file_name"], "path": path, "targets": targets}
            )

        listed = len(self.coco.imgs)
        if not self._records:
            if listed == 0:
                problem = "lists no images"
            elif self.skipped["missing_image"] == listed:
                problem = f"lists {listed} images but none of their files is in {self.image_dir}"
            else:
                problem = f"lists {listed} images but none of them has a usable annotation"
            raise DatasetError(
                f"annotation file {self.annotation_file} {problem}; check that image_dir matches the "
                "annotation file"
            )
        self._log_summary(listed)

    def _clean_annotations(self, document: dict) -> list[dict]:
        """Drop annotations that cannot be used and fill the keys COCOeval needs ('area', 'iscrowd')."""
        image_sizes = {image["id"]: (image["width"], image["height"]) for image in document["images"]}
        category_ids = {category["id"] for category in document["categories"]}
        kept = []
        for annotation in document["annotations"]:
            if not isinstance(annotation, dict):
                self.skipped["malformed_box"] += 1
                continue
            bbox = annotation.get("bbox")
            if not is_bbox(bbox):
                self.skipped["malformed_box"] += 1
                continue
            if not (is_int(annotation.get("image_id")) and is_int(annotation.get("category_id"))
                    and annotation.get("iscrowd", 0) in (0, 1) and not isinstance(annotation.get("iscrowd"), float)
                    and ("area" not in annotation or is_finite_number(annotation["area"]))):
                # 1.0 as a category id, "yes" as iscrowd or NaN as an area would otherwise pass unnoticed into
                # COCOeval (a NaN area counts in every size range) or stop it with a traceback.
                self.skipped["malformed_field"] += 1
                continue
            if annotation["image_id"] not in image_sizes:
                self.skipped["unknown_image"] += 1
                continue
            if annotation["category_id"] not in category_ids:
                self.skipped["unknown_category"] += 1
                continue
            annotation = dict(annotation)
            annotation.setdefault("iscrowd", 0)
            annotation.setdefault("area", float(bbox[2]) * float(bbox[3]))
            kept.append(annotation)
        # pycocotools indexes annotations by id: a repeated id would make every image that has one of them
        # serve the last such annotation as its ground truth. Ids are not used for anything else, so every
        # kept annotation gets its own (its position); a file whose ids repeat is worth a warning.
        file_ids = Counter(annotation.get("id") for annotation in kept if "id" in annotation)
        repeated = {key: count for key, count in file_ids.items() if count > 1}
        if repeated:
            example, count = next(iter(repeated.items()))
            logger.warning("%s: %d annotation ids appear more than once (e.g. id %s, %d times); annotations "
                           "were renumbered so that each keeps its own box (COCO requires unique ids)",
                           self.annotation_file, len(repeated), example, count)
        for number, annotation in enumerate(kept, start=1):
            annotation["id"] = number
        return kept

    def _image_targets(self, image: dict, class_index_of: dict[int, int]) -> np.ndarray:
        """(N, 5) float32 ``[class_index, x1, y1, x2, y2]`` of one image, official conversion."""
        width, height = image["width"], image["height"]
        rows = []
        annotation_ids = self.coco.getAnnIds(imgIds=[image["id"]], iscrowd=None)
        for annotation in self.coco.loadAnns(annotation_ids):
            if annotation["iscrowd"] and not self.include_crowd:
                self.skipped["crowd"] += 1
                continue
            _, _, box_width, box_height = annotation["bbox"]
            if box_width <= 0 or box_height <= 0 or annotation["area"] <= 0:
                self.skipped["non_positive_box"] += 1
                continue
            box = convert_coco_bbox(annotation["bbox"], width, height)
            if box is None:
                self.skipped["outside_box"] += 1
                continue
            rows.append((class_index_of[annotation["category_id"]], *box))
        return np.asarray(rows, np.float32).reshape(-1, 5)

    def _log_summary(self, listed: int) -> None:
        """One log line: what was loaded, and what was skipped (a warning when anything broken was)."""
        boxes = sum(len(record["targets"]) for record in self._records)
        message = (
            f"{self.annotation_file.name}: {len(self._records)} of {listed} images, {boxes} boxes, "
            f"{len(self.class_names)} classes"
        )
        broken = [
            f"{self.skipped[reason]} {wording}"
            for reason, wording in _SKIP_REASONS.items()
            if self.skipped[reason] and reason not in ("crowd", "empty_image")
        ]
        notes = []
        if self.skipped["crowd"]:
            notes.append(f"left out {self.skipped['crowd']} {_SKIP_REASONS['crowd']}")
        if self.skipped["empty_image"]:
            verb = "skipped" if self.skip_images_without_annotations else "kept"
            notes.append(f"{verb} {self.skipped['empty_image']} {_SKIP_REASONS['empty_image']}")
        if broken:
            message += "; skipped " + ", ".join(broken)
        if notes:
            message += "; " + ", ".join(notes)
        if broken:
            logger.warning(message)
        else:
            logger.info(message)

    def __len__(self) -> int:
        return len(self._records)

    def targets(self, index: int) -> np.ndarray:
        """(N, 5) float32 ``[class_index, x1, y1, x2, y2]`` of image ``index`` without reading the image."""
        return self._records[index]["targets"].copy()

    def info(self, index: int) -> dict[str, Any]:
        """Image id, file name and path of image ``index`` (sizes as listed in the annotation file)."""
        record = self._records[index]
        image = self.coco.imgs[record["image_id"]]
        return {
            "image_id": record["image_id"],
            "file_name": record["file_name"],
            "path": str(record["path"]),
            "original_height": int(image["height"]),
            "original_width": int(image["width"]),
        }

    def load_item(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``(image RGB uint8 (H, W, 3), targets (N, 5), info)`` without the transform.

        Raises ``DatasetError`` naming the file if it cannot be decoded.
        """
        if not 0 <= index < len(self._records):
            raise IndexError(f"index {index} out of range for {len(self._records)} images")
        record = self._records[index]
        image = load_rgb_image(record["path"])
        info = self.info(index)
        height, width = image.shape[:2]
        if (height, width) != (info["original_height"], info["original_width"]):
            logger.warning(
                "image %s is %dx%d but the annotation file says %dx%d; boxes follow the annotation file",
                record["path"], width, height, info["original_width"], info["original_height"],
            )
            info["original_height"], info["original_width"] = height, width
        return image, record["targets"].copy(), info

    def __getitem__(self, index: int) -> tuple[Any, Any, dict[str, Any]]:
        image, targets, info = self.load_item(index)
        if self.transform is not None:
            image, targets = self.transform(image, targets)
        return image, targets, info
