"""Training and validation datasets over a `COCODetection`, and how their items become batches: the official
mixup, the augmented training dataset (an unreadable image is replaced, not fatal), the validation dataset,
multi-scale batch sampling and collation."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler

from asff_viz.data.augment import TrainTransform, ValTransform, random_generator
from asff_viz.data.errors import DatasetError


def default_workers() -> int:
    """Image-reading processes next to a model that only runs inference: one on a small machine (decoding is
    cheap next to a forward), two from eight cores up, none where there is a single core."""
    cores = os.cpu_count() or 1
    return 0 if cores < 2 else (1 if cores < 8 else 2)


class MixupDataset(Dataset):
    """Official ``MixupDetection``: blend each image with another one at random.

    λ ~ Beta(alpha, beta) clipped to [0, 1]; the partner is uniform among the other images; both are
    pasted top-left on a canvas of the larger height and width: ``image1 * λ + image2 * (1 - λ)`` (uint8,
    truncated); each image's targets get a 6th column λ or 1 - λ. With ``enabled = False`` (the official
    last epochs) images pass unchanged with ratio 1.

    ``dataset`` must offer ``load_item(index) -> (image RGB uint8, targets (N, 5), info)`` and ``len``
    (``COCODetection`` does). Items: (image (H, W, 3) uint8, targets (N, 6), info); info gains
    ``mixup_image_id`` and ``mixup_ratio`` when mixed.
    """

    def __init__(self, dataset: Any, *, alpha: float = 1.5, beta: float = 1.5, enabled: bool = True) -> None:
        self.dataset = dataset
        self.alpha = alpha
        self.beta = beta
        self.enabled = enabled

    def __len__(self) -> int:
        return len(self.dataset)

    def load_item(self, index: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        rng = random_generator() if rng is None else rng
        image, targets, info = self.dataset.load_item(index)
        targets = np.asarray(targets, np.float32).reshape(-1, 5)
        ratio = 1.0
        if self.enabled and len(self.dataset) > 1:
            ratio = float(np.clip(rng.beta(self.alpha, self.beta), 0.0, 1.0))
        if ratio >= 1.0:
            return image, np.hstack([targets, np.ones((len(targets), 1), np.float32)]), info

        partner = int(rng.integers(len(self.dataset) - 1))
        partner += partner >= index  # uniform among the *other* images
        try:
            image2, targets2, info2 = self.dataset.load_item(partner)
        except DatasetError as error:  # an unreadable partner: this item goes unmixed, and is counted
            ones = np.ones((len(targets), 1), np.float32)
            return image, np.hstack([targets, ones]), {**info, "unreadable": str(error)}
        targets2 = np.asarray(targets2, np.float32).reshape(-1, 5)
        height = max(image.shape[0], image2.shape[0])
        width = max(image.shape[1], image2.shape[1])
        mixed = np.zeros((height, width, 3), np.float32)
        mixed[: image.shape[0], : image.shape[1]] = image.astype(np.float32) * ratio
        mixed[: image2.shape[0], : image2.shape[1]] += image2.astype(np.float32) * (1.0 - ratio)
        mixed_targets = np.vstack(
            [
                np.hstack([targets, np.full((len(targets), 1), ratio, np.float32)]),
                np.hstack([targets2, np.full((len(targets2), 1), 1.0 - ratio, np.float32)]),
            ]
        )
        info = {**info, "mixup_image_id": info2.get("image_id"), "mixup_ratio": ratio}
        return mixed.astype(np.uint8), mixed_targets, info

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
        return self.load_item(index)


class TrainDataset(Dataset):
    """Training items: ``COCODetection`` -> optional mixup -> ``TrainTransform`` at a chosen input size.

    ``dataset[index]`` uses ``input_size``; ``dataset[(index, size)]`` uses ``size`` (what
    ``MultiScaleBatchSampler`` yields). Items: (image (3, S, S) float32, labels (max_labels, 6)
    ``[class, cx, cy, w, h, mixup_ratio]`` input pixels, info dict with ``input_size`` added).

    ``mixup_enabled`` switches mixup at run time. DataLoader workers hold copies of the dataset: set it
    before creating the epoch's iterator, and not with ``persistent_workers=True`` (the workers would
    keep the old value).
    """

    def __init__(
        self,
        dataset: Any,
        transform: TrainTransform | None = None,
        *,
        input_size: int = 608,
        mixup: bool = False,
        mixup_alpha: float = 1.5,
        mixup_beta: float = 1.5,
    ) -> None:
        self.dataset = dataset
        self.transform = transform if transform is not None else TrainTransform()
        self.input_size = input_size
        self.mixup = MixupDataset(dataset, alpha=mixup_alpha, beta=mixup_beta, enabled=mixup)

    @property
    def mixup_enabled(self) -> bool:
        return self.mixup.enabled

    @mixup_enabled.setter
    def mixup_enabled(self, enabled: bool) -> None:
        self.mixup.enabled = bool(enabled)

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        index, size = item if isinstance(item, (tuple, list)) else (item, self.input_size)
        rng = random_generator()
        unreadable = None
        # An image that cannot be read is replaced by the next readable one (counted by the training loop
        # through info["unreadable"]); only a dataset of which nothing can be read stops the run.
        for offset in range(len(self)):
            try:
                image, targets, info = self.mixup.load_item((int(index) + offset) % len(self), rng)
                break
            except DatasetError as error:  # the image itself: the next one takes its place
                unreadable = unreadable or str(error)
        else:
            raise DatasetError(f"none of the {len(self)} training images can be read (e.g. {unreadable})")
        tensor, labels = self.transform(image, targets, size, rng=rng)
        info = {**info, "input_size": int(size) if np.isscalar(size) else tuple(size)}
        if unreadable:
            info["unreadable"] = unreadable  # (a partner's failure is already recorded by the mixup)
        return tensor, labels, info


class ValDataset(Dataset):
    """Evaluation items: (image (3, S, S) float32 normalized, info).

    info holds ``image_id``, ``file_name``, ``path``, ``original_height``, ``original_width`` (of the
    decoded image) and ``input_size``: boxes predicted in input pixels map back to the original image
    by ``x * original_width / input_size`` and ``y * original_height / input_size`` (official, no clipping).
    """

    def __init__(self, dataset: Any, size: int = 608, transform: ValTransform | None = None) -> None:
        self.dataset = dataset
        self.size = int(size)
        self.transform = transform if transform is not None else ValTransform()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, _, info = self.dataset.load_item(index)
        return self.transform(image, self.size), {**info, "input_size": self.size}


class MultiScaleBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, input_size)`` pairs; the size changes every ``change_every`` batches.

    The official code draws a new size 32 * randint(10, 19) every 10 iterations on rank 0 and broadcasts
    it; here the size of batch b in epoch e is a pure function of (seed, e, b // change_every), so every
    rank computes the same sequence without communication. Call ``set_epoch`` every epoch (it also
    reaches the wrapped sampler, e.g. a DistributedSampler). Set ``fixed_size`` to use one size for
    every batch (official: 608 for the last 10 epochs), None to go back to random sizes.

    Args:
        sampler: yields dataset indices (RandomSampler, DistributedSampler, ...).
        batch_size, drop_last: as for ``torch.utils.data.BatchSampler``.
        sizes: the input sizes to draw from, uniformly (official: 320, 352, ..., 608).
        change_every: batches between size changes (official: 10).
        seed: same on every rank.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        batch_size: int,
        drop_last: bool,
        sizes: Iterable[int] = range(320, 609, 32),
        change_every: int = 10,
        seed: int = 0,
    ) -> None:
        self.sampler = sampler
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        self.sizes = tuple(int(size) for size in sizes)
        if not self.sizes or min(self.sizes) <= 0:
            raise ValueError(f"sizes must be a non-empty list of positive input sizes, got {self.sizes}")
        if change_every < 1:
            raise ValueError(f"change_every must be >= 1, got {change_every}")
        self.change_every = change_every
        self.seed = seed
        self.epoch = 0
        self.fixed_size: int | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def size_for_batch(self, batch_index: int) -> int:
        """Input size of batch ``batch_index`` of the current epoch."""
        if self.fixed_size is not None:
            return int(self.fixed_size)
        block = batch_index // self.change_every
        rng = np.random.default_rng([self.seed, self.epoch, block])
        return self.sizes[int(rng.integers(len(self.sizes)))]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch_index, batch in enumerate(self.batch_sampler):
            size = self.size_for_batch(batch_index)
            yield [(int(index), size) for index in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)


def collate(batch: Sequence[tuple]) -> tuple:
    """Stack tensors (and arrays) field by field; anything else (info dicts) becomes a list.

    For ``TrainDataset`` items: (images (B, 3, S, S), labels (B, max_labels, 6), infos list);
    for ``ValDataset`` items: (images (B, 3, S, S), infos list).
    """
    fields = []
    for column in zip(*batch, strict=True):
        first = column[0]
        if isinstance(first, torch.Tensor):
            fields.append(torch.stack(column))
        elif isinstance(first, np.ndarray):
            fields.append(torch.from_numpy(np.stack(column)))
        else:
            fields.append(list(column))
    return tuple(fields)
