"""Which cells of a pyramid level belong to a box: the one definition used by the analyses and by training's
fusion-weight log, and the object size bins.

Geometry: boxes are xyxy in *input* pixels (the square network input); the cell (row, col) of a level with stride s
has its centre at ((col + 0.5) s, (row + 0.5) s). A box covers the cells whose centre lies inside it; one that
covers none gets the cell holding its centre.
"""

from __future__ import annotations

import math

import numpy as np

LEVELS = 3  # pyramid levels, level 0 = stride 32

# Object size bins by sqrt(area) in original pixels. 32 and 96 are edges, so COCO's small (area < 32^2),
# medium (32^2 <= area < 96^2) and large bins are unions of these finer ones.
FINE_SIZE_EDGES = (0.0, 16.0, 32.0, 48.0, 64.0, 96.0, 128.0, 192.0, 256.0, math.inf)


FINE_SIZE_LABELS = ("<16", "16-32", "32-48", "48-64", "64-96", "96-128", "128-192", "192-256", ">=256")


COCO_SIZE_LABELS = ("small", "medium", "large")


COCO_SIZE_OF_FINE = (0, 0, 1, 1, 1, 2, 2, 2, 2)


def size_bins(areas) -> np.ndarray:
    """(N,) areas in square pixels -> (N,) fine size-bin indices into FINE_SIZE_LABELS."""
    sides = np.sqrt(np.clip(np.asarray(areas, dtype=np.float64), 0.0, None))
    return np.clip(np.searchsorted(np.asarray(FINE_SIZE_EDGES), sides, side="right") - 1, 0,
                   len(FINE_SIZE_LABELS) - 1)


def coco_size_bins(areas) -> np.ndarray:
    """(N,) areas -> (N,) indices into COCO_SIZE_LABELS (small < 32^2 <= medium < 96^2 <= large)."""
    return np.asarray(COCO_SIZE_OF_FINE)[size_bins(areas)]


def box_cell_mask(box_xyxy, stride: float, grid_shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the cells of a level whose centre lies inside the box (edges included).

    box_xyxy: (4,) in input pixels. A box that contains no cell centre (smaller than a cell, or thin) gets the
    single cell holding its centre instead, clamped to the grid, so that every box has at least one cell.
    """
    height, width = grid_shape
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    centres_x = (np.arange(width) + 0.5) * stride
    centres_y = (np.arange(height) + 0.5) * stride
    inside = (((centres_y >= y1) & (centres_y <= y2))[:, None] & ((centres_x >= x1) & (centres_x <= x2))[None, :])
    if not inside.any():
        row = min(max(int(math.floor((y1 + y2) / 2 / stride)), 0), height - 1)
        col = min(max(int(math.floor((x1 + x2) / 2 / stride)), 0), width - 1)
        inside[row, col] = True
    return inside


def mean_weights_in_box(fusion_weights, box_input_xyxy, strides) -> np.ndarray:
    """(3, 3) mean fusion weight of each source (column) at each target level (row) inside one box.

    fusion_weights: 3 arrays (3, H_l, W_l), level 0 (stride 32) first; box_input_xyxy: (4,) input pixels;
    strides: per level. Each row is an average of probability vectors, so it sums to 1.
    """
    result = np.zeros((LEVELS, LEVELS), dtype=np.float64)
    for level, (weights, stride) in enumerate(zip(fusion_weights, strides, strict=True)):
        mask = box_cell_mask(box_input_xyxy, stride, weights.shape[1:])
        result[level] = np.asarray(weights, dtype=np.float64)[:, mask].mean(axis=1)
    return result


def background_weights(fusion_weights, boxes_input_xyxy, strides) -> np.ndarray | None:
    """(3, 3) mean fusion weight of each source (column) at each target level (row) outside every box.

    The reference for the in-box means: what a level does where there is no object. A cell is inside when
    `box_cell_mask` puts it in any of the boxes (input pixels). None when a level has no cell left outside.
    """
    boxes = np.asarray(boxes_input_xyxy, dtype=np.float64).reshape(-1, 4)
    result = np.zeros((LEVELS, LEVELS), dtype=np.float64)
    for level, (weights, stride) in enumerate(zip(fusion_weights, strides, strict=True)):
        covered = np.zeros(weights.shape[1:], dtype=bool)
        for box in boxes:
            covered |= box_cell_mask(box, stride, weights.shape[1:])
        if covered.all():
            return None
        result[level] = np.asarray(weights, dtype=np.float64)[:, ~covered].mean(axis=1)
    return result
