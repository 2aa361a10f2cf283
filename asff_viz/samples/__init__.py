"""Bundled sample images with their ground truth, so the app shows a result with no set-up.

The images are drawn by the synthetic shapes generator (`asff_viz.data.synthetic`) from a seed of their own,
so they are never among the training images of the embedded default model. `annotations.json` is COCO-style
(`bbox` = [x, y, w, h] in original pixels, `category_id` = class index + 1), which lets the gradient-flow
panel use the training loss against ground truth as its objective.

`python -m asff_viz.samples` re-renders them and says whether this machine reproduces the bundled files byte for
byte (`render_samples` says when it does not); `--out DIR` writes the rendering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SAMPLES_DIR = Path(__file__).resolve().parent
ANNOTATIONS_FILE = SAMPLES_DIR / "annotations.json"

# (file name, first image index to try, orientation): a mix of square and non-square images, so the app's
# alignment of maps with the original image shows on both.
_SAMPLE_SEED = 20_240_601
_SAMPLES = (
    ("shapes_square.jpg", 3, "square"),
    ("shapes_wide.jpg", 7, "wide"),
    ("shapes_tall.jpg", 11, "tall"),
    ("shapes_small.jpg", 18, "small"),
)
_JPEG_QUALITY = 80


@dataclass(frozen=True)
class SampleAnnotations:
    """Ground truth of one sample image.

    boxes_xyxy: (K, 4) float64, x1, y1, x2, y2 in original image pixels; class_indices: (K,) int64;
    class_names: the dataset's class names, indexed by class index.
    """

    boxes_xyxy: np.ndarray
    class_indices: np.ndarray
    class_names: tuple[str, ...]


def list_samples() -> list[str]:
    """File names of the bundled sample images: the generated ones in their order (the first is the app's
    opening image), then any others by name."""
    present = {path.name for path in SAMPLES_DIR.iterdir()
               if path.suffix.lower() in (".jpg", ".jpeg", ".png") and path.is_file()}
    ordered = [name for name, _, _ in _SAMPLES if name in present]
    return ordered + sorted(present - set(ordered))


def sample_path(name: str) -> Path:
    """Path of bundled sample `name` (one of `list_samples()`)."""
    if name not in list_samples():
        raise FileNotFoundError(f"{name}: not a bundled sample; choose one of {list_samples()}")
    return SAMPLES_DIR / name


@lru_cache(maxsize=1)
def _annotation_document() -> dict:
    if not ANNOTATIONS_FILE.is_file():
        return {"images": [], "annotations": [], "categories": []}
    return json.loads(ANNOTATIONS_FILE.read_text())


def sample_annotations(name: str) -> SampleAnnotations | None:
    """Ground truth of sample `name`, or None when the sample has no annotations."""
    return annotations_from_coco(_annotation_document(), name)


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names it and says what is wrong."""


def annotations_from_coco(document: dict, file_name: str, source: str = "annotations") -> SampleAnnotations | None:
    """Ground truth of image `file_name` from a COCO-style document, or None when it does not list that image.

    The document is checked and its boxes converted as the training datasets do (`asff_viz.data.coco`: the
    official [x, y, w, h] -> xyxy conversion, 1 px narrower, clipped to the image; crowd and empty boxes left
    out), so the app's loss objective is the training loss. The analyses' statistics (and the app's Across images
    view, which reads the file through `analyze.sources.AnalysisDataset`) use [x, y, x + w, y + h] and the
    annotations' `area`. A document that lists a single image
    applies to any file name. Class index = rank of the category id among the document's sorted category ids
    (so COCO's 80 ids with gaps map to indices 0..79). Raises AnnotationError (naming `source`) when the
    document is not COCO-style.
    """
    from ..data.coco import convert_coco_bbox
    from ..data.coco_document import is_bbox, is_int, validate_document
    from ..data.errors import DatasetError

    try:
        validate_document(document, source)
    except DatasetError as error:
        raise AnnotationError(str(error)) from None
    images = document["images"]
    by_name = {Path(image["file_name"]).name: image for image in images}
    if len(images) == 1:
        image = images[0]
    elif Path(file_name).name in by_name:
        image = by_name[Path(file_name).name]
    else:
        return None
    categories = sorted(document["categories"], key=lambda category: category["id"])
    class_index = {category["id"]: index for index, category in enumerate(categories)}
    boxes, classes = [], []
    for position, annotation in enumerate(document["annotations"]):
        try:
            if annotation["image_id"] != image["id"] or annotation.get("iscrowd", 0):
                continue
            bbox, category = annotation["bbox"], annotation["category_id"]
            # NaN, true or 1.0 would slip through float() and the id lookup.
            if not is_bbox(bbox):
                raise ValueError(f"bbox {str(bbox)[:60]} is not 4 finite numbers")
            if not is_int(category):
                raise ValueError(f"category_id {category!r} is not an integer")
            x, y, width, height = (float(value) for value in bbox)
            label = class_index[category]
        except (KeyError, TypeError, ValueError) as error:
            raise AnnotationError(f"{source}: annotations[{position}] needs image_id, category_id (one of the "
                                  f"categories) and bbox [x, y, w, h] ({type(error).__name__} {error})") from None
        box = convert_coco_bbox((x, y, width, height), image["width"], image["height"]) if width > 0 < height else None
        if box is not None:
            boxes.append(box)
            classes.append(label)
    names = tuple(str(category["name"]) for category in categories)
    return SampleAnnotations(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes, np.int64), names)


def render_samples() -> dict[str, bytes]:
    """The bundled files as this machine renders them: file name -> bytes (the images, then `annotations.json`).

    Deterministic for one OpenCV version; the bundled files are this rendering under the pinned
    `opencv-python-headless==5.1.0.95`. Other versions draw the letter glyphs (letter_a, letter_z) differently
    at their edges: under 5.0.0 the three images holding letters differ in bytes, with the same boxes and
    classes and letter areas up to 0.56 % apart; under 4.12 the backgrounds differ too.
    `python -m asff_viz.samples` compares this rendering with the bundled files.
    """
    import cv2

    from ..data.synthetic import CLASS_NAMES, RenderSettings, render_image

    files: dict[str, bytes] = {}
    images, annotations = [], []
    for image_id, (file_name, index, orientation) in enumerate(_SAMPLES, start=1):
        if orientation == "square":
            sample = render_image(_SAMPLE_SEED, "val", index, RenderSettings(size=416, min_objects=5))
        elif orientation == "small":  # many small objects: the stride-8 level's territory
            sample = render_image(_SAMPLE_SEED, "val", index, RenderSettings(
                size=416, min_objects=8, max_objects=8, max_object_fraction=0.25))
        else:
            # Width and height are drawn independently: take the first index with a clearly wide (or tall) shape.
            settings = RenderSettings(min_size=320, max_size=512, min_objects=5)
            while True:
                sample = render_image(_SAMPLE_SEED, "val", index, settings)
                height, width = sample.image.shape[:2]
                if (width - height if orientation == "wide" else height - width) >= 96:
                    break
                index += 1
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise OSError(f"could not encode {file_name}")
        files[file_name] = encoded.tobytes()
        height_px, width_px = sample.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width_px, "height": height_px})
        for box, class_index, area in zip(sample.boxes, sample.class_indices, sample.areas, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(class_index) + 1,
                                "bbox": [round(float(value), 3) for value in box],
                                "area": round(float(area), 3), "iscrowd": 0})
    document = {
        "info": {"description": "asff_viz bundled samples (synthetic shapes)", "seed": _SAMPLE_SEED},
        "categories": [{"id": index + 1, "name": name, "supercategory": "shape"}
                       for index, name in enumerate(CLASS_NAMES)],
        "images": images,
        "annotations": annotations,
    }
    files[ANNOTATIONS_FILE.name] = (json.dumps(document, separators=(",", ":")) + "\n").encode()
    return files


def generate_samples(out_dir: str | Path, files: dict[str, bytes] | None = None) -> list[Path]:
    """Write the sample images with `annotations.json` into `out_dir` (`files`, default a fresh
    `render_samples()`); returns the image paths."""
    from ..utils.fileio import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in (files if files is not None else render_samples()).items():
        atomic_write(out_dir / name, lambda stream, data=data: stream.write(data))
        paths.append(out_dir / name)
    if out_dir.resolve() == SAMPLES_DIR:
        _annotation_document.cache_clear()
    return [path for path in paths if path.name != ANNOTATIONS_FILE.name]
