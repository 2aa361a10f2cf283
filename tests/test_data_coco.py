"""COCODetection: class mapping, official box conversion, skipped and fatal broken inputs."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest

from asff_viz.data.coco import COCODetection, convert_coco_bbox, load_rgb_image, xyxy_to_coco_bbox
from asff_viz.data.errors import DatasetError

WIDTH, HEIGHT = 32, 24


def _write_image(path, colour_bgr=(0, 0, 255)):
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:] = colour_bgr
    cv2.imwrite(str(path), image)


def _annotation(annotation_id, image_id, category_id, bbox, **extra):
    x, y, width, height = bbox
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "area": extra.pop("area", width * height), "iscrowd": extra.pop("iscrowd", 0), **extra}


def _dataset_files(tmp_path, images=None, annotations=None, categories=None, files=None):
    """Write a small COCO file and its images; returns (annotation path, image folder)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": i, "file_name": f"{i}.png", "width": WIDTH, "height": HEIGHT} for i in (1, 2)]
    if categories is None:
        categories = [{"id": 7, "name": "seven"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}]
    if annotations is None:
        annotations = [_annotation(1, 1, 5, (2, 3, 10, 8)), _annotation(2, 2, 7, (4, 4, 6, 6))]
    for image in images:
        if files is None or image["file_name"] in files:
            _write_image(image_dir / image["file_name"])
    annotation_file = tmp_path / "annotations.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return annotation_file, image_dir


def test_class_index_is_rank_of_sorted_category_id(tmp_path):
    dataset = COCODetection(*_dataset_files(tmp_path))
    assert dataset.category_ids == [2, 5, 7]
    assert dataset.class_names == ["two", "five", "seven"]
    image, targets, info = dataset[0]
    assert targets.dtype == np.float32 and targets.shape == (1, 5)
    assert targets[0, 0] == 1  # category 5 is the second smallest id
    assert dataset[1][1][0, 0] == 2  # category 7
    assert info == {"image_id": 1, "file_name": "1.png", "path": str(tmp_path / "images" / "1.png"),
                    "original_height": HEIGHT, "original_width": WIDTH}
    assert dataset.image_ids == [1, 2]


def test_image_is_rgb_uint8(tmp_path):
    dataset = COCODetection(*_dataset_files(tmp_path))
    image, _, _ = dataset[0]
    assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3)
    assert image[0, 0].tolist() == [255, 0, 0]  # written as BGR (0, 0, 255): red


def test_official_box_conversion(tmp_path):
    annotations = [
        _annotation(1, 1, 2, (-3.0, 2.0, 10.0, 5.0)),  # starts left of the image
        _annotation(2, 1, 2, (28.0, 20.0, 10.0, 10.0)),  # runs past the right and bottom edges
        _annotation(3, 2, 2, (4.5, 6.25, 3.0, 2.0)),
    ]
    dataset = COCODetection(*_dataset_files(tmp_path, annotations=annotations))
    np.testing.assert_array_equal(dataset.targets(0)[:, 1:], [[0, 2, 9, 6], [28, 20, 31, 23]])
    np.testing.assert_allclose(dataset.targets(1)[:, 1:], [[4.5, 6.25, 6.5, 7.25]])
    assert convert_coco_bbox((40, 2, 5, 5), WIDTH, HEIGHT) is None  # entirely right of the image


def test_xyxy_to_coco_bbox_inverts_the_conversion():
    bbox = (3.5, 2.0, 10.0, 6.5)
    converted = np.asarray([convert_coco_bbox(bbox, WIDTH, HEIGHT)])
    np.testing.assert_allclose(xyxy_to_coco_bbox(converted), [bbox])


def test_fixable_problems_are_skipped_and_counted(tmp_path, caplog):
    images = [{"id": i, "file_name": f"{i}.png", "width": WIDTH, "height": HEIGHT} for i in (1, 2, 3, 4, 5)]
    annotations = [
        _annotation(1, 1, 2, (2, 2, 5, 5)),  # good
        _annotation(2, 1, 2, (2, 2, -4, 5)),  # negative width
        _annotation(3, 1, 2, (2, 2, 5, 0)),  # zero height
        _annotation(4, 1, 2, (2, 2, 5, 5), area=0),  # zero area
        _annotation(5, 1, 2, (40, 2, 5, 5)),  # outside the image
        _annotation(6, 1, 99, (2, 2, 5, 5)),  # unknown category
        _annotation(7, 42, 2, (2, 2, 5, 5)),  # unknown image
        {"id": 8, "image_id": 1, "category_id": 2, "bbox": [1, 2, "x", 3]},  # malformed bbox
        _annotation(9, 2, 2, (2, 2, 5, 5)),  # its image file is missing
        _annotation(10, 3, 5, (2, 2, 5, 5)),
        # image 4 has no annotation; image 5's file is missing too
    ]
    files = {"1.png", "3.png", "4.png"}
    with caplog.at_level(logging.INFO, logger="asff_viz.data.coco"):
        dataset = COCODetection(*_dataset_files(tmp_path, images=images, annotations=annotations, files=files))
    assert len(dataset) == 3 and dataset.image_ids == [1, 3, 4]
    assert len(dataset.targets(0)) == 1 and len(dataset.targets(2)) == 0
    assert dataset.skipped == {
        "non_positive_box": 3, "outside_box": 1, "unknown_category": 1, "unknown_image": 1,
        "malformed_box": 1, "missing_image": 2, "empty_image": 1,
    }
    messages = [record.getMessage() for record in caplog.records if record.name == "asff_viz.data.coco"]
    assert len(messages) == 1  # one summary line
    assert "skipped 3 boxes with non-positive size" in messages[0]
    assert "2 images whose file is missing" in messages[0]
    assert "1 boxes outside their image" in messages[0]
    assert "kept 1 images without annotations" in messages[0]
    assert caplog.records[-1].levelno == logging.WARNING


def test_images_without_annotations_can_be_skipped(tmp_path):
    files = _dataset_files(tmp_path, annotations=[_annotation(1, 2, 2, (1, 1, 4, 4))])
    assert len(COCODetection(*files)) == 2
    dataset = COCODetection(*files, skip_images_without_annotations=True)
    assert dataset.image_ids == [2]


def test_crowd_annotations_are_targets_unless_excluded(tmp_path):
    annotations = [_annotation(1, 1, 2, (1, 1, 4, 4)), _annotation(2, 1, 2, (8, 8, 4, 4), iscrowd=1)]
    files = _dataset_files(tmp_path, annotations=annotations)
    assert len(COCODetection(*files).targets(0)) == 2
    assert len(COCODetection(*files, include_crowd=False).targets(0)) == 1


def test_transform_is_applied(tmp_path):
    dataset = COCODetection(*_dataset_files(tmp_path), transform=lambda image, targets: (image.shape, len(targets)))
    assert dataset[0][:2] == ((HEIGHT, WIDTH, 3), 1)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"foo": 1}', "not in COCO format"),
        ("[]", "not an object"),
        ('{"images": [], "annotations": [], "categories": []}', "no categories"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "file_name"),
        ('{"images": {}, "annotations": [], "categories": [{"id": 1, "name": "a"}]}', "must be a list"),
    ],
)
def test_files_that_are_not_coco_raise(tmp_path, content, expected):
    annotation_file, image_dir = _dataset_files(tmp_path)
    annotation_file.write_text(content)
    with pytest.raises(DatasetError, match=expected) as error:
        COCODetection(annotation_file, image_dir)
    assert str(annotation_file) in str(error.value)


def test_missing_annotation_file_raises(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as error:
        COCODetection(tmp_path / "nope.json", tmp_path)
    assert "nope.json" in str(error.value)


def test_missing_or_empty_image_folder_raises(tmp_path):
    annotation_file, image_dir = _dataset_files(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        COCODetection(annotation_file, tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty") as error:
        COCODetection(annotation_file, tmp_path / "empty")
    assert str(tmp_path / "empty") in str(error.value)


def test_no_usable_image_raises(tmp_path):
    annotation_file, image_dir = _dataset_files(tmp_path, files={"unrelated.png"})
    _write_image(image_dir / "unrelated.png")
    with pytest.raises(DatasetError, match="none of their files"):
        COCODetection(annotation_file, image_dir)


def test_undecodable_image_raises_naming_the_file(tmp_path):
    annotation_file, image_dir = _dataset_files(tmp_path)
    (image_dir / "2.png").write_bytes(b"this is not a png")
    dataset = COCODetection(annotation_file, image_dir)
    assert dataset[0][0].shape == (HEIGHT, WIDTH, 3)
    with pytest.raises(DatasetError, match="could not decode") as error:
        dataset[1]
    assert "2.png" in str(error.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_rgb_image(image_dir / "absent.png")
