"""The official training augmentation and the evaluation pre-processing (datasets and batching: `loading`).

Box formats: transforms take targets (N, 5) ``[class, x1, y1, x2, y2]`` in image pixels (as
``COCODetection`` yields them), optionally with a 6th column, the mixup ratio. ``TrainTransform`` returns
labels (max_labels, 6) ``[class, cx, cy, w, h, mixup_ratio]`` in *input* pixels, zero-padded; a row is a
real box when its w > 0 (``valid_label_count``).

Images are RGB uint8 (the official code works on BGR; every step here gives the official result on the
same pixels in RGB order). Randomness comes from an explicit ``numpy.random.Generator``; when none is
given, one is seeded from torch's RNG, which PyTorch seeds differently in every DataLoader worker and which
``torch.manual_seed`` makes reproducible.

Pipeline of ``TrainTransform`` (official ``TrainTransform(p=0.5)``), each step switchable:

1. photometric distortion (brightness, contrast, hue, saturation; each with probability 0.5),
2. zoom-out ``expand`` onto a canvas of the mean colour (probability 0.5, scale 1-4),
3. SSD random crop (min-IoU modes),
4. horizontal flip (probability 0.5),
5. small random affine (rotation +-10 deg, scale 0.9-1.1, translation +-10%, shear +-2 deg) with the
   official box shrink (probability 0.5),
6. resize to the square input size with a random interpolation, /255, ImageNet mean/std, CHW float32,
7. boxes to (cx, cy, w, h) in input pixels; boxes with min(w, h) <= ``min_box_size`` are dropped; if none
   is left, the un-augmented resized original is used instead.

The whole pipeline stays in this one module (a little over 400 lines) so that it reads top to bottom against
the official ``data_augment.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from asff_viz.inference.transforms import IMAGENET_MEAN, IMAGENET_STD
from asff_viz.ops.boxes import box_iou

INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_NEAREST, cv2.INTER_LANCZOS4)
MAX_LABELS = 50
# SSD crop modes: None keeps the image; otherwise (min IoU, max IoU) every box must have with the crop.
_CROP_MODES = (None, (0.1, None), (0.3, None), (0.5, None), (0.7, None), (0.9, None), (None, None))


def random_generator() -> np.random.Generator:
    """A Generator seeded from torch's global RNG (per-worker in DataLoaders, reproducible by manual_seed)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


def _width_height(size: int | Sequence[int]) -> tuple[int, int]:
    """Input size as (width, height): an int is a square side, a pair is (width, height)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    width, height = size
    return int(width), int(height)


# Steps


@dataclass(frozen=True)
class PhotometricParameters:
    """One draw of the photometric distortion; None means the step is not applied."""

    brightness: float | None = None  # added to every channel, U(-32, 32)
    contrast: float | None = None  # multiplies every channel, U(0.5, 1.5)
    hue_shift: int | None = None  # added to OpenCV hue (0..179), randint(-18, 18), modulo 180
    saturation: float | None = None  # multiplies saturation, U(0.5, 1.5)


def draw_photometric(rng: np.random.Generator) -> PhotometricParameters:
    """Each of the four steps independently with probability 0.5, as officially."""
    brightness = float(rng.uniform(-32, 32)) if rng.integers(2) else None
    contrast = float(rng.uniform(0.5, 1.5)) if rng.integers(2) else None
    hue_shift = int(rng.integers(-18, 19)) if rng.integers(2) else None
    saturation = float(rng.uniform(0.5, 1.5)) if rng.integers(2) else None
    return PhotometricParameters(brightness, contrast, hue_shift, saturation)


def _scale_shift(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # Float to uint8 by truncation after clipping, like the official in-place assignment.
    return np.clip(values.astype(np.float64) * alpha + beta, 0, 255).astype(np.uint8)


def apply_photometric(image: np.ndarray, parameters: PhotometricParameters) -> np.ndarray:
    """Photometric distortion of an RGB uint8 image; equals the official BGR result with channels swapped.

    Brightness and contrast act on all channels alike, and RGB<->HSV conversion of RGB data computes the
    same H, S, V as BGR<->HSV of the same pixels stored BGR, so the result does not depend on the order.
    As officially, the image always makes the HSV round trip (which is slightly lossy in uint8).
    """
    image = image.copy()
    if parameters.brightness is not None:
        image = _scale_shift(image, beta=parameters.brightness)
    if parameters.contrast is not None:
        image = _scale_shift(image, alpha=parameters.contrast)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    if parameters.hue_shift is not None:
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + parameters.hue_shift) % 180
    if parameters.saturation is not None:
        hsv[:, :, 1] = _scale_shift(hsv[:, :, 1], alpha=parameters.saturation)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def random_expand(
    image: np.ndarray, boxes: np.ndarray, fill: Sequence[float], probability: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Zoom out: place the image at random on a canvas 1-4x larger filled with ``fill``.

    boxes: (N, 4) x1, y1, x2, y2, shifted with the image.
    """
    if rng.random() > probability:
        return image, boxes
    height, width, depth = image.shape
    scale = rng.uniform(1, 4)
    # The ratio range keeps both sides at least as large as the image (official's retry never fires).
    ratio = math.sqrt(rng.uniform(max(0.5, 1.0 / scale**2), min(2.0, scale**2)))
    canvas_width = max(width, int(scale * ratio * width))
    canvas_height = max(height, int(scale / ratio * height))
    left = int(rng.integers(0, canvas_width - width + 1))
    top = int(rng.integers(0, canvas_height - height + 1))
    canvas = np.empty((canvas_height, canvas_width, depth), dtype=image.dtype)
    canvas[:, :] = fill  # float fill into uint8: truncated, as officially
    canvas[top : top + height, left : left + width] = image
    boxes = boxes.copy()
    boxes[:, :2] += (left, top)
    boxes[:, 2:] += (left, top)
    return canvas, boxes


def random_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    ratios: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """SSD random crop (official ``_crop``).

    A mode is drawn from {keep, min IoU 0.1/0.3/0.5/0.7/0.9, unconstrained}; up to 50 crops of scale
    U(0.3, 1) and aspect ratio within [0.5, 2] are tried; a crop is accepted when every box meets the
    mode's IoU bound and at least one box centre lies inside it. Boxes whose centre is inside are kept,
    clipped to the crop and shifted. When all 50 tries fail a new mode is drawn.
    """
    height, width, _ = image.shape
    if len(boxes) == 0:
        return image, boxes, labels, ratios
    while True:
        mode = _CROP_MODES[int(rng.integers(len(_CROP_MODES)))]
        if mode is None:
            return image, boxes, labels, ratios
        min_iou = -math.inf if mode[0] is None else mode[0]
        max_iou = math.inf if mode[1] is None else mode[1]
        for _ in range(50):
            scale = rng.uniform(0.3, 1.0)
            ratio = math.sqrt(rng.uniform(max(0.5, scale * scale), min(2.0, 1.0 / scale / scale)))
            crop_width = int(scale * ratio * width)
            crop_height = int(scale / ratio * height)
            # Official randrange(width - w) fails when the crop is full width; then the only offset is 0.
            left = int(rng.integers(0, max(1, width - crop_width)))
            top = int(rng.integers(0, max(1, height - crop_height)))
            roi = np.array((left, top, left + crop_width, top + crop_height))
            iou = box_iou(torch.as_tensor(boxes, dtype=torch.float64),
                          torch.as_tensor(roi[None], dtype=torch.float64)).numpy()  # official matrix_iou
            if not (min_iou <= iou.min() and iou.max() <= max_iou):
                continue
            centers = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = np.logical_and(roi[:2] < centers, centers < roi[2:]).all(axis=1)
            if not inside.any():
                continue
            cropped = image[roi[1] : roi[3], roi[0] : roi[2]]
            kept = boxes[inside].copy()
            kept[:, :2] = np.maximum(kept[:, :2], roi[:2]) - roi[:2]
            kept[:, 2:] = np.minimum(kept[:, 2:], roi[2:]) - roi[:2]
            kept_ratios = None if ratios is None else ratios[inside].copy()
            return cropped, kept, labels[inside].copy(), kept_ratios


def flip_horizontal(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right; boxes (N, 4) x1, y1, x2, y2 map to (W - x2, y1, W - x1, y2)."""
    width = image.shape[1]
    boxes = boxes.copy()
    boxes[:, 0::2] = width - boxes[:, 2::-2]
    return np.ascontiguousarray(image[:, ::-1]), boxes


def affine_matrix(
    angle: float, scale: float, translation: tuple[float, float], shear: tuple[float, float], height: int, width: int
) -> np.ndarray:
    """(3, 3) matrix shear @ translation @ rotation-scale about the image centre (angles in degrees)."""
    rotation = np.eye(3)
    rotation[:2] = cv2.getRotationMatrix2D(angle=angle, center=(width / 2, height / 2), scale=scale)
    shift = np.eye(3)
    shift[0, 2], shift[1, 2] = translation
    skew = np.eye(3)
    skew[0, 1] = math.tan(math.radians(shear[0]))
    skew[1, 0] = math.tan(math.radians(shear[1]))
    return skew @ shift @ rotation


def warp_affine(
    image: np.ndarray, boxes: np.ndarray, matrix: np.ndarray, angle: float, border_value: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Warp image and boxes with ``matrix``; boxes shrink by sqrt(max(|sin a|, |cos a|)) (official).

    The box of the four warped corners is larger than the object for rotated boxes; the official code
    shrinks it about its centre to compensate, then clips it to the image (boxes may become empty).
    """
    height, width = image.shape[:2]
    warped = cv2.warpPerspective(
        image, matrix, dsize=(width, height), flags=cv2.INTER_LINEAR, borderValue=tuple(float(v) for v in border_value)
    )
    count = len(boxes)
    if count == 0:
        return warped, boxes
    corners = np.ones((count * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(count * 4, 2)  # x1y1, x2y2, x1y2, x2y1
    corners = (corners @ matrix.T)[:, :2].reshape(count, 8)
    xs, ys = corners[:, [0, 2, 4, 6]], corners[:, [1, 3, 5, 7]]
    radians = math.radians(angle)
    reduction = max(abs(math.sin(radians)), abs(math.cos(radians))) ** 0.5
    center_x = (xs.min(1) + xs.max(1)) / 2
    center_y = (ys.min(1) + ys.max(1)) / 2
    half_width = (xs.max(1) - xs.min(1)) * reduction / 2
    half_height = (ys.max(1) - ys.min(1)) * reduction / 2
    warped_boxes = np.stack(
        [
            np.clip(center_x - half_width, 0, width),
            np.clip(center_y - half_height, 0, height),
            np.clip(center_x + half_width, 0, width),
            np.clip(center_y + half_height, 0, height),
        ],
        axis=1,
    )
    return warped, warped_boxes


def random_affine(
    image: np.ndarray,
    boxes: np.ndarray,
    rng: np.random.Generator,
    border_value: Sequence[float],
    degrees: tuple[float, float] = (-10, 10),
    translate: tuple[float, float] = (0.1, 0.1),
    scale: tuple[float, float] = (0.9, 1.1),
    shear: tuple[float, float] = (-2, 2),
) -> tuple[np.ndarray, np.ndarray]:
    """Official ``_random_affine``: rotation, scale, translation and shear drawn uniformly.

    As officially, the x translation is a fraction of the image *height* and the y translation of the
    width (the axes are swapped in the official code; it matters only for non-square images).
    """
    height, width = image.shape[:2]
    angle = rng.uniform(*degrees)
    zoom = rng.uniform(*scale)
    translation = (
        (rng.random() * 2 - 1) * translate[0] * height,
        (rng.random() * 2 - 1) * translate[1] * width,
    )
    skew = (rng.uniform(*shear), rng.uniform(*shear))
    matrix = affine_matrix(angle, zoom, translation, skew, height, width)
    return warp_affine(image, boxes, matrix, angle, border_value)


def to_normalized_tensor(
    image: np.ndarray,
    size: int | Sequence[int],
    interpolation: int = cv2.INTER_LINEAR,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Resize an RGB uint8 image to ``size`` (no letterbox), /255, subtract mean, divide by std: (3, H, W)."""
    resized = cv2.resize(image, _width_height(size), interpolation=interpolation)
    array = resized.astype(np.float32) / 255.0
    # float64 mean/std applied in place, as the official ValTransform: bit-identical to `transforms.preprocess`.
    array -= np.asarray(mean, np.float64)
    array /= np.asarray(std, np.float64)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _xyxy_to_input_cxcywh(boxes: np.ndarray, image_width: int, image_height: int, size: tuple[int, int]) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 in image pixels -> cx, cy, w, h in input pixels."""
    converted = np.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) * 0.5,
            (boxes[:, 1] + boxes[:, 3]) * 0.5,
            boxes[:, 2] - boxes[:, 0],
            boxes[:, 3] - boxes[:, 1],
        ],
        axis=1,
    )
    converted[:, 0::2] *= size[0] / image_width
    converted[:, 1::2] *= size[1] / image_height
    return converted


def valid_label_count(labels: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Number of real boxes in padded labels (..., M, 6): rows whose w (column 3) is > 0."""
    return (labels[..., 3] > 0).sum(-1)


# Transforms


class TrainTransform:
    """Official training augmentation (see the module docstring), each step switchable.

    Args:
        expand_probability: probability of the zoom-out step (official p=0.5).
        max_labels: rows of the padded label array (official 50).
        min_box_size: boxes whose min(w, h) in input pixels is not above this are dropped (official 6;
            lower it for data with very small objects, e.g. 2 for 8 px synthetic objects at 320).
        photometric, expand, crop, flip, affine: switch each step; all off with
            ``random_interpolation=False`` gives exactly ``ValTransform``'s image.
        random_interpolation: resize with an interpolation drawn from ``INTERPOLATIONS`` (official) or
            always INTER_LINEAR.
        mean, std: RGB normalization; ``mean * 255`` is also the fill colour of expand and affine borders.
    """

    def __init__(
        self,
        *,
        expand_probability: float = 0.5,
        max_labels: int = MAX_LABELS,
        min_box_size: float = 6.0,
        photometric: bool = True,
        expand: bool = True,
        crop: bool = True,
        flip: bool = True,
        affine: bool = True,
        random_interpolation: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.expand_probability = expand_probability
        self.max_labels = max_labels
        self.min_box_size = min_box_size
        self.photometric = photometric
        self.expand = expand
        self.crop = crop
        self.flip = flip
        self.affine = affine
        self.random_interpolation = random_interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.fill = tuple(255.0 * m for m in self.mean)

    def _interpolation(self, rng: np.random.Generator) -> int:
        if self.random_interpolation:
            return INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
        return cv2.INTER_LINEAR

    def _padded(self, labels: np.ndarray) -> torch.Tensor:
        padded = np.zeros((self.max_labels, 6), np.float32)
        count = min(len(labels), self.max_labels)
        padded[:count] = labels[:count]
        return torch.from_numpy(padded)

    def __call__(
        self,
        image: np.ndarray,
        targets: np.ndarray,
        size: int | Sequence[int],
        rng: np.random.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            targets: (N, 5) ``[class, x1, y1, x2, y2]`` image pixels, or (N, 6) with the mixup ratio last.
            size: input side (int) or (width, height).
            rng: randomness source (default: seeded from torch's RNG).
        Returns:
            image (3, S, S) float32 normalized; labels (max_labels, 6) float32
            ``[class, cx, cy, w, h, mixup_ratio]`` in input pixels, zero rows after the real ones.
        """
        rng = random_generator() if rng is None else rng
        size = _width_height(size)
        targets = np.asarray(targets, np.float64)
        if targets.size == 0:
            targets = targets.reshape(0, 5)
        if targets.ndim != 2 or targets.shape[1] not in (5, 6):
            raise ValueError(f"targets must be (N, 5) or (N, 6) [class, x1, y1, x2, y2(, ratio)], got {targets.shape}")
        labels = targets[:, 0].copy()
        boxes = targets[:, 1:5].copy()
        ratios = targets[:, 5].copy() if targets.shape[1] == 6 else np.ones(len(targets))
        if len(boxes) == 0:
            # Officially, images without boxes are only resized: a pure negative example.
            tensor = to_normalized_tensor(image, size, self._interpolation(rng), self.mean, self.std)
            return tensor, self._padded(np.zeros((0, 6)))

        original_height, original_width = image.shape[:2]
        augmented = image
        if self.photometric:
            augmented = apply_photometric(augmented, draw_photometric(rng))
        if self.expand:
            augmented, boxes = random_expand(augmented, boxes, self.fill, self.expand_probability, rng)
        if self.crop:
            augmented, boxes, labels, ratios = random_crop(augmented, boxes, labels, ratios, rng)
        if self.flip and rng.integers(2):
            augmented, boxes = flip_horizontal(augmented, boxes)
        if self.affine and rng.integers(2):
            augmented, boxes = random_affine(augmented, boxes, rng, self.fill)

        height, width = augmented.shape[:2]
        tensor = to_normalized_tensor(augmented, size, self._interpolation(rng), self.mean, self.std)
        converted = _xyxy_to_input_cxcywh(boxes, width, height, size)
        keep = np.minimum(converted[:, 2], converted[:, 3]) > self.min_box_size
        if not keep.any():
            # Nothing usable survived: fall back to the un-augmented original (official), unfiltered.
            tensor = to_normalized_tensor(image, size, self._interpolation(rng), self.mean, self.std)
            labels = targets[:, 0]
            converted = _xyxy_to_input_cxcywh(targets[:, 1:5], original_width, original_height, size)
            ratios = targets[:, 5] if targets.shape[1] == 6 else np.ones(len(targets))
            keep = np.ones(len(targets), bool)
        rows = np.concatenate([labels[keep, None], converted[keep], ratios[keep, None]], axis=1)
        return tensor, self._padded(rows)


class ValTransform:
    """Evaluation pre-processing (official ``ValTransform``): plain square resize INTER_LINEAR, normalize.

    ``ValTransform()(image, size)`` -> (3, S, S) float32 for an (H, W, 3) uint8 RGB image.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: np.ndarray, size: int | Sequence[int]) -> torch.Tensor:
        return to_normalized_tensor(image, size, cv2.INTER_LINEAR, self.mean, self.std)


# Datasets, sampler, collate


