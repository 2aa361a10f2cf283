"""Image decoding (formats, alpha, bit depth, EXIF orientation, bad input), the official pre-processing
bit for bit, and the mapping of boxes and maps back to the original image."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
import torch

from asff_viz.inference.transforms import ImageError, ImageTransform, decode_image, denormalize, preprocess, read_image


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(image_bgr_or_gray: np.ndarray, suffix: str, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(suffix, image_bgr_or_gray, params or [])
    assert ok, suffix
    return buffer.tobytes()


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an EXIF APP1 segment holding only the orientation tag (0x0112) right after the JPEG's SOI."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)  # tag, type SHORT, count 1, value, padding
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + segment + jpeg[2:]


def test_grayscale_is_replicated_to_three_channels():
    gray = np.random.default_rng(1).integers(0, 256, (9, 13), dtype=np.uint8)
    image = decode_image(encode(gray, ".png"))
    assert image.shape == (9, 13, 3) and image.dtype == np.uint8
    for channel in range(3):
        assert np.array_equal(image[:, :, channel], gray)


def test_colour_order_is_rgb():
    rgb = random_rgb(8, 10)
    assert np.array_equal(decode_image(encode(rgb[:, :, ::-1], ".png")), rgb)


def test_rgba_is_composited_on_white():
    rgb = random_rgb(4, 6, seed=2)
    alpha = np.zeros((4, 6), np.uint8)
    alpha[0] = 255  # opaque row
    alpha[1] = 128  # half transparent
    bgra = np.dstack([rgb[:, :, ::-1], alpha])
    for suffix, params in ((".png", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101])):
        image = decode_image(encode(bgra, suffix, params), f"rgba{suffix}")
        assert image.shape == (4, 6, 3)
        assert np.array_equal(image[0], rgb[0]), suffix
        assert (image[2:] == 255).all(), suffix  # fully transparent: white, not the hidden colour
        blended = np.round(rgb[1].astype(np.float32) * 128 / 255 + 255 * (1 - 128 / 255))
        assert np.abs(image[1].astype(np.float32) - blended).max() <= 1, suffix


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    rng = np.random.default_rng(3)
    deep = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    image = decode_image(encode(deep, ".png"))
    assert image.dtype == np.uint8
    expected = np.round(deep[:, :, ::-1].astype(np.float64) / 257).astype(np.uint8)
    assert np.array_equal(image, expected)
    gray = decode_image(encode(np.full((3, 3), 65535, np.uint16), ".png"))
    assert (gray == 255).all()


@pytest.mark.parametrize("orientation, expected_shape, corner", [
    (1, (20, 40, 3), (0, 0)),     # as stored: marker top-left
    (3, (20, 40, 3), (19, 39)),   # rotated 180: marker bottom-right
    (6, (40, 20, 3), (0, 19)),    # rotate 90 clockwise to display: marker top-right
    (8, (40, 20, 3), (39, 0)),    # rotate 90 counter-clockwise: marker bottom-left
])
def test_exif_orientation_is_applied(orientation, expected_shape, corner):
    stored = np.full((20, 40, 3), 40, np.uint8)
    stored[:6, :6] = (0, 0, 255)  # red (BGR) block at the stored top-left corner
    jpeg = with_exif_orientation(encode(stored, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]), orientation)
    image = decode_image(jpeg, "rotated.jpg")
    assert image.shape == expected_shape
    red = image[:, :, 0].astype(int) - image[:, :, 2].astype(int) > 100
    rows, cols = np.nonzero(red)
    assert abs(rows.mean() - corner[0]) < 4 and abs(cols.mean() - corner[1]) < 4


@pytest.mark.parametrize("suffix, params", [(".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]), (".bmp", []),
                                            (".tiff", [])])
def test_lossless_formats_decode_exactly(suffix, params, tmp_path):
    rgb = random_rgb(11, 17, seed=4)
    path = tmp_path / f"image{suffix}"
    path.write_bytes(encode(rgb[:, :, ::-1], suffix, params))
    assert np.array_equal(read_image(path), rgb)


def test_bad_input_raises_image_error_naming_the_file(tmp_path):
    with pytest.raises(ImageError, match="broken.jpg"):
        decode_image(b"\xff\xd8\xff\xe0 definitely not a jpeg", "broken.jpg")
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", "nothing.png")
    truncated = encode(random_rgb(64, 64), ".png")[:40]
    with pytest.raises(ImageError, match="cut.png"):
        decode_image(truncated, "cut.png")
    with pytest.raises(ImageError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")


def test_oversized_image_is_refused():
    data = encode(random_rgb(200, 300), ".png")
    with pytest.raises(ImageError, match="big.png.*MP"):
        decode_image(data, "big.png", max_pixels=10_000)
    assert decode_image(data, "big.png", max_pixels=60_000).shape == (200, 300, 3)


@pytest.mark.parametrize("shape, size, suffix", [((37, 53), 64, ".png"), ((120, 90), 96, ".jpg"),
                                                 ((64, 64), 64, ".png")])
def test_preprocess_equals_the_official_pipeline_bit_for_bit(shape, size, suffix, tmp_path):
    path = tmp_path / f"photo{suffix}"
    cv2.imwrite(str(path), random_rgb(*shape, seed=5)[:, :, ::-1])
    # The official ValTransform, step by step (eval.py / demo.py means and std as Python tuples).
    official = cv2.imread(str(path))
    official = cv2.resize(official, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    official = official[:, :, ::-1]
    official /= 255.0
    official -= (0.485, 0.456, 0.406)
    official /= (0.229, 0.224, 0.225)
    official = torch.from_numpy(np.ascontiguousarray(official.transpose(2, 0, 1), dtype=np.float32))

    tensor, transform = preprocess(read_image(path), size)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, size, size)
    assert torch.equal(tensor, official)
    assert (transform.original_height, transform.original_width, transform.size) == (*shape, size)
    # denormalize undoes it to within rounding.
    resized = cv2.resize(read_image(path), (size, size), interpolation=cv2.INTER_LINEAR)
    assert np.abs(denormalize(tensor).astype(int) - resized.astype(int)).max() <= 1


def test_preprocess_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 32"):
        preprocess(random_rgb(10, 10), 50)
    with pytest.raises(ValueError, match="RGB uint8"):
        preprocess(np.zeros((10, 10), np.uint8), 64)


def test_transform_maps_boxes_and_points():
    transform = ImageTransform(original_height=300, original_width=500, size=100)
    assert (transform.scale_x, transform.scale_y) == (5.0, 3.0)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0], [-5.0, 0.0, 120.0, 100.0]])
    expected = torch.tensor([[50.0, 60.0, 150.0, 120.0], [-25.0, 0.0, 600.0, 300.0]])  # no clipping
    assert torch.equal(transform.boxes_to_original(boxes), expected)
    assert np.allclose(transform.boxes_to_original(boxes.numpy()), expected.numpy())
    assert transform.points_to_input(150.0, 120.0) == (30.0, 40.0)
    assert ImageTransform(**transform.to_dict()) == transform


@pytest.mark.parametrize("height, width", [(107, 75), (64, 64), (33, 200)])
def test_map_cells_land_on_the_right_original_pixels(height, width):
    """Cell (r, c) of an 8x8 map over a 64 px input covers input pixels [8c, 8c + 8); an original pixel shows
    the cell that contains its centre."""
    transform = ImageTransform(height, width, 64)
    cells = 8
    grid = np.arange(cells * cells, dtype=np.float32).reshape(cells, cells)
    mapped = transform.map_to_original(grid)
    assert mapped.shape == (height, width)
    for y in range(height):
        for x in range(width):
            input_x, input_y = transform.points_to_input(x + 0.5, y + 0.5)
            row, col = int(input_y // 8), int(input_x // 8)
            assert mapped[y, x] == grid[row, col], (y, x)
    stacked = transform.map_to_original(np.stack([grid, -grid]))
    assert stacked.shape == (2, height, width) and np.array_equal(stacked[1], -mapped)
    linear = transform.map_to_original(grid, interpolation="linear")
    assert linear.shape == (height, width) and linear.min() >= 0 and linear.max() <= cells * cells - 1
    with pytest.raises(ValueError):
        transform.map_to_original(grid, interpolation="cubic")
