"""The Detector and the detection CLI on a tiny random-weights checkpoint: images, a corrupt file, a video,
missing inputs and a missing default model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import asff_viz.checkpoint
from asff_viz import DetectionResult, Detector
from asff_viz.checkpoint import save_checkpoint
from asff_viz.detect import annotate, main, write_image_rgb
from asff_viz.figures.palette import class_rgb as class_colour
from asff_viz.inference.transforms import ImageTransform
from asff_viz.models import build_model

CLASS_NAMES = ["cat", "dog", "bird"]
RECORD_KEYS = {"image", "bbox", "score", "category_id", "category_name"}



@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, build_model(width=0.125, depth=0.33, num_classes=3),
                    {"class_names": CLASS_NAMES, "input_size": 64})
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "street.jpg"), rng.integers(0, 256, (72, 100, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "room.png"), rng.integers(0, 256, (90, 60, 3), dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this JPEG was cut off")
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


def check_record(record: dict) -> None:
    assert RECORD_KEYS <= set(record)
    x, y, w, h = record["bbox"]
    assert len(record["bbox"]) == 4 and w >= 0 and h >= 0
    assert 0.01 <= record["score"] <= 1
    assert record["category_name"] == CLASS_NAMES[record["category_id"]]


def test_detector_returns_boxes_in_original_pixels(weights, image_folder):
    detector = Detector(weights, conf_threshold=0.01)
    assert detector.size == 64 and detector.class_names == CLASS_NAMES
    path = image_folder / "street.jpg"
    result = detector(path)
    assert isinstance(result, DetectionResult) and len(result) > 0
    assert result.transform == ImageTransform(72, 100, 64)
    assert result.decoded.shape == (4 * (4 + 16 + 64), 8)
    scale = torch.tensor([100 / 64, 72 / 64, 100 / 64, 72 / 64])
    assert torch.allclose(result.boxes, result.detections.boxes * scale)
    assert torch.equal(result.scores, result.detections.scores)
    assert result.class_names == [CLASS_NAMES[i] for i in result.labels.tolist()]
    # Each kept box is its decoded row converted to xyxy.
    rows = result.decoded[result.detections.indices]
    assert torch.allclose(result.detections.boxes[:, :2], rows[:, :2] - rows[:, 2:4] / 2)
    # A path and the same RGB array give the same result; results are ordinary (editable) tensors.
    from_array = detector(cv2.imread(str(path))[:, :, ::-1].copy())
    assert torch.equal(from_array.boxes, result.boxes)
    result.boxes += 1
    batch = detector.predict_batch([path, image_folder / "room.png"])
    # A batch of two may run other conv kernels than a batch of one (CPU-dependent): equal up to float32 round-off.
    torch.testing.assert_close(batch[0].scores, result.scores, rtol=1e-5, atol=1e-6)
    assert batch[1].transform == ImageTransform(90, 60, 64)
    records = batch[1].to_records("room.png")
    assert len(records) == len(batch[1])
    for record in records:
        check_record(record)


def test_detector_rejects_bad_arguments(weights):
    with pytest.raises(ValueError, match="multiple of 32"):
        Detector(weights, size=100)
    detector = Detector(weights)
    with pytest.raises(ValueError, match="RGB uint8"):
        detector(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="RGB uint8"):
        detector(np.zeros((10, 10, 4), np.uint8))


def test_cli_on_a_folder_writes_images_and_records(weights, image_folder, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="asff_viz.detect"):
        status = main(["--weights", str(weights), "--source", str(image_folder), "--out", str(out),
                       "--show-threshold", "0"])
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "room.png", "street.jpg"]
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]

    records = json.loads((out / "detections.json").read_text())
    assert {r["image"] for r in records} == {"street.jpg", "room.png"}
    for record in records:
        check_record(record)
        assert set(record) == RECORD_KEYS
    # The records are the Detector's, in original pixels.
    expected = Detector(weights)(image_folder / "room.png").to_records("room.png")
    assert [r for r in records if r["image"] == "room.png"] == expected
    # Boxes were drawn: the annotated image differs from the input, with the original size.
    original = cv2.imread(str(image_folder / "room.png"))
    annotated = cv2.imread(str(out / "room.png"))
    assert annotated.shape == original.shape and not np.array_equal(annotated, original)


def test_cli_on_a_video_writes_a_video_and_per_frame_records(weights, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (96, 64))
    assert writer.isOpened()
    for frame in range(3):
        writer.write(np.full((64, 96, 3), 60 * frame + 20, np.uint8))
    writer.release()
    out = tmp_path / "out"
    assert main(["--weights", str(weights), "--source", str(video), "--out", str(out)]) == 0
    capture = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 3 and frames[0].shape == (64, 96, 3)
    records = json.loads((out / "detections.json").read_text())
    assert {r["frame"] for r in records} == {0, 1, 2}
    assert all(r["image"] == "clip.avi" for r in records)
    for record in records:
        check_record(record)


def test_cli_missing_or_empty_source(weights, tmp_path, capsys):
    assert main(["--weights", str(weights), "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--weights", str(weights), "--source", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "holds no images" in capsys.readouterr().err


def test_cli_only_corrupt_files_fails(weights, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG nothing else")
    assert main(["--weights", str(weights), "--source", str(folder), "--out", str(tmp_path / "o")]) == 1
    assert "none of the 1 files" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_the_source(weights, image_folder, capsys):
    assert main(["--weights", str(weights), "--source", str(image_folder), "--out", str(image_folder)]) == 1
    assert "overwrite the originals" in capsys.readouterr().err


def test_cli_without_weights_or_embedded_default(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(asff_viz.checkpoint, "default_checkpoint_path", lambda: tmp_path / "asff_synthetic.pt")
    assert main(["--source", str(image_folder), "--out", str(tmp_path / "o")]) == 1
    error = capsys.readouterr().err
    assert "embedded default model" in error and "asff_synthetic.pt" in error and "--weights PATH" in error


def test_annotation_colours_are_rgb_and_scale_with_the_image(tmp_path):
    for height, width in ((64, 96), (720, 1280)):
        image = np.full((height, width, 3), 128, np.uint8)
        boxes = torch.tensor([[0.2 * width, 0.3 * height, 0.6 * width, 0.9 * height]])
        result = DetectionResult(boxes, torch.tensor([0.9]), torch.tensor([0]), ["cat"], None,
                                 ImageTransform(height, width, 64), torch.zeros(0, 8))
        drawn = annotate(image, result, show_threshold=0.5)
        assert np.array_equal(image, np.full((height, width, 3), 128, np.uint8))  # the input is untouched
        y = int(0.6 * height)
        left_edge = drawn[y, int(0.2 * width)]
        assert tuple(left_edge) == class_colour(0) == (230, 159, 0)  # render.CLASS_COLORS[0], #E69F00: one palette
        thickness = int((drawn[y, : width // 2] != 128).any(axis=1).sum())
        assert thickness >= (1 if height < 100 else 3)
        path = tmp_path / f"drawn_{width}.png"
        write_image_rgb(path, drawn)
        assert tuple(cv2.imread(str(path))[y, int(0.2 * width)][::-1]) == class_colour(0)
        # Below the threshold nothing is drawn.
        assert np.array_equal(annotate(image, result, show_threshold=0.95), image)
