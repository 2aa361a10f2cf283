"""COCO-style evaluation: run a model over a `COCODetection` and score it with pycocotools.

The protocol is the official evaluator's: plain square resize to `size`, no test-time augmentation,
score = objectness x best class probability, conf threshold 0.001, per-class NMS 0.65, no top-k cap
(COCOeval keeps the best 100 per image), boxes mapped back to original pixels with no clipping, category id
= sorted(category ids)[class index]. Boxes are written with `asff_viz.data.coco.xyxy_to_coco_bbox`, the
inverse of the dataset's box conversion (which makes training targets 1 px narrower than the annotations).

In distributed runs every rank scores a strided shard of the images and rank 0 scores the union against
*all* image ids (the official evaluator once scored only rank 0's).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.coco import COCODetection, xyxy_to_coco_bbox
from ..data.errors import DatasetError
from ..models import unwrap_model
from ..utils.fileio import atomic_write_text
from .postprocess import EVAL_CONF_THRESHOLD, NMS_THRESHOLD, Detections, postprocess
from .transforms import preprocess

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""Keys of the metrics dict: COCOeval stats[0:6] as fractions in 0..1.

AP, AP50 and AP75 are 0.0 when nothing is detected; a size metric (APs/APm/APl) is None when the
evaluated images hold no GT box of that size (COCOeval's -1).
"""


class EvaluationImages(Dataset):
    """The images of a `COCODetection`, pre-processed for evaluation (official `ValTransform`).

    Item: (image (3, size, size) float32 normalized, image_id, (original_height, original_width)); an image that
    cannot be read gives (None, image_id, the reason), which `predict_coco_results` counts as skipped.
    """

    def __init__(self, dataset: COCODetection, size: int) -> None:
        if size % 32:
            raise ValueError(f"evaluation size must be a multiple of 32, got {size}")
        self.dataset = dataset
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            image, _, info = self.dataset.load_item(index)
        except DatasetError as error:
            return None, self.dataset.image_ids[index], str(error)
        tensor, transform = preprocess(image, self.size)
        return tensor, info["image_id"], (transform.original_height, transform.original_width)


def _collate(batch):
    """(images or None, image ids, sizes, [(image_id, reason) of the unreadable ones])."""
    readable = [item for item in batch if item[0] is not None]
    unreadable = [(item[1], item[2]) for item in batch if item[0] is None]
    if not readable:
        return None, [], [], unreadable
    images, image_ids, sizes = zip(*readable, strict=True)
    return torch.stack(images), list(image_ids), list(sizes), unreadable


def coco_metrics(coco, results: Sequence[dict], image_ids: Sequence[int] | None = None) -> dict:
    """Score COCO-format `results` (dicts with image_id, category_id, bbox xywh, score) against `coco`.

    Args:
        coco: pycocotools COCO index of the ground truth.
        results: detections in original-image pixels.
        image_ids: the images to score (default: all of `coco`); images without detections count as misses.
    Returns:
        {AP, AP50, AP75, APs, APm, APl}, see METRIC_NAMES. Empty `results` give 0.0 (pycocotools cannot
        load an empty list).
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(coco.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    if len(results) == 0:
        return {name: 0.0 for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = coco.loadRes(copy.deepcopy(list(results)))  # loadRes adds keys to the dicts it gets
        evaluator = COCOeval(coco, detections, "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats[: len(METRIC_NAMES)]  # the first 6 of COCOeval's 12 summary numbers
    metrics = {name: (None if value < 0 else float(value)) for name, value in zip(METRIC_NAMES, stats, strict=True)}
    for name in ("AP", "AP50", "AP75"):  # -1 here means no GT box at all: nothing can be found, so 0
        metrics[name] = metrics[name] or 0.0
    return metrics


def detections_to_results(detections: Sequence[Detections], image_ids: Sequence[int],
                          original_sizes: Sequence[tuple[int, int]], input_size: int,
                          category_ids: Sequence[int]) -> list[dict]:
    """`postprocess` output (boxes xyxy in input pixels) -> COCO results (bbox xywh in original pixels).

    Args:
        detections: one `Detections` per image.
        image_ids: COCO image id per image.
        original_sizes: (height, width) per image.
        input_size: the square side the images were resized to.
        category_ids: sorted COCO category ids; class index k is `category_ids[k]`.
    """
    results = []
    for found, image_id, (height, width) in zip(detections, image_ids, original_sizes, strict=True):
        if len(found) == 0:
            continue
        boxes = found.scaled(width / input_size, height / input_size).boxes.detach().cpu().double().numpy()
        xywh = xyxy_to_coco_bbox(boxes)
        rows = zip(xywh.tolist(), found.scores.tolist(), found.labels.tolist(), strict=True)
        for box, score, label in rows:
            results.append({
                "image_id": int(image_id),
                "category_id": int(category_ids[int(label)]),
                "bbox": [round(float(v), 3) for v in box],
                "score": round(float(score), 6),
            })
    return results


@torch.no_grad()
def predict_coco_results(model: nn.Module, dataset: COCODetection, size: int, *,
                         conf_threshold: float = EVAL_CONF_THRESHOLD, nms_threshold: float = NMS_THRESHOLD,
                         batch_size: int = 8, num_workers: int = 0, device: str | torch.device = "cpu",
                         rank: int = 0, world_size: int = 1, amp_dtype: torch.dtype | None = None,
                         progress: bool = False, skipped: list | None = None,
                         category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO results of `model` on this rank's shard of `dataset` (every world_size-th image from `rank`).

    Images that cannot be read are left out; `(image_id, reason)` of each is appended to `skipped` when given.
    `category_ids[label]` is the COCO id of model class `label` (default: the dataset's sorted ids, for a model
    trained on this dataset's categories in their order).
    """
    category_ids = list(dataset.category_ids if category_ids is None else category_ids)
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    images = EvaluationImages(dataset, size)
    shard = Subset(images, list(range(rank, len(images), world_size)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    device = torch.device(device)
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True)
    results: list[dict] = []
    try:
        for batch, image_ids, sizes, unreadable in iterator:
            if skipped is not None:
                skipped.extend(unreadable)
            if batch is None:
                continue
            batch = batch.to(device, non_blocking=True)
            autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                outputs = model(batch)
            detections = postprocess(model.decode(outputs).float(), conf_threshold, nms_threshold)
            results.extend(detections_to_results(detections, image_ids, sizes, size, category_ids))
    finally:
        model.train(was_training)
    return results


def evaluate_coco(model: nn.Module, dataset: COCODetection, size: int, *,
                  conf_threshold: float = EVAL_CONF_THRESHOLD, nms_threshold: float = NMS_THRESHOLD,
                  batch_size: int = 8, num_workers: int = 0, device: str | torch.device = "cpu",
                  amp_dtype: torch.dtype | None = None, progress: bool = False,
                  skipped: list | None = None, category_ids: Sequence[int] | None = None
                  ) -> tuple[dict, list[dict]]:
    """Evaluate `model` on `dataset` at input `size`; returns (metrics, COCO results).

    Images that cannot be read are skipped and left out of the scoring (`(image_id, reason)` of each is appended
    to `skipped` when given; a warning counts them); DatasetError when none can be read.
    Under torch.distributed every rank must call this; each predicts its shard, rank 0 scores all images, and
    every rank gets the metrics (rank 0 also gets all results, other ranks an empty list).
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    unreadable: list = []
    results = predict_coco_results(model, dataset, size, conf_threshold=conf_threshold, nms_threshold=nms_threshold,
                                   batch_size=batch_size, num_workers=num_workers, device=device, rank=rank,
                                   world_size=world_size, amp_dtype=amp_dtype, progress=progress and rank == 0,
                                   skipped=unreadable, category_ids=category_ids)
    if distributed:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (results, unreadable))
        results = [r for part, _ in gathered for r in part] if rank == 0 else []
        unreadable = [u for _, part in gathered for u in part]
    if skipped is not None:
        skipped.extend(unreadable)
    left_out = {image_id for image_id, _ in unreadable}
    scored = [image_id for image_id in dataset.image_ids if image_id not in left_out]
    if not scored:
        raise DatasetError(f"none of the {len(dataset.image_ids)} images of {dataset.annotation_file} could be "
                           f"read (e.g. {unreadable[0][1]}); nothing to evaluate")
    if unreadable and rank == 0:
        logger.warning("skipped %d of %d images that could not be read (left out of the metrics), e.g. %s",
                       len(unreadable), len(dataset.image_ids), unreadable[0][1])
    metrics = coco_metrics(dataset.coco, results, scored) if rank == 0 else None
    if distributed:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics, results


def write_evaluation(out_dir: str | os.PathLike, metrics: dict, results: Sequence[dict],
                     extra: dict | None = None) -> tuple[Path, Path]:
    """Write OUT/metrics.json (metrics plus `extra` context) and OUT/detections.json (COCO results)."""
    out_dir = Path(out_dir)
    metrics_path, detections_path = out_dir / "metrics.json", out_dir / "detections.json"
    # Each file is complete or absent (a full disk leaves the previous one): detections first, so a metrics.json
    # never describes detections that were not written.
    atomic_write_text(detections_path, json.dumps(list(results)))
    atomic_write_text(metrics_path, json.dumps({**metrics, **(extra or {})}, indent=2) + "\n")
    return metrics_path, detections_path


__all__ = ["METRIC_NAMES", "EvaluationImages", "coco_metrics", "detections_to_results", "evaluate_coco",
           "predict_coco_results", "write_evaluation"]
