"""The model side of a dataset analysis, in batches: what makes it cost about what plain inference costs.

Images are read and resized by `DataLoader` workers while the model runs (`ImageReader`); the model runs whole
batches through its float32 fast path (`AnalysedModel.fast`: BatchNorm folded into the convolutions,
channels-last memory, and for no-grad passes oneDNN's fused conv + activation), so one forward (and, for the
gradient flow, one set of backward passes) serves B images. Nothing here runs in bfloat16: the statistics
threshold the fusion weights (50 bins of 0.02), the detections (score >= 0.01, NMS) and the signs of gradient
cosines, and bfloat16's 8-bit mantissa (a relative step of 0.4 %) moves values across those thresholds, where
float32 and the fast path differ from the model as built by round-off only (tests check both).

Results come out one per image, in the order given; `AnalysisCache` decides which images need the model at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..inference.postprocess import postprocess, row_location
from ..inference.transforms import ImageError, preprocess, read_image
from ..introspection.capture import Counterfactual
from ..introspection.decomposition import GradientFlow, gradient_flows
from ..introspection.objectives import TrainingLoss, ground_truth_labels
from ..introspection.trace import Trace, trace_batch
from .sources import AnalysedModel, AnalysisError

DEFAULT_BATCH_SIZE = 8


class ImageReader(Dataset):
    """Reads and preprocesses images by path: (index, tensor, transform, shape, error); error is the message of
    an image that cannot be read (the tensor is then None), raised in the main process in the images' order."""

    def __init__(self, paths: Sequence[str | os.PathLike], size: int) -> None:
        self.paths, self.size = list(paths), int(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.paths[index])
        except ImageError as error:
            return index, None, None, None, str(error)
        tensor, transform = preprocess(image, self.size)
        return index, tensor, transform, image.shape, None


def read_batches(paths: Sequence, size: int, batch_size: int, workers: int) -> Iterator[tuple]:
    """(tensor (B, 3, S, S), transforms, shapes, paths) per batch, in order; AnalysisError for an unreadable
    image (its message names the file)."""
    if not paths:
        return
    # (DataLoader workers run torch on one thread; OpenCV's thread pool is left alone: reconfiguring it in a
    # forked worker waits forever on the parent's pool threads, which the fork did not copy.)
    loader = DataLoader(ImageReader(paths, size), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=list)
    for items in loader:
        for _, _, _, _, error in items:
            if error is not None:
                raise AnalysisError(error)
        yield (torch.stack([item[1] for item in items]), [item[2] for item in items], [item[3] for item in items],
               [paths[item[0]] for item in items])


def light_traces(model: AnalysedModel, paths: Sequence, *, size: int, counterfactual: Counterfactual,
                 conf_threshold: float, nms_threshold: float, batch_size: int = DEFAULT_BATCH_SIZE,
                 workers: int = 0) -> Iterator[Trace]:
    """The light trace (weights and detections, no pixels, no decoded rows) of each image, in order."""
    network = model.fast(grad=False)
    for batch, transforms, shapes, batch_paths in read_batches(paths, size, batch_size, workers):
        yield from trace_batch(network, batch, transforms, image_shapes=shapes,
                               image_names=[os.path.basename(p) for p in batch_paths], conf_threshold=conf_threshold,
                               nms_threshold=nms_threshold, counterfactual=counterfactual, light=True)


def detections(model: AnalysedModel, paths: Sequence, *, size: int, conf_threshold: float, nms_threshold: float,
               batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 0) -> Iterator[dict]:
    """Detections of a model of any fusion mode (no weights), per image in order, as the arrays an
    `ImageResult` holds: boxes (K, 4) in original pixels, scores, labels, levels, transform, strides."""
    network = model.fast(grad=False)
    device = next(network.parameters()).device
    strides = tuple(int(s) for s in network.strides)
    for batch, transforms, _, _ in read_batches(paths, size, batch_size, workers):
        with torch.no_grad():
            outputs = network(batch.to(device))
            found = postprocess(network.decode(outputs).float(), conf_threshold, nms_threshold)
        grid_sizes = [tuple(int(v) for v in output.prediction.shape[-2:]) for output in outputs]
        for kept, transform in zip(found, transforms, strict=True):
            kept = kept.to("cpu")
            levels = np.asarray([row_location(int(i), grid_sizes).level for i in kept.indices], dtype=np.int64)
            boxes = transform.boxes_to_original(kept.boxes.detach().double().numpy())
            yield {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                   "scores": kept.scores.double().numpy(), "labels": kept.labels.numpy().astype(np.int64),
                   "levels": levels, "transform": transform, "strides": strides}


def flows(model: AnalysedModel, paths: Sequence, truths: Sequence[tuple], *, size: int,
          counterfactual: Counterfactual, significance: float, active_fraction: float, cosine_threshold: float,
          controls: bool, control_seeds: Sequence | None, sweep: tuple, batch_size: int = DEFAULT_BATCH_SIZE,
          workers: int = 0) -> Iterator[GradientFlow]:
    """The gradient flow of the training loss of each image against its ground truth, in order.

    truths[i]: (boxes (M, 4) xyxy in original pixels, labels (M,)) of paths[i]; control_seeds[i]: its control
    seed (with `controls`).
    """
    network = model.fast(grad=True)
    start = 0
    for batch, transforms, _, _ in read_batches(paths, size, batch_size, workers):
        objectives = [TrainingLoss(ground_truth_labels(*truths[start + i], transform))
                      for i, transform in enumerate(transforms)]
        seeds = list(control_seeds[start:start + len(transforms)]) if controls else None
        start += len(transforms)
        yield from gradient_flows(network, batch, objectives, None if counterfactual.is_learned else counterfactual,
                                  significance=significance, active_fraction=active_fraction,
                                  cosine_threshold=cosine_threshold, controls=controls, control_seeds=seeds,
                                  sweep=tuple(sweep) if controls else (), sign_agreement=False)


__all__ = ["DEFAULT_BATCH_SIZE", "ImageReader", "detections", "flows", "light_traces",
           "read_batches"]
