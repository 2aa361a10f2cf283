"""Reading images and the official pre-processing, with the transform recorded so results map back exactly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_PIXELS = 64_000_000  # refuse larger images: decoding them alone takes gigabytes


class ImageError(ValueError):
    """An image that cannot be used; the message names it and says why."""


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 (H, W, 3).

    EXIF orientation is applied; grayscale is replicated to 3 channels; an alpha channel is composited on
    white; 16-bit images are scaled to 8 bits.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageError(f"{name}: empty file")
    check_pixel_count(buffer, name, max_pixels)
    try:
        image = _decode_keeping_alpha(buffer)
    except cv2.error as error:
        raise ImageError(f"{name}: cannot be decoded as an image ({error.msg if hasattr(error, 'msg') else error})"
                         ) from None
    if image is None or image.size == 0:
        raise ImageError(f"{name}: not a readable image (corrupt, or not JPEG/PNG/BMP/WebP/TIFF).")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageError(f"{name}: {image.shape[1]}x{image.shape[0]} pixels, more than the "
                         f"{max_pixels / 1e6:.0f} MP this tool accepts; downscale it first.")
    return to_rgb_uint8(image, name)


def check_pixel_count(buffer: np.ndarray, name: str, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an encoded image of more than `max_pixels` from a 1/8-scale decode, before decoding it whole.

    The policy of every tool that reads images (detect, the app, datasets for train/evaluate/analyze): a huge
    image cannot exhaust memory.
    """
    try:
        header = cv2.imdecode(buffer, cv2.IMREAD_REDUCED_GRAYSCALE_8) if buffer.size else None
    except cv2.error:
        header = None
    if header is not None and header.shape[0] * header.shape[1] * 64 > max_pixels:
        raise ImageError(f"{name}: about {header.shape[1] * 8}x{header.shape[0] * 8} pixels, more than the "
                         f"{max_pixels / 1e6:.0f} MP this tool accepts; downscale it first.")


def _decode_keeping_alpha(buffer: np.ndarray) -> np.ndarray | None:
    """Decode with the EXIF orientation applied, keeping an alpha channel where the file has one.

    OpenCV keeps alpha only with IMREAD_UNCHANGED, and that flag skips the EXIF orientation; any other flag
    drops alpha (transparent pixels would show their hidden colour, often black). So: JPEG (never alpha) is
    decoded once, oriented; other formats are first decoded unchanged, and decoded again oriented only when
    they turn out to have no alpha. (An image with alpha *and* an EXIF rotation is not rotated.)
    """
    oriented = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH
    if buffer[:3].tobytes() == b"\xff\xd8\xff":
        return cv2.imdecode(buffer, oriented)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is not None and image.ndim == 3 and image.shape[2] == 4:
        return image
    return cv2.imdecode(buffer, oriented)


def to_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """An OpenCV-decoded array (gray, BGR or BGRA; 8 or 16 bit or float) -> RGB uint8 (H, W, 3)."""
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        composite = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        image = composite.round().astype(np.uint8)
    elif image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, ::-1])


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of an image file as the readers return it (EXIF orientation applied), from its header
    alone; None when the header cannot be read (the reader then says what is wrong)."""
    try:
        from PIL import Image
    except ImportError:  # Pillow comes with matplotlib; without it there is nothing to compare
        return None
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1) if image.format == "JPEG" else 1
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); ImageError names the file if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    return decode_image(path.read_bytes(), str(path), max_pixels)


@dataclass(frozen=True)
class ImageTransform:
    """The official pre-processing geometry: a plain square resize of the original image to `size`.

    Input pixel (x, y) corresponds to original pixel (x * scale_x, y * scale_y), for boxes and maps alike.
    """

    original_height: int
    original_width: int
    size: int

    @property
    def scale_x(self) -> float:
        return self.original_width / self.size

    @property
    def scale_y(self) -> float:
        return self.original_height / self.size

    def boxes_to_original(self, boxes: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """(..., 4) xyxy in input pixels -> original pixels (no clipping, as officially)."""
        factor = [self.scale_x, self.scale_y, self.scale_x, self.scale_y]
        if isinstance(boxes, torch.Tensor):
            return boxes * boxes.new_tensor(factor)
        return np.asarray(boxes, dtype=np.float64) * np.asarray(factor)

    def points_to_input(self, x: float, y: float) -> tuple[float, float]:
        """Original-image pixel coordinates -> input pixel coordinates."""
        return x / self.scale_x, y / self.scale_y

    def map_to_original(self, grid: np.ndarray, interpolation: str = "nearest") -> np.ndarray:
        """A (H_l, W_l) or (C, H_l, W_l) map over the input -> (H, W) / (C, H, W) over the original image.

        'nearest' keeps every cell a sharp rectangle: original pixel (x, y) takes the value of the cell that
        contains its centre, cell floor((x + 0.5) * W_l / W). (cv2's INTER_NEAREST uses floor(x * W_l / W),
        which shifts cell edges by up to one pixel towards the right/bottom.) 'linear' interpolates between cell
        centres.
        """
        grid = np.asarray(grid, dtype=np.float32)
        if interpolation == "nearest":
            height, width = grid.shape[-2:]
            rows = _source_cells(self.original_height, height)
            cols = _source_cells(self.original_width, width)
            return np.ascontiguousarray(grid[..., rows[:, None], cols[None, :]])
        if interpolation != "linear":
            raise ValueError(f"interpolation must be 'nearest' or 'linear', got {interpolation!r}")
        size = (self.original_width, self.original_height)
        if grid.ndim == 2:
            return cv2.resize(grid, size, interpolation=cv2.INTER_LINEAR)
        return np.stack([cv2.resize(channel, size, interpolation=cv2.INTER_LINEAR) for channel in grid])

    def to_dict(self) -> dict:
        return {"original_height": self.original_height, "original_width": self.original_width, "size": self.size}


def _source_cells(output_length: int, cells: int) -> np.ndarray:
    """For each of `output_length` pixels, the index of the cell (out of `cells`) containing its centre."""
    centres = (np.arange(output_length, dtype=np.float64) + 0.5) * cells / output_length
    return np.minimum(np.floor(centres).astype(np.int64), cells - 1)


def preprocess(image: np.ndarray, size: int) -> tuple[torch.Tensor, ImageTransform]:
    """RGB uint8 (H, W, 3) -> ((3, size, size) float32 normalized tensor, ImageTransform).

    As the official `ValTransform`: cv2 INTER_LINEAR square resize on uint8, /255, ImageNet mean/std.
    """
    if size % 32:
        raise ValueError(f"input size must be a multiple of 32, got {size}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    tensor = torch.from_numpy(normalize(resized)).permute(2, 0, 1).contiguous()
    return tensor, ImageTransform(height, width, size)


def normalize(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (H, W, 3) in ImageNet-normalized space.

    The arithmetic is the official `ValTransform`'s, so the result is bit-identical to it: /255 in float32,
    then the mean and std as float64 tuples applied in place (computed in float64, stored as float32).
    Rounding the mean and std to float32 first would differ by one ulp on some pixels.
    """
    array = image.astype(np.float32)
    array /= 255.0
    array -= IMAGENET_MEAN
    array /= IMAGENET_STD
    return array


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalized tensor -> RGB uint8 (S, S, 3), for display."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = (tensor.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return image.round().byte().permute(1, 2, 0).numpy()
