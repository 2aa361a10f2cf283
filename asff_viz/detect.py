"""Detect objects in an image, a folder of images, or a video, and write annotated copies plus JSON records.

    python -m asff_viz.detect --source PATH --out DIR [--weights W] [--size N] [--conf 0.01] [--nms 0.65]
        [--show-threshold 0.3] [--device cpu]

Writes DIR/<name> (annotated image, same name and format as the source) or DIR/<stem>.mp4 (annotated
video; `<stem>_<suffix>.mp4` when two sources share a stem, e.g. clip.avi and clip.mp4), and
DIR/detections.json: a list with one record per box above --conf, {image, [frame,] bbox
[x, y, w, h] in original pixels, score, category_id, category_name}. Only boxes scoring at least
--show-threshold are drawn. Unreadable files, broken links and frames are reported and skipped. Exit status 0 when
anything was processed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .checkpoint import CheckpointError
from .figures.palette import class_rgb
from .inference.detector import DetectionResult, Detector
from .inference.postprocess import DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD
from .inference.transforms import IMAGE_SUFFIXES, ImageError, read_image
from .utils.allocator import keep_freed_memory
from .utils.argtypes import describe_os_error, device, input_size, output_folder, unit_interval
from .utils.fileio import atomic_write_text

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
SHOW_THRESHOLD = 0.3
DEFAULT_FPS = 25.0

def annotate(image: np.ndarray, result: DetectionResult, show_threshold: float = SHOW_THRESHOLD) -> np.ndarray:
    """A copy of RGB uint8 `image` with the boxes scoring >= show_threshold drawn, labelled `name score`.

    Line width and text size follow the image size, so labels stay readable on thumbnails and on 4K frames.
    Boxes are drawn lowest score first, so the best box of a cluster ends up on top.
    """
    canvas = np.ascontiguousarray(image).copy()
    height, width = canvas.shape[:2]
    shorter = min(height, width)
    line = max(1, round(shorter / 300))
    font_scale = max(0.3, shorter / 1000)
    text_thickness = max(1, round(font_scale * 1.5))
    font = cv2.FONT_HERSHEY_SIMPLEX
    keep = [i for i, score in enumerate(result.scores.tolist()) if score >= show_threshold]
    for i in reversed(keep):  # scores are sorted decreasing
        x1, y1, x2, y2 = result.boxes[i].tolist()
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            continue
        colour = class_rgb(int(result.labels[i]))
        corner1 = (int(round(max(min(x1, width - 1), 0))), int(round(max(min(y1, height - 1), 0))))
        corner2 = (int(round(max(min(x2, width - 1), 0))), int(round(max(min(y2, height - 1), 0))))
        cv2.rectangle(canvas, corner1, corner2, colour, line, cv2.LINE_8)  # crisp: exact class colour
        text = f"{result.class_names[i]} {float(result.scores[i]):.2f}"
        (text_width, text_height), baseline = cv2.getTextSize(text, font, font_scale, text_thickness)
        label_height = text_height + baseline + 2 * line
        left = min(corner1[0], max(0, width - text_width - 2 * line))
        # Above the box when there is room, else just inside its top edge.
        top = corner1[1] - label_height if corner1[1] - label_height >= 0 else corner1[1]
        cv2.rectangle(canvas, (left, top), (left + text_width + 2 * line, top + label_height), colour, -1)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        text_colour = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        cv2.putText(canvas, text, (left + line, top + line + text_height), font, font_scale, text_colour,
                    text_thickness, cv2.LINE_AA)
    return canvas


def write_image_rgb(path: Path, image: np.ndarray) -> None:
    """Write an RGB image with OpenCV (which expects BGR); raises ImageError when it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1])):
        raise ImageError(f"{path}: OpenCV could not write this file")


def find_inputs(source: Path) -> list[Path]:
    """The image and video files of `source`: the file itself, or a folder's files (sorted, not recursive).

    Broken symbolic links with an image or video suffix are listed too, so that they are reported as skipped.
    """
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir()
                  if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)


def output_names(inputs: Sequence[Path]) -> dict[Path, str]:
    """The file each input's annotated copy is written to: its own name (images), `<stem>.mp4` (videos).

    Inputs that would share an output (`clip.avi` and `clip.mp4` both give `clip.mp4`) get their suffix in the
    name instead (`clip_avi.mp4`, `clip_mp4.mp4`): no output overwrites another.
    """
    default = {path: path.name if not is_video(path) else f"{path.stem}.mp4" for path in inputs}
    counts: dict[str, int] = {}
    for name in default.values():
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    names = {}
    for path, name in default.items():
        if counts[name.lower()] > 1:
            name = f"{path.stem}_{path.suffix[1:].lower()}{Path(name).suffix}"
        names[path] = name
    return names


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def process_image(detector: Detector, path: Path, output: Path, show_threshold: float) -> list[dict]:
    """Detect in one image file, write its annotated copy to `output`; returns its records. Raises ImageError."""
    image = read_image(path)
    result = detector(image)
    write_image_rgb(output, annotate(image, result, show_threshold))
    return result.to_records(path.name)


def process_video(detector: Detector, path: Path, output: Path, show_threshold: float) -> list[dict]:
    """Detect in every frame of a video, write `output` (mp4) annotated; records carry the frame index.

    Raises ImageError when no frame can be read.
    """
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise ImageError(f"{path}: cannot be opened as a video (corrupt, or a codec OpenCV lacks).")
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer, records, frame_index = None, [], 0
    try:
        with tqdm(total=total, desc=path.name, unit="frame", leave=False) as progress:
            while True:
                ok, frame = capture.read()
                if not ok or frame is None:
                    break
                image = np.ascontiguousarray(frame[:, :, ::-1])  # OpenCV frames are BGR
                result = detector(image)
                records.extend(result.to_records(path.name, frame=frame_index))
                if writer is None:
                    writer = cv2.VideoWriter(str(output), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                             (image.shape[1], image.shape[0]))
                    if not writer.isOpened():
                        raise ImageError(f"{output}: OpenCV cannot write an mp4v video here.")
                writer.write(np.ascontiguousarray(annotate(image, result, show_threshold)[:, :, ::-1]))
                frame_index += 1
                progress.update(1)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if frame_index == 0:
        raise ImageError(f"{path}: no frame could be read (empty or corrupt video).")
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.detect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None,
                        help="checkpoint (asff_viz or official ASFF); default: the embedded model")
    parser.add_argument("--source", required=True, help="an image, a folder of images, or a video file")
    parser.add_argument("--out", required=True, type=output_folder, help="output folder (created if needed)")
    parser.add_argument("--size", type=input_size, default=None,
                        help="square input size, a multiple of 32; default: the checkpoint's input size")
    parser.add_argument("--conf", type=unit_interval, default=DISPLAY_CONF_THRESHOLD,
                        help="score threshold (objectness x class probability) for the records, 0..1")
    parser.add_argument("--nms", type=unit_interval, default=NMS_THRESHOLD, help="per-class NMS IoU threshold")
    parser.add_argument("--show-threshold", type=unit_interval, default=SHOW_THRESHOLD,
                        help="only boxes scoring at least this are drawn")
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run detection; returns the exit status (0 when at least one image or video was processed)."""
    args = parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source, out_dir = Path(args.source), Path(args.out)
    if not source.exists():
        return _fail(f"--source {source} does not exist.")
    try:
        inputs = find_inputs(source)
    except OSError as error:
        return _fail(f"--source {source} cannot be listed: {error.strerror or error}")
    if not inputs:
        return _fail(f"--source {source} holds no images ({', '.join(IMAGE_SUFFIXES)}) or videos "
                     f"({', '.join(VIDEO_SUFFIXES)}).")
    source_folder = source if source.is_dir() else source.parent
    if out_dir.resolve() == source_folder.resolve():
        return _fail(f"--out {out_dir} is the source folder: the annotated files would overwrite the originals. "
                     "Choose another output folder.")
    try:
        detector = Detector(args.weights, device=args.device, size=args.size, conf_threshold=args.conf,
                            nms_threshold=args.nms)
    except CheckpointError as error:
        return _fail(str(error).replace("pass weights=PATH", "pass --weights PATH"))
    except ValueError as error:
        return _fail(str(error))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return _fail(describe_os_error(error, out_dir))

    outputs = output_names(inputs)
    records: list[dict] = []
    processed, skipped = 0, 0
    with logging_redirect_tqdm():
        for path in tqdm(inputs, desc="detect", unit="file"):
            try:
                if path.is_symlink() and not path.exists():
                    raise ImageError(f"{path}: a broken symbolic link (its target {path.readlink()} does not exist)")
                process = process_video if is_video(path) else process_image
                records.extend(process(detector, path, out_dir / outputs[path], args.show_threshold))
                processed += 1
            except (ImageError, OSError, cv2.error) as error:
                skipped += 1
                lines = str(error).strip().splitlines()
                message = lines[0] if lines else type(error).__name__
                logger.warning("skipped %s", message if str(path) in message else f"{path}: {message}")
    json_path = out_dir / "detections.json"
    try:
        atomic_write_text(json_path, "[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]\n"
                          if records else "[]\n")
    except OSError as error:
        return _fail(describe_os_error(error, json_path))
    logger.info("%d of %d files processed (%d skipped), %d detections -> %s", processed, len(inputs), skipped,
                len(records), json_path)
    if processed == 0:
        return _fail(f"none of the {len(inputs)} files in {source} could be processed.")
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
