"""Synthetic multi-scale detection dataset, written to disk in COCO format.

Every image shows 1-8 objects of eight shape classes (``CLASS_NAMES``) on a cluttered background. The
class of an object is decided by its shape alone: colours and textures are drawn independently of the
class, so a detector has to learn shapes. Object sizes are spread log-uniformly from about 8 px to most
of the image, which exercises all three detection levels (strides 8, 16 and 32) and therefore the
adaptive fusion between them.

Everything is determined by the seed: image ``index`` of ``split`` is drawn from a numpy Generator seeded
with ``(seed, split, index)``, so the same seed gives byte-identical files, the train and val splits do not
depend on each other's size, and images can be rendered in parallel in any order.

Boxes are tight: an object is rendered as a coverage mask at 2-4x supersampling, and its box is the exact
extent of that mask in continuous pixel coordinates (COCO ``[x, y, w, h]``, floats, ``x`` = left edge of
the leftmost covered pixel column). ``area`` is the covered area in pixels, as COCO uses the mask area.

Command line::

    python -m asff_viz.data.synthetic --out data/synthetic --seed 0 --train 8000 --val 500 --workers 2

writes ``OUT/annotations/{train,val}.json`` and ``OUT/images/{train,val}/NNNNNN.jpg``.

Layout: the backgrounds, textures and shape masks are in ``asff_viz.data.drawing``; this module (about 490
lines, over the usual 400 on purpose) keeps what shares the per-image seeding together with the command that
uses it: settings, placement, ``render_image`` and the writing of a split. It imports no torch, so that its
worker processes start fast (hence its own overlap measure, ``_iou_and_covered``, in numpy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import multiprocessing.pool
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from asff_viz.data.drawing import CLASS_NAMES, object_texture, render_background, shape_mask
from asff_viz.utils.argtypes import non_negative_int, output_folder, positive_float, positive_int, unit_interval

logger = logging.getLogger(__name__)


SPLIT_CODES = {"train": 0, "val": 1}
"""Each split's part of the per-image seed ``(seed, split_code, index)``."""

IMAGE_FORMATS = ("jpg", "png")

_PLACEMENT_TRIES = 30
# Objects are drawn largest first, smaller ones on top. All later objects together may cover at most
# this fraction of an earlier object's box, so every object stays recognisable.
_MAX_COVERED_FRACTION = 0.3


class SyntheticImage(NamedTuple):
    """One rendered image and its ground truth.

    image: (H, W, 3) uint8, RGB.
    boxes: (N, 4) float64, COCO ``[x, y, w, h]`` in pixels, tight around each drawn object.
    class_indices: (N,) int64, index into ``CLASS_NAMES``.
    areas: (N,) float64, covered area of each object in pixels.
    """

    image: np.ndarray
    boxes: np.ndarray
    class_indices: np.ndarray
    areas: np.ndarray


class GeneratedPaths(NamedTuple):
    """Where ``generate`` wrote a dataset."""

    root: Path
    train_annotations: Path
    train_images: Path
    val_annotations: Path
    val_images: Path


class RenderSettings(NamedTuple):
    """Knobs of the image renderer (all sizes in pixels).

    size: side of square images, used when min_size/max_size are None.
    min_size, max_size: when both set, width and height are drawn independently and uniformly from
        [min_size, max_size], giving varied non-square images.
    min_objects, max_objects: the number of objects asked for is uniform in this range; fewer are drawn
        when the overlap rule leaves no room.
    min_object_size: smallest object side.
    max_object_fraction: largest object size as a fraction of the shorter image side.
    max_iou: a placement whose box has a larger IoU with an existing box is rejected.
    max_noise_sigma: sensor noise over the finished image has a standard deviation drawn from
        U(0, max_noise_sigma) grey levels.
    """

    size: int = 320
    min_size: int | None = None
    max_size: int | None = None
    min_objects: int = 1
    max_objects: int = 8
    min_object_size: float = 8.0
    max_object_fraction: float = 0.8
    max_iou: float = 0.3
    max_noise_sigma: float = 8.0

    def validate(self) -> None:
        """ValueError naming the first inconsistent setting (before anything is rendered)."""
        if self.size < 32 and self.min_size is None:
            raise ValueError(f"size must be at least 32 pixels, got {self.size}")
        if (self.min_size is None) != (self.max_size is None):
            raise ValueError("--min-size and --max-size go together")
        if self.min_size is not None and not 32 <= self.min_size <= self.max_size:
            raise ValueError(f"need 32 <= min_size <= max_size, got {self.min_size}, {self.max_size}")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.max_object_fraction <= 1:
            raise ValueError(f"max_object_fraction must be in (0, 1], got {self.max_object_fraction}")
        shorter = self.size if self.min_size is None else self.min_size
        if not 0 < self.min_object_size <= self.max_object_fraction * shorter:
            raise ValueError(f"min_object_size {self.min_object_size} does not fit: objects may be at most "
                             f"{self.max_object_fraction * shorter:g} px (max_object_fraction x the shorter side)")
        if not 0 <= self.max_iou <= 1 or self.max_noise_sigma < 0:
            raise ValueError(f"need 0 <= max_iou <= 1 and max_noise_sigma >= 0, got {self.max_iou}, "
                             f"{self.max_noise_sigma}")


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator that decides image ``index`` of ``split``; independent of every other image."""
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


# Colours and textures (float32 RGB arrays in 0..255)


# Shape masks. Each returns a (height, width) uint8 mask (0/255) whose shape fills the canvas.


# Placement


def _iou_and_covered(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of ``box`` with each of ``others`` and the fraction of each other box that ``box`` covers.

    Boxes are (x1, y1, x2, y2), ``others`` is (K, 4).
    """
    left = np.maximum(box[0], others[:, 0])
    top = np.maximum(box[1], others[:, 1])
    right = np.minimum(box[2], others[:, 2])
    bottom = np.minimum(box[3], others[:, 3])
    intersection = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    other_areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return intersection / (area + other_areas - intersection), intersection / other_areas


def _image_size(rng: np.random.Generator, settings: RenderSettings) -> tuple[int, int]:
    if settings.min_size is None and settings.max_size is None:
        return settings.size, settings.size
    low = settings.min_size if settings.min_size is not None else settings.size
    high = settings.max_size if settings.max_size is not None else settings.size
    if low > high:
        raise ValueError(f"min_size {low} is larger than max_size {high}")
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def _place(rng: np.random.Generator, settings: RenderSettings, image_size: tuple[int, int],
           patch_size: tuple[int, int], placed_boxes: list, covered_fractions: list
           ) -> tuple[tuple[int, int], np.ndarray] | None:
    """A top-left corner for a patch that overlaps the objects placed so far little enough, and the fraction of
    each placed box it covers; None after `_PLACEMENT_TRIES` failures."""
    (width, height), (patch_width, patch_height) = image_size, patch_size
    for _ in range(_PLACEMENT_TRIES):
        left = int(rng.integers(0, width - patch_width + 1))
        top = int(rng.integers(0, height - patch_height + 1))
        candidate = np.array([left, top, left + patch_width, top + patch_height], np.float64)
        covered_by_candidate = np.zeros(0)
        if placed_boxes:
            iou, covered_by_candidate = _iou_and_covered(candidate, np.stack(placed_boxes))
            if iou.max() > settings.max_iou:
                continue
            if (np.asarray(covered_fractions) + covered_by_candidate).max() > _MAX_COVERED_FRACTION:
                continue
        return (left, top), covered_by_candidate
    return None


def _draw_object(rng: np.random.Generator, canvas: np.ndarray, class_index: int, corner: tuple[int, int],
                 patch_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Blend one textured shape into `canvas` at `corner`; returns its supersampled mask, the mask's covered rows
    and columns and the supersampling factor (None when the mask came out empty: nothing is drawn)."""
    (left, top), (patch_width, patch_height) = corner, patch_size
    # Supersample so small shapes keep their form and the box can be measured to sub-pixel precision.
    factor = 4 if max(patch_width, patch_height) <= 64 else 2
    mask = shape_mask(CLASS_NAMES[class_index], rng, patch_height * factor, patch_width * factor)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    alpha = cv2.resize(mask, (patch_width, patch_height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    region = canvas[top : top + patch_height, left : left + patch_width]
    under_object = region[alpha > 0.5]
    if len(under_object) == 0:
        under_object = region.reshape(-1, 3)
    under_object = under_object[:: len(under_object) // 256 + 1]  # a few hundred samples are plenty
    texture = object_texture(rng, patch_height, patch_width, under_object)
    region[:] = region * (1 - alpha[..., None]) + texture * alpha[..., None]
    return mask, rows, cols, factor


def render_image(seed: int, split: str, index: int, settings: RenderSettings | None = None) -> SyntheticImage:
    """Render image ``index`` of ``split`` for ``seed`` (default ``RenderSettings()``); pure function of its arguments.

    Returns a ``SyntheticImage`` (RGB uint8 image, COCO xywh boxes, class indices, areas).
    """
    settings = RenderSettings() if settings is None else settings
    if settings.min_objects < 1 or settings.max_objects < settings.min_objects:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects, got {settings.min_objects}, {settings.max_objects}"
        )
    rng = image_rng(seed, split, index)
    height, width = _image_size(rng, settings)
    if min(height, width) < 2 * settings.min_object_size:
        raise ValueError(
            f"image size {width}x{height} is too small for objects of at least {settings.min_object_size} px"
        )
    canvas = render_background(rng, height, width)

    count = int(rng.integers(settings.min_objects, settings.max_objects + 1))
    smallest = math.log(settings.min_object_size)
    largest = math.log(max(settings.min_object_size, settings.max_object_fraction * min(height, width)))
    # Largest first: a big object would otherwise be drawn over smaller ones and hide them.
    sizes = np.sort(np.exp(rng.uniform(smallest, largest, size=count)))[::-1]
    placed_boxes: list[np.ndarray] = []
    covered_fractions: list[float] = []  # per placed box, the part of it that later boxes cover
    boxes, classes, areas = [], [], []
    for size in sizes:
        class_index = int(rng.integers(len(CLASS_NAMES)))
        aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))  # width / height
        object_width = size * math.sqrt(aspect)
        object_height = size / math.sqrt(aspect)
        # Keep the short side at least the minimum and the object inside the image.
        grow = max(1.0, settings.min_object_size / min(object_width, object_height))
        patch_width = min(width, math.ceil(object_width * grow))
        patch_height = min(height, math.ceil(object_height * grow))
        placed = _place(rng, settings, (width, height), (patch_width, patch_height), placed_boxes,
                        covered_fractions)
        if placed is None:
            continue
        (left, top), covered_by_candidate = placed

        drawn = _draw_object(rng, canvas, class_index, (left, top), (patch_width, patch_height))
        if drawn is None:
            continue
        mask, rows, cols, factor = drawn
        x = left + cols[0] / factor
        y = top + rows[0] / factor
        box_width = (cols[-1] + 1 - cols[0]) / factor
        box_height = (rows[-1] + 1 - rows[0]) / factor
        for placed_index, fraction in enumerate(covered_by_candidate):
            covered_fractions[placed_index] += float(fraction)
        placed_boxes.append(np.array([x, y, x + box_width, y + box_height]))
        covered_fractions.append(0.0)
        boxes.append([x, y, box_width, box_height])
        classes.append(class_index)
        areas.append(float(np.count_nonzero(mask)) / factor**2)

    # Sensor noise over everything, objects included.
    sigma = rng.uniform(0.0, settings.max_noise_sigma)
    canvas += rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(sigma)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return SyntheticImage(
        image=image,
        boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
        class_indices=np.asarray(classes, np.int64),
        areas=np.asarray(areas, np.float64),
    )


# Writing a dataset


def _image_file_name(index: int, image_format: str) -> str:
    return f"{index:06d}.{image_format}"


def _render_and_write(task: tuple) -> tuple:
    """Worker: render one image, write it, return what the annotation file needs."""
    seed, split, index, settings, image_dir, image_format, jpeg_quality = task
    sample = render_image(seed, split, index, settings)
    path = os.path.join(image_dir, _image_file_name(index, image_format))
    bgr = cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)
    if image_format == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, encoded = cv2.imencode("." + image_format, bgr, params)
    if not ok:
        raise OSError(f"could not encode image {path}")
    with open(path, "wb") as file:
        file.write(encoded.tobytes())
    height, width = sample.image.shape[:2]
    return index, width, height, sample.boxes.tolist(), sample.class_indices.tolist(), sample.areas.tolist()


def _worker_init() -> None:
    # Workers already run in parallel; OpenCV's own threads would only compete with them.
    cv2.setNumThreads(1)


def _write_split(
    out_dir: Path,
    split: str,
    count: int,
    seed: int,
    settings: RenderSettings,
    pool: multiprocessing.pool.Pool | None,
    image_format: str,
    jpeg_quality: int,
) -> Path:
    image_dir = out_dir / "images" / split
    annotation_path = out_dir / "annotations" / f"{split}.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    annotation_path.parent.mkdir(parents=True, exist_ok=True)
    tasks = [(seed, split, index, settings, str(image_dir), image_format, jpeg_quality) for index in range(count)]
    if pool is not None and count > 1:
        chunk = max(1, min(16, count // 16))  # few round trips, yet balanced work
        results = list(pool.imap(_render_and_write, tasks, chunksize=chunk))
    else:
        results = [_render_and_write(task) for task in tasks]

    images, annotations = [], []
    for index, width, height, boxes, classes, areas in sorted(results):
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": _image_file_name(index, image_format), "width": width, "height": height}
        )
        for box, class_index, area in zip(boxes, classes, areas, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": class_index + 1,
                    "bbox": [float(value) for value in box],
                    "area": round(float(area), 4),
                    "iscrowd": 0,
                }
            )
    document = {
        "info": {
            "description": "asff_viz synthetic shapes",
            "version": "1",
            "seed": seed,
            "split": split,
            "settings": settings._asdict(),
        },
        "licenses": [],
        "categories": [
            {"id": index + 1, "name": name, "supercategory": "shape"} for index, name in enumerate(CLASS_NAMES)
        ],
        "images": images,
        "annotations": annotations,
    }
    temporary = annotation_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    temporary.replace(annotation_path)
    logger.info("wrote %d %s images with %d objects to %s", count, split, len(annotations), image_dir)
    return annotation_path


def generate(
    out_dir: str | os.PathLike,
    seed: int,
    train: int,
    val: int,
    size: int = 320,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    min_objects: int = 1,
    max_objects: int = 8,
    min_object_size: float = 8.0,
    max_object_fraction: float = 0.8,
    max_iou: float = 0.3,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    workers: int = 1,
) -> GeneratedPaths:
    """Write a synthetic COCO-format dataset under ``out_dir`` and return its paths.

    Layout: ``out_dir/annotations/{train,val}.json`` and ``out_dir/images/{train,val}/NNNNNN.<format>``.
    Either split may have 0 images (its annotation file is then valid COCO with empty lists). The output
    depends only on the arguments (not on ``workers``). See ``RenderSettings`` for the rendering knobs.
    """
    if train < 0 or val < 0:
        raise ValueError(f"image counts must be non-negative, got train={train}, val={val}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    settings = RenderSettings(
        size=size,
        min_size=min_size,
        max_size=max_size,
        min_objects=min_objects,
        max_objects=max_objects,
        min_object_size=min_object_size,
        max_object_fraction=max_object_fraction,
        max_iou=max_iou,
    )
    settings.validate()
    root = Path(out_dir)
    paths = {}
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1 and train + val > 1:
            # spawn, not fork: in a forked child, cv2.setNumThreads deadlocks once the parent has used
            # OpenCV's thread pool (seen with opencv 5.0 when generating twice in one process).
            context = multiprocessing.get_context("spawn")
            pool = stack.enter_context(context.Pool(workers, initializer=_worker_init))
        for split, count in (("train", train), ("val", val)):
            paths[split] = _write_split(root, split, count, seed, settings, pool, image_format, jpeg_quality)
    return GeneratedPaths(
        root=root,
        train_annotations=paths["train"],
        train_images=root / "images" / "train",
        val_annotations=paths["val"],
        val_images=root / "images" / "val",
    )


def main(argv: Sequence[str] | None = None) -> GeneratedPaths:
    parser = argparse.ArgumentParser(
        prog="python -m asff_viz.data.synthetic",
        description="Write a seeded synthetic multi-scale shape detection dataset in COCO format.",
    )
    parser.add_argument("--out", required=True, type=output_folder,
                        help="output folder (annotations/ and images/ go inside)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=non_negative_int, default=1000, help="number of training images (may be 0)")
    parser.add_argument("--val", type=non_negative_int, default=200, help="number of validation images (may be 0)")
    parser.add_argument("--size", type=positive_int, default=320, help="side of square images")
    parser.add_argument("--min-size", type=positive_int, default=None,
                        help="with --max-size: varied non-square images")
    parser.add_argument("--max-size", type=positive_int, default=None)
    parser.add_argument("--min-objects", type=non_negative_int, default=1)
    parser.add_argument("--max-objects", type=non_negative_int, default=8)
    parser.add_argument("--min-object-size", type=positive_float, default=8.0, help="smallest object side in pixels")
    parser.add_argument("--max-object-fraction", type=unit_interval, default=0.8,
                        help="largest object / shorter image side")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="jpg", help="jpg (quality 95) or png")
    parser.add_argument("--workers", type=positive_int, default=1, help="processes rendering in parallel")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"argument --seed: must be 0 or more, got {args.seed}")
    try:  # every remaining inconsistency (min above max, objects larger than images) is refused before rendering
        RenderSettings(size=args.size, min_size=args.min_size, max_size=args.max_size, min_objects=args.min_objects,
                       max_objects=args.max_objects, min_object_size=args.min_object_size,
                       max_object_fraction=args.max_object_fraction).validate()
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    paths = generate(
        args.out,
        args.seed,
        args.train,
        args.val,
        args.size,
        min_size=args.min_size,
        max_size=args.max_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        min_object_size=args.min_object_size,
        max_object_fraction=args.max_object_fraction,
        image_format=args.format,
        workers=args.workers,
    )
    logger.info("done in %.1f s: %s", time.perf_counter() - start, paths.root)
    return paths


if __name__ == "__main__":
    main()
