"""COCO evaluation from the command line.

    python -m asff_viz.evaluate [--weights W] --annotations VAL.json --images DIR --out OUT \
        [--size 608] [--conf 0.001] [--nms 0.65] [--device cpu] [--batch-size 8] [--workers N] [--eager]

The model runs through its float32 fast path (`optimize_for_inference`: BatchNorm folded, channels-last, fused
conv + activation on CPU), which gives the model's outputs to float round-off; --eager runs the model as built.
Writes OUT/metrics.json ({AP, AP50, AP75, APs, APm, APl} as fractions, plus the settings used) and
OUT/detections.json (COCO results format, original-image pixels). Without --weights the embedded default
model is evaluated. --size defaults to the checkpoint's input size.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from .checkpoint import CheckpointError, load_model
from .data.class_names import ClassMismatchError, match_classes
from .data.coco import COCODetection
from .data.errors import DatasetError
from .data.loading import default_workers
from .inference.coco_eval import evaluate_coco, write_evaluation
from .inference.fast import optimize_for_inference
from .inference.postprocess import EVAL_CONF_THRESHOLD, NMS_THRESHOLD
from .utils.allocator import keep_freed_memory
from .utils.argtypes import (
    default_device,
    describe_os_error,
    device,
    input_size,
    non_negative_int,
    output_folder,
    positive_int,
    unit_interval,
)

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="checkpoint (asff_viz or official); default: embedded model")
    parser.add_argument("--annotations", required=True, help="COCO-format annotation JSON")
    parser.add_argument("--images", required=True, help="folder with the annotation file's images")
    parser.add_argument("--out", required=True, type=output_folder,
                        help="output folder for metrics.json and detections.json")
    parser.add_argument("--size", type=input_size, default=None, help="square input size (multiple of 32); "
                        "default: the checkpoint's input size")
    parser.add_argument("--conf", type=unit_interval, default=EVAL_CONF_THRESHOLD,
                        help="score threshold (obj x class), 0..1")
    parser.add_argument("--nms", type=unit_interval, default=NMS_THRESHOLD, help="per-class NMS IoU threshold, 0..1")
    parser.add_argument("--device", type=device, default=default_device())
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--workers", type=non_negative_int, default=None,
                        help="processes that read images while the model runs (default: 1 on 2 to 7 cores, 2 from "
                             "8, 0 on one core)")
    parser.add_argument("--eager", action="store_true",
                        help="run the model as built, not its float32 fast path (same metrics to round-off)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the evaluation; returns the metrics dict (also written to OUT/metrics.json)."""
    args = parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        model = load_model(args.weights, device=args.device)
        dataset = COCODetection(args.annotations, args.images)
        mapping, note = match_classes(model.metadata["class_names"], dataset.class_names,
                                      model.metadata.get("checkpoint", "the model"), str(args.annotations))
    except (CheckpointError, DatasetError, ClassMismatchError) as error:
        sys.exit(f"error: {error}")
    if note:
        logger.warning("warning: %s", note)
    size = args.size or int(model.metadata.get("input_size", 608))
    if size % 32 or size < 32:
        sys.exit(f"error: {model.metadata.get('checkpoint')}: stored input size {size} is not a positive multiple "
                 "of 32; pass --size")
    network = model if args.eager else optimize_for_inference(model)
    workers = default_workers() if args.workers is None else args.workers
    start = time.perf_counter()
    skipped: list = []
    try:
        metrics, results = evaluate_coco(network, dataset, size, conf_threshold=args.conf, nms_threshold=args.nms,
                                         batch_size=args.batch_size, num_workers=workers, device=args.device,
                                         progress=True, skipped=skipped,
                                         category_ids=[dataset.category_ids[i] for i in mapping])
    except DatasetError as error:
        sys.exit(f"error: {error}")
    elapsed = time.perf_counter() - start
    extra = {"settings": {"weights": model.metadata.get("checkpoint"), "sha256": model.metadata.get("sha256"),
                          "annotations": str(args.annotations), "images": len(dataset) - len(skipped),
                          "unreadable_images": [image_id for image_id, _ in skipped], "size": size,
                          "conf_threshold": args.conf, "nms_threshold": args.nms, "detections": len(results),
                          "class_matching": note or "same names, same order", "seconds": round(elapsed, 2),
                          "model_path": "as built" if args.eager else network.inference_settings}}
    try:
        metrics_path, _ = write_evaluation(args.out, metrics, results, extra)
    except OSError as error:
        sys.exit(f"error: {describe_os_error(error)}")
    summary = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in metrics.items())
    logger.info("%s (%d images, %d detections, %.1f s) -> %s", summary, len(dataset) - len(skipped), len(results),
                elapsed, metrics_path)
    return metrics


if __name__ == "__main__":
    main()
