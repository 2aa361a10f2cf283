"""Train YOLOv3-ASFF with the official recipe (guided-anchor loss, warm-up + cosine SGD, mixup, multi-scale).

Single process::

    python -m asff_viz.train --synthetic data/synthetic --out runs/asff --epochs 30 --batch-size 8

Several processes (CPU: gloo, GPU: NCCL; the batch size is per process)::

    torchrun --nproc_per_node=2 -m asff_viz.train --synthetic data/synthetic --out runs/asff ...

Data: COCO-format annotation JSON + image folder (--train-annotations/--train-images, optionally
--val-annotations/--val-images), or --synthetic DIR for a folder written by `python -m asff_viz.data.synthetic`.
The class list comes from the training annotations.

Outputs in --out: last.pt (every --checkpoint-interval epochs and at the end; loadable by
`asff_viz.load_model` and by --resume), best.pt (best validation AP), scalars.csv + tensorboard/ (losses,
learning rate, input size, throughput, validation metrics), fusion_weights.csv (per epoch: mean ASFF weight of
each source level per target level inside small/medium/large boxes), gradient_norms.csv (per epoch and layer),
metrics.csv (per evaluation).

Exact resume: each epoch's shuffling, multi-scale sizes, mixup partners and augmentation are seeded from
(seed, epoch), and checkpoints hold the optimizer, EMA, scaler and RNG states, so on CPU a run interrupted at an
epoch boundary and resumed reaches the same weights as an uninterrupted run.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Sequence

import torch.distributed as dist

from .training.config import TrainingError, build_parser, parse_args
from .training.distributed import init_distributed
from .training.run import train
from .utils.allocator import keep_freed_memory

__all__ = ["build_parser", "main", "parse_args"]


def main(argv: Sequence[str] | None = None) -> dict:
    """Train; returns a summary (last epoch's losses, best and last metrics, checkpoint path)."""
    config = parse_args(argv)
    keep_freed_memory()
    context = init_distributed(config.run.device)
    logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    finished = False
    try:
        summary = train(config, context)
        finished = True
        return summary
    except TrainingError as error:
        sys.exit(f"error: {error}")
    finally:
        if context.distributed and dist.is_initialized():
            if finished:
                # DDP's reducer goes while its process group lives (freed after it, at exit, it can abort the
                # process in gloo), and every rank is done before any tears its connections down.
                gc.collect()
                dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(1 if "error" in main() else 0)
