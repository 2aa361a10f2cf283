"""What a synthetic image is drawn from: cluttered backgrounds, object colours that contrast with what lies under
them, object textures (float32 RGB in 0..255), and the masks of the eight shape classes. Pure functions of a numpy
Generator; `asff_viz.data.synthetic` composes them into images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "letter_a",
    "letter_z",
)
"""Class names in class-index order; COCO category id = class index + 1."""


# Object colours must stand out from the background under them: a minimum Euclidean RGB distance
# between the object's main colour and 90% of the background pixels it covers.
_MIN_COLOUR_DISTANCE = 90.0
_COLOUR_TRIES = 24
_GLYPHS = {"letter_a": "A", "letter_z": "Z"}
_GLYPH_FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
)
# Glyphs are drawn once at a large scale (about 220 px tall) so that big letters keep smooth edges.
_GLYPH_SCALE = 10.0
_GLYPH_THICKNESSES = (17, 25, 32)
_glyph_cache: dict[tuple[str, int, int], np.ndarray] = {}


def _linear_ramp(height: int, width: int, angle: float) -> np.ndarray:
    """(H, W) float32 in 0..1 increasing along direction ``angle`` (radians)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    projection = xs * math.cos(angle) + ys * math.sin(angle)
    span = float(projection.max() - projection.min())
    return (projection - projection.min()) / max(span, 1e-6)


def _contrasting_colour(rng: np.random.Generator, background_pixels: np.ndarray) -> np.ndarray:
    """A random RGB colour far from (nearly) all of ``background_pixels`` (K, 3).

    The 10th percentile of the distances counts, not the distance to the mean colour: an object placed
    across a boundary (over part of an earlier object, say) must stand out from both sides. When no try
    is far enough (very colourful backgrounds) the best try is used.
    """
    best_colour, best_score = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        distances = np.linalg.norm(background_pixels - colour, axis=1)
        score = float(np.partition(distances, len(distances) // 10)[len(distances) // 10])
        if score >= _MIN_COLOUR_DISTANCE:
            return colour
        if score > best_score:
            best_colour, best_score = colour, score
    return best_colour


def object_texture(
    rng: np.random.Generator, height: int, width: int, background_pixels: np.ndarray
) -> np.ndarray:
    """(H, W, 3) float32 fill of an object: solid, stripes, noise or gradient, contrasting the background.

    background_pixels: (K, 3) samples of the pixels the object will cover.
    """
    primary = _contrasting_colour(rng, background_pixels)
    background_mean = background_pixels.mean(axis=0)
    # The second colour moves further away from the background, so the whole texture keeps the contrast.
    away = np.sign(primary - background_mean)
    away[away == 0] = 1.0
    secondary = np.clip(primary + away * rng.uniform(40, 90, size=3), 0, 255).astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # solid
        return np.broadcast_to(primary, (height, width, 3)).astype(np.float32)
    if kind == 1:  # stripes
        period = rng.uniform(2.5, max(3.0, min(height, width) / 3.0))
        ramp = _linear_ramp(height, width, rng.uniform(0, math.pi))
        extent = float(np.hypot(height, width))
        stripes = (np.floor(ramp * extent / period) % 2).astype(np.float32)[..., None]
        return primary * (1 - stripes) + secondary * stripes
    if kind == 2:  # noise around the primary colour
        noise = rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(rng.uniform(10, 28))
        return np.clip(primary + noise, 0, 255)
    ramp = _linear_ramp(height, width, rng.uniform(0, 2 * math.pi))[..., None]
    return primary * (1 - ramp) + secondary * ramp


def render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 cluttered background: smooth colour field, soft blobs, lines, arcs, noise patches.

    Clutter is kept distinct from the object classes: blobs are blurred (no crisp discs or squares),
    lines are long and thin and arcs are open, so the ground truth stays unambiguous.
    """
    # Smooth base: a two-colour gradient, a low-frequency colour field, or a blend of both.
    colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    ramp = _linear_ramp(height, width, rng.uniform(0, 2 * math.pi))[..., None]
    gradient = colours[0] * (1 - ramp) + colours[1] * ramp
    grid = rng.uniform(0, 255, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3)).astype(np.float32)
    field = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    kind = rng.integers(3)
    base = gradient if kind == 0 else field if kind == 1 else 0.5 * (gradient + field)

    # Soft blobs, drawn at quarter resolution, blurred and upsampled: cheap and edge-free.
    low_height, low_width = max(4, height // 4), max(4, width // 4)
    blob_colour = np.zeros((low_height, low_width, 3), np.float32)
    blob_alpha = np.zeros((low_height, low_width), np.float32)
    blob_coverage = np.zeros((low_height, low_width), np.float32)
    noise_alpha = np.zeros((low_height, low_width), np.float32)
    for _ in range(int(rng.integers(0, 9))):
        center = (int(rng.integers(0, low_width)), int(rng.integers(0, low_height)))
        axes = (
            int(rng.uniform(0.06, 0.3) * low_width) + 1,
            int(rng.uniform(0.06, 0.3) * low_height) + 1,
        )
        angle = float(rng.uniform(0, 180))
        if rng.random() < 0.3:  # a patch of background noise texture
            cv2.ellipse(noise_alpha, center, axes, angle, 0, 360, float(rng.uniform(0.5, 1.0)), -1)
        else:
            colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
            cv2.ellipse(blob_colour, center, axes, angle, 0, 360, colour, -1)
            cv2.ellipse(blob_alpha, center, axes, angle, 0, 360, float(rng.uniform(0.35, 0.8)), -1)
            cv2.ellipse(blob_coverage, center, axes, angle, 0, 360, 1.0, -1)
    if blob_alpha.any():
        sigma = float(rng.uniform(2.5, 4.5))  # 10-18 px at full resolution: never a crisp disc
        # Blurring the colour layer weights it by coverage; dividing by the blurred coverage undoes that,
        # so blob edges fade in opacity rather than darkening towards black.
        blurred = [cv2.GaussianBlur(layer, (0, 0), sigma) for layer in (blob_colour, blob_alpha, blob_coverage)]
        colour_low = blurred[0] / np.maximum(blurred[2], 1e-3)[..., None]
        colour_full = cv2.resize(colour_low, (width, height), interpolation=cv2.INTER_LINEAR)
        alpha_full = cv2.resize(blurred[1], (width, height), interpolation=cv2.INTER_LINEAR)[..., None]
        base = base * (1 - alpha_full) + np.clip(colour_full, 0, 255) * alpha_full
    if noise_alpha.any():
        noise_alpha = cv2.GaussianBlur(noise_alpha, (0, 0), 2.0)
        noise_alpha = cv2.resize(noise_alpha, (width, height), interpolation=cv2.INTER_LINEAR)[..., None]
        noise = rng.standard_normal((height, width, 1), dtype=np.float32) * np.float32(rng.uniform(18, 40))
        base = base + noise_alpha * noise

    base = np.ascontiguousarray(np.clip(base, 0, 255), dtype=np.float32)
    diagonal = math.hypot(height, width)
    for _ in range(int(rng.integers(0, 9))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        if rng.random() < 0.6:  # a long straight line
            thickness = int(rng.integers(1, 4))
            start = rng.uniform(0, 1, size=2) * (width, height)
            angle = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.3, 1.0) * diagonal
            end = start + length * np.array([math.cos(angle), math.sin(angle)])
            cv2.line(base, _point(start), _point(end), colour, thickness, cv2.LINE_AA)
        else:  # a thin open arc, large enough not to read as a ring
            thickness = int(rng.integers(1, 3))
            center = _point(rng.uniform(0, 1, size=2) * (width, height))
            radius = int(rng.uniform(0.15, 0.6) * min(height, width)) + 2
            start_angle = float(rng.uniform(0, 360))
            cv2.ellipse(
                base,
                center,
                (radius, int(radius * rng.uniform(0.5, 1.0)) + 1),
                float(rng.uniform(0, 180)),
                start_angle,
                start_angle + float(rng.uniform(40, 180)),
                colour,
                thickness,
                cv2.LINE_AA,
            )
    return base


def _point(xy: np.ndarray) -> tuple[int, int]:
    return int(round(float(xy[0]))), int(round(float(xy[1])))


def _fill_polygons(height: int, width: int, polygons: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """Draw polygons given in unit-box coordinates (0..1, shared frame) filled with 255 or 0, in order."""
    mask = np.zeros((height, width), np.uint8)
    for vertices, value in polygons:
        # Continuous coordinates (0..width) to pixel-centre coordinates, fixed point with 4 fraction bits.
        points = vertices * (width, height) - 0.5
        cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], int(value), cv2.LINE_8, 4)
    return mask


def _fit_unit_box(*vertex_sets: np.ndarray) -> list[np.ndarray]:
    """Scale vertex sets jointly so the first one's bounding box becomes the unit box."""
    lower = vertex_sets[0].min(axis=0)
    span = np.maximum(vertex_sets[0].max(axis=0) - lower, 1e-6)
    return [(vertices - lower) / span for vertices in vertex_sets]


def _rotate(vertices: np.ndarray, angle: float) -> np.ndarray:
    cosine, sine = math.cos(angle), math.sin(angle)
    return vertices @ np.array([[cosine, sine], [-sine, cosine]])


def _regular_polygon(count: int, radii: Sequence[float], phase: float) -> np.ndarray:
    angles = phase + np.arange(count) * (2 * math.pi / count)
    radius = np.resize(np.asarray(radii, np.float64), count)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _glyph_mask(letter: str, font: int, thickness: int) -> np.ndarray:
    """Cropped uint8 mask of a letter drawn with cv2.putText, cached (glyphs are deterministic)."""
    key = (letter, font, thickness)
    if key not in _glyph_cache:
        scale = _GLYPH_SCALE
        (text_width, text_height), baseline = cv2.getTextSize(letter, font, scale, thickness)
        pad = thickness * 2
        canvas = np.zeros((text_height + baseline + 2 * pad, text_width + 2 * pad), np.uint8)
        cv2.putText(canvas, letter, (pad, pad + text_height), font, scale, 255, thickness, cv2.LINE_AA)
        _glyph_cache[key] = _crop_to_extent(canvas >= 128)
    return _glyph_cache[key]


def _crop_to_extent(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] * 255).astype(np.uint8)


def shape_mask(class_name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 mask of one object of ``class_name`` stretched to fill the canvas."""
    if class_name == "circle":
        (outline,) = _fit_unit_box(_regular_polygon(96, [1.0], 0.0))
        return _fill_polygons(height, width, [(outline, 255)])
    if class_name == "ring":
        outer = _regular_polygon(96, [1.0], 0.0)
        inner = outer * rng.uniform(0.42, 0.62)
        outer, inner = _fit_unit_box(outer, inner)
        return _fill_polygons(height, width, [(outer, 255), (inner, 0)])
    if class_name == "square":
        corners = _regular_polygon(4, [1.0], math.pi / 4)
        (corners,) = _fit_unit_box(_rotate(corners, math.radians(rng.uniform(-15, 15))))
        return _fill_polygons(height, width, [(corners, 255)])
    if class_name == "triangle":
        corners = _regular_polygon(3, [1.0], rng.uniform(0, 2 * math.pi))
        (corners,) = _fit_unit_box(corners)
        return _fill_polygons(height, width, [(corners, 255)])
    if class_name == "star":
        star = _regular_polygon(10, [1.0, rng.uniform(0.4, 0.5)], rng.uniform(0, 2 * math.pi))
        (star,) = _fit_unit_box(star)
        return _fill_polygons(height, width, [(star, 255)])
    if class_name == "cross":
        arm = rng.uniform(0.22, 0.34)
        plus = np.array(
            [[-arm, -1], [arm, -1], [arm, -arm], [1, -arm], [1, arm], [arm, arm],
             [arm, 1], [-arm, 1], [-arm, arm], [-1, arm], [-1, -arm], [-arm, -arm]],
            np.float64,
        )
        (plus,) = _fit_unit_box(_rotate(plus, math.radians(rng.uniform(-15, 15))))
        return _fill_polygons(height, width, [(plus, 255)])
    if class_name in _GLYPHS:
        font = _GLYPH_FONTS[int(rng.integers(len(_GLYPH_FONTS)))]
        thickness = _GLYPH_THICKNESSES[int(rng.integers(len(_GLYPH_THICKNESSES)))]
        glyph = _glyph_mask(_GLYPHS[class_name], font, thickness)
        angle = float(rng.uniform(-12, 12))
        glyph_height, glyph_width = glyph.shape
        pad = max(glyph_height, glyph_width) // 2
        padded = cv2.copyMakeBorder(glyph, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        center = (padded.shape[1] / 2.0, padded.shape[0] / 2.0)
        rotation = cv2.getRotationMatrix2D(center, angle, 1.0)
        rotated = cv2.warpAffine(padded, rotation, (padded.shape[1], padded.shape[0]), flags=cv2.INTER_LINEAR)
        rotated = _crop_to_extent(rotated >= 128)
        shrinking = height * width < rotated.shape[0] * rotated.shape[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        stretched = cv2.resize(rotated, (width, height), interpolation=interpolation)
        return np.where(stretched >= 128, 255, 0).astype(np.uint8)
    raise ValueError(f"unknown class {class_name!r}; expected one of {CLASS_NAMES}")
