"""Training augmentation, mixup, multi-scale batching and collation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from asff_viz.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricParameters,
    TrainTransform,
    ValTransform,
    apply_photometric,
    draw_photometric,
    flip_horizontal,
    valid_label_count,
)
from asff_viz.data.loading import MixupDataset, MultiScaleBatchSampler, TrainDataset, ValDataset, collate

GEOMETRIC_STEPS = ("expand", "crop", "flip", "affine")


def _no_augmentation(**steps_on) -> TrainTransform:
    """A transform with every random step off except those named."""
    flags = {name: False for name in ("photometric", *GEOMETRIC_STEPS)}
    flags.update(steps_on)
    return TrainTransform(random_interpolation=False, **flags)


def _rectangle_scene():
    """A white rectangle covering pixels x 30..99, y 30..69 of a black 160x120 image, and its box."""
    image = np.zeros((120, 160, 3), np.uint8)
    image[30:70, 30:100] = 255
    return image, np.array([[3, 30, 30, 100, 70]], np.float32)


def _to_uint8(tensor: torch.Tensor) -> np.ndarray:
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    image = tensor.permute(1, 2, 0).numpy() * std + mean
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _label_box(row) -> np.ndarray:
    _, center_x, center_y, width, height, _ = row
    return np.array([center_x - width / 2, center_y - height / 2, center_x + width / 2, center_y + height / 2])


def _official_distort_bgr(image: np.ndarray, parameters: PhotometricParameters) -> np.ndarray:
    """The official ``_distort`` on a BGR image, with its random draws given."""

    def convert(values, alpha=1.0, beta=0.0):
        temporary = values.astype(float) * alpha + beta
        temporary[temporary < 0] = 0
        temporary[temporary > 255] = 255
        values[:] = temporary

    image = image.copy()
    if parameters.brightness is not None:
        convert(image, beta=parameters.brightness)
    if parameters.contrast is not None:
        convert(image, alpha=parameters.contrast)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    if parameters.hue_shift is not None:
        hue = image[:, :, 0].astype(int) + parameters.hue_shift
        hue %= 180
        image[:, :, 0] = hue
    if parameters.saturation is not None:
        convert(image[:, :, 1], alpha=parameters.saturation)
    return cv2.cvtColor(image, cv2.COLOR_HSV2BGR)


def test_photometric_on_rgb_matches_official_on_bgr():
    rng = np.random.default_rng(0)
    image_rgb = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    draws = [PhotometricParameters(12.5, 1.3, -17, 0.6), PhotometricParameters(None, None, 18, 1.4)]
    draws += [draw_photometric(rng) for _ in range(6)]
    for parameters in draws:
        ours = apply_photometric(image_rgb, parameters)
        official = _official_distort_bgr(np.ascontiguousarray(image_rgb[:, :, ::-1]), parameters)
        np.testing.assert_array_equal(ours, official[:, :, ::-1])
    assert not np.array_equal(apply_photometric(image_rgb, draws[0]), image_rgb)


def test_flip_maps_boxes_exactly():
    image = np.zeros((30, 40, 3), np.uint8)
    image[3:9, 5:12] = 255  # pixels x 5..11, i.e. the box x 5..12 in continuous coordinates
    flipped, boxes = flip_horizontal(image, np.array([[5.0, 3.0, 12.0, 9.0]]))
    np.testing.assert_array_equal(boxes, [[28.0, 3.0, 35.0, 9.0]])
    columns = np.flatnonzero(flipped.any(axis=(0, 2)))
    assert (columns[0], columns[-1] + 1) == (28, 35)


@pytest.mark.parametrize("steps", [(name,) for name in GEOMETRIC_STEPS] + [GEOMETRIC_STEPS])
def test_geometric_steps_keep_the_box_on_the_object(steps):
    image, targets = _rectangle_scene()
    transform = _no_augmentation(**{name: True for name in steps})
    transform.min_box_size = 3  # rectangles shrunk below that are not measurable after resizing
    changed = 0
    for seed in range(12):
        tensor, labels = transform(image, targets, 128, rng=np.random.default_rng(seed))
        assert valid_label_count(labels) == 1
        box = _label_box(labels[0].numpy())
        white = _to_uint8(tensor).min(axis=2) > 190
        rows, columns = np.flatnonzero(white.any(axis=1)), np.flatnonzero(white.any(axis=0))
        measured = np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1])
        # Interpolation blurs edges by about a pixel; the official affine box shrink adds < 1%.
        tolerance = 1.5 + 0.01 * (box[2:] - box[:2]).max()
        np.testing.assert_allclose(box, measured, atol=tolerance, err_msg=f"steps {steps}, seed {seed}")
        changed += not np.allclose(box, [24, 32, 80, 74.6667], atol=0.01)
    assert changed > 0  # the steps did move the box


def test_all_steps_off_is_a_plain_resize():
    image, targets = _rectangle_scene()
    tensor, labels = _no_augmentation()(image, targets, 64, rng=np.random.default_rng(0))
    assert torch.equal(tensor, ValTransform()(image, 64))
    expected = np.zeros((50, 6), np.float32)
    expected[0] = [3, 65 * 64 / 160, 50 * 64 / 120, 70 * 64 / 160, 40 * 64 / 120, 1.0]
    np.testing.assert_allclose(labels.numpy(), expected, rtol=1e-6)


def test_photometric_alone_changes_pixels_not_boxes():
    image, targets = _rectangle_scene()
    image = image // 2 + 60
    plain_tensor, plain_labels = _no_augmentation()(image, targets, 64, rng=np.random.default_rng(0))
    changed_any = False
    for seed in range(4):
        tensor, labels = _no_augmentation(photometric=True)(image, targets, 64, rng=np.random.default_rng(seed))
        assert torch.equal(labels, plain_labels)
        changed_any |= not torch.equal(tensor, plain_tensor)
    assert changed_any


def test_output_shapes_dtypes_and_padding():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    targets = np.array([[0, 10, 10, 60, 50, 0.25], [5, 40, 30, 110, 85, 0.75]], np.float32)
    for seed in range(5):
        tensor, labels = TrainTransform(min_box_size=2)(image, targets, 96, rng=np.random.default_rng(seed))
        assert tensor.shape == (3, 96, 96) and tensor.dtype == torch.float32
        assert labels.shape == (50, 6) and labels.dtype == torch.float32
        count = int(valid_label_count(labels))
        assert 1 <= count <= 2
        assert torch.all(labels[count:] == 0)
        assert set(labels[:count, 0].tolist()) <= {0.0, 5.0}
        assert set(labels[:count, 5].tolist()) <= {0.25, 0.75}  # mixup ratios travel with their boxes
    tensor, _ = TrainTransform()(image, targets[:, :5], (64, 32), rng=np.random.default_rng(0))
    assert tensor.shape == (3, 32, 64)  # (width, height)


def test_min_box_size_filter_and_fallback():
    image = np.zeros((100, 100, 3), np.uint8)
    targets = np.array([[1, 10, 10, 14, 14], [2, 40, 40, 80, 80]], np.float32)  # 4 px and 40 px boxes
    _, labels = _no_augmentation()(image, targets, 100)
    assert labels[:, 0][: int(valid_label_count(labels))].tolist() == [2.0]
    _, labels = TrainTransform(min_box_size=2, **{k: False for k in ("photometric", *GEOMETRIC_STEPS)})(
        image, targets, 100
    )
    assert int(valid_label_count(labels)) == 2
    # Nothing survives the filter: the un-augmented original is used, unfiltered.
    _, labels = _no_augmentation()(image, targets[:1], 100)
    np.testing.assert_allclose(labels[0].numpy(), [1, 12, 12, 4, 4, 1])


def test_image_without_boxes_gives_zero_labels():
    image = np.full((40, 50, 3), 90, np.uint8)
    tensor, labels = TrainTransform()(image, np.zeros((0, 5), np.float32), 32)
    assert tensor.shape == (3, 32, 32)
    assert torch.count_nonzero(labels) == 0


def test_labels_are_capped_at_max_labels():
    image = np.zeros((200, 200, 3), np.uint8)
    targets = np.array([[0, x, y, x + 15, y + 15] for x in range(0, 200, 20) for y in range(0, 120, 20)], np.float32)
    _, labels = _no_augmentation()(image, targets, 200)
    assert len(targets) == 60 and int(valid_label_count(labels)) == 50


class _MemoryDataset:
    """Two constant images of different sizes with one box each."""

    class_names = ["a", "b"]

    def __init__(self):
        self.images = [np.full((20, 30, 3), 200, np.uint8), np.full((25, 20, 3), 100, np.uint8)]
        self.targets = [np.array([[0, 2, 2, 20, 15]], np.float32), np.array([[1, 1, 1, 15, 20]], np.float32)]

    def __len__(self):
        return len(self.images)

    def load_item(self, index):
        height, width = self.images[index].shape[:2]
        info = {"image_id": index + 1, "original_height": height, "original_width": width}
        return self.images[index].copy(), self.targets[index].copy(), info


def test_mixup_blends_top_left_and_weights_targets():
    dataset = MixupDataset(_MemoryDataset())
    image, targets, info = dataset.load_item(0, np.random.default_rng(3))
    ratio = float(np.clip(np.random.default_rng(3).beta(1.5, 1.5), 0, 1))
    assert 0 < ratio < 1 and info["mixup_image_id"] == 2 and info["mixup_ratio"] == ratio
    assert image.shape == (25, 30, 3) and image.dtype == np.uint8
    assert image[0, 0, 0] == int(np.float32(200 * ratio) + np.float32(100 * (1 - ratio)))
    assert image[22, 5, 0] == int(np.float32(100 * (1 - ratio)))  # only the second image
    assert image[5, 25, 0] == int(np.float32(200 * ratio))  # only the first image
    assert image[22, 25, 0] == 0  # neither
    np.testing.assert_allclose(targets, [[0, 2, 2, 20, 15, ratio], [1, 1, 1, 15, 20, 1 - ratio]], rtol=1e-6)

    dataset.enabled = False
    image, targets, info = dataset.load_item(0, np.random.default_rng(3))
    assert image.shape == (20, 30, 3) and "mixup_ratio" not in info
    np.testing.assert_array_equal(targets, [[0, 2, 2, 20, 15, 1]])


def test_train_dataset_sizes_and_mixup_switch():
    dataset = TrainDataset(_MemoryDataset(), _no_augmentation(), input_size=64, mixup=True)
    tensor, labels, info = dataset[0]
    assert tensor.shape == (3, 64, 64) and info["input_size"] == 64
    tensor, labels, info = dataset[(1, 96)]
    assert tensor.shape == (3, 96, 96) and info["input_size"] == 96
    ratios = [float(dataset[0][1][0, 5]) for _ in range(5)]
    assert any(ratio < 1 for ratio in ratios)
    dataset.mixup_enabled = False
    for index in range(2):
        labels = dataset[index][1]
        assert int(valid_label_count(labels)) == 1 and labels[0, 5] == 1.0


def test_multi_scale_sampler_is_the_same_on_every_rank():
    indices = list(range(100))
    samplers = [
        MultiScaleBatchSampler(
            DistributedSampler(indices, num_replicas=2, rank=rank, shuffle=True, seed=4),
            batch_size=3, drop_last=False, sizes=range(320, 609, 32), change_every=4, seed=11,
        )
        for rank in (0, 1)
    ]
    batches = [list(sampler) for sampler in samplers]
    sizes = [[batch[0][1] for batch in rank_batches] for rank_batches in batches]
    assert len(sizes[0]) == len(samplers[0]) == 17
    assert sizes[0] == sizes[1]
    assert {index for batch in batches[0] for index, _ in batch}.isdisjoint(
        {index for batch in batches[1] for index, _ in batch}
    )
    for batch in batches[0]:
        assert len({size for _, size in batch}) == 1  # one size per batch
    blocks = [sizes[0][start : start + 4] for start in range(0, len(sizes[0]), 4)]
    assert all(len(set(block)) == 1 for block in blocks)  # the size changes only every 4 batches
    assert len(set(sizes[0])) > 1 and set(sizes[0]) <= set(range(320, 609, 32))

    for sampler in samplers:
        sampler.set_epoch(1)
    assert samplers[0].sampler.epoch == 1  # reaches the DistributedSampler
    next_epoch = [[batch[0][1] for batch in sampler] for sampler in samplers]
    assert next_epoch[0] == next_epoch[1] and next_epoch[0] != sizes[0]

    samplers[0].fixed_size = 608
    assert {batch[0][1] for batch in samplers[0]} == {608}


def test_loader_collates_multi_scale_batches():
    dataset = TrainDataset(_MemoryDataset(), _no_augmentation(), input_size=64)
    sampler = MultiScaleBatchSampler(SequentialSampler(dataset), 2, False, sizes=(32, 64), change_every=1, seed=0)
    for images, labels, infos in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate):
        assert images.shape[:2] == (2, 3) and images.shape[2] == images.shape[3] in (32, 64)
        assert labels.shape == (2, 50, 6)
        assert [info["image_id"] for info in infos] == [1, 2]
        assert valid_label_count(labels).tolist() == [1, 1]


def test_val_dataset_items():
    dataset = ValDataset(_MemoryDataset(), size=64)
    image, info = dataset[1]
    assert image.shape == (3, 64, 64)
    assert (info["original_height"], info["original_width"], info["input_size"]) == (25, 20, 64)
    images, infos = collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 64, 64) and [i["image_id"] for i in infos] == [1, 2]
