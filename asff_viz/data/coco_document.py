"""Reading a COCO annotation file safely: the file read and its structure checked (lists, categories, images with
integer ids, file names and sizes, unique ids) before anything is built on it, and image file names kept inside
the image folder. Every problem is a `DatasetError` naming the file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from asff_viz.data.errors import DatasetError


def is_int(value: Any) -> bool:
    """An integer JSON value (not a bool, not 1.0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite JSON number (not a bool, not NaN or Infinity, which Python's json reads)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_bbox(value: Any) -> bool:
    """A COCO bbox: a list of 4 finite numbers (no NaN, no bool)."""
    return isinstance(value, (list, tuple)) and len(value) == 4 and all(map(is_finite_number, value))


def load_annotation_document(annotation_file: Path) -> dict:
    """Read and validate the structure of a COCO annotation file (types, unique ids)."""
    if annotation_file.is_dir():
        raise DatasetError(f"annotation file {annotation_file} is a folder; pass the COCO annotation JSON in it")
    if not annotation_file.is_file():
        raise DatasetError(
            f"annotation file {annotation_file} does not exist; pass the path of a COCO annotation JSON "
            "(for the synthetic set: DIR/annotations/train.json or val.json)"
        )
    try:
        with open(annotation_file, "rb") as file:
            document = json.load(file)
    except PermissionError:
        raise DatasetError(f"annotation file {annotation_file} cannot be read: permission denied") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(
            f"annotation file {annotation_file} is not valid JSON ({error}); "
            "expected a COCO annotation file with 'images', 'annotations' and 'categories'"
        ) from None
    except RecursionError:
        raise DatasetError(f"annotation file {annotation_file} is nested too deeply to be a COCO annotation "
                           "file") from None
    except OSError as error:
        raise DatasetError(f"annotation file {annotation_file} cannot be read: {error.strerror or error}") from None
    return validate_document(document, f"annotation file {annotation_file}")


def validate_document(document: Any, source: str | os.PathLike) -> dict:
    """Check the structure of a parsed COCO annotation document (lists, categories, images with integer ids,
    file names and sizes, unique ids); DatasetError naming `source` otherwise. Returns the document."""
    if not isinstance(document, dict):
        raise DatasetError(
            f"{source} holds a JSON {type(document).__name__}, not an object; "
            "expected a COCO annotation file with 'images', 'annotations' and 'categories' "
            "(a list at the top level is usually a detection results file)"
        )
    missing = [key for key in ("images", "categories") if key not in document]
    if missing:
        raise DatasetError(
            f"{source} is not in COCO format: it lacks {missing} "
            f"(it has {sorted(document)[:8]}); expected 'images', 'annotations' and 'categories'"
        )
    for key in ("images", "annotations", "categories"):
        if key in document and not isinstance(document[key], list):
            raise DatasetError(
                f"{source}: '{key}' must be a list, got {type(document[key]).__name__}"
            )
    document.setdefault("annotations", [])
    if not document["categories"]:
        raise DatasetError(
            f"{source} has no categories, so the class list cannot be derived; "
            "add the 'categories' entries ({'id': ..., 'name': ...})"
        )
    category_ids = set()
    for position, category in enumerate(document["categories"]):
        if (not isinstance(category, dict) or not is_int(category.get("id"))
                or not isinstance(category.get("name"), str)):
            raise DatasetError(
                f"{source}: categories[{position}] = {str(category)[:200]} "
                "needs an integer 'id' and a string 'name'"
            )
        if category["id"] in category_ids:
            raise DatasetError(
                f"{source}: category id {category['id']} appears twice; category ids "
                "must be unique (a repeated id would add a class and shift every label after it)"
            )
        category_ids.add(category["id"])
    seen_ids, seen_files = set(), {}
    for position, image in enumerate(document["images"]):
        if not isinstance(image, dict) or any(key not in image for key in ("id", "file_name", "width", "height")):
            raise DatasetError(
                f"{source}: images[{position}] = {str(image)[:200]} "
                "needs 'id', 'file_name', 'width' and 'height'"
            )
        problem = None
        if not is_int(image["id"]):
            problem = f"its id {str(image['id'])[:60]} is not an integer"
        elif not isinstance(image["file_name"], str) or not image["file_name"]:
            problem = "its file_name is not a non-empty string"
        elif not (is_int(image["width"]) and is_int(image["height"]) and image["width"] > 0
                  and image["height"] > 0):
            problem = f"width {image['width']!r} and height {image['height']!r} must be positive integers"
        if problem:
            raise DatasetError(f"{source}: images[{position}]: {problem}")
        if image["id"] in seen_ids:
            raise DatasetError(
                f"{source}: image id {image['id']} appears twice; image ids must be unique"
            )
        seen_ids.add(image["id"])
        # Two entries for one file would give it two sets of boxes (and sizes) and evaluate it twice.
        name = os.path.normpath(image["file_name"])
        if name in seen_files:
            raise DatasetError(
                f"{source}: file_name {image['file_name']!r} appears twice (image ids {seen_files[name]} and "
                f"{image['id']}); each image file must be listed once"
            )
        seen_files[name] = image["id"]
    return document


def inside_folder(file_name: str) -> bool:
    """Whether `file_name` names a file under the image folder: relative, with no '..' component."""
    relative = Path(file_name)
    return not relative.is_absolute() and ".." not in relative.parts and not file_name.startswith("~")


def check_image_dir(image_dir: Path) -> None:
    if not image_dir.is_dir():
        raise DatasetError(
            f"image folder {image_dir} does not exist or is not a folder; pass the folder that holds the "
            "files named by 'file_name' in the annotation file"
        )
    if not os.access(image_dir, os.R_OK | os.X_OK):
        raise DatasetError(f"image folder {image_dir} cannot be read: permission denied")
    with os.scandir(image_dir) as entries:
        if not any(True for _ in entries):
            raise DatasetError(
                f"image folder {image_dir} is empty; put the images there "
                "(for the synthetic set run: python -m asff_viz.data.synthetic --out DIR)"
            )
