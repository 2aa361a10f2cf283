"""Performance benchmark of YOLOv3-ASFF on this machine: latency, throughput, efficiency, analysis and training.

    python -m asff_viz.bench [--sizes 320 416 608] [--batches 1 8] [--repeats 5] [--quick] [--device cpu|cuda]
                             [--out bench.json] [--table bench.md] [--threads N] [--compile]
                             [--weights W] [--synthetic DIR]

Everything is measured in one run, so the ratios hold across machines:

* forward latency and throughput of the full-size model (random weights, BatchNorm statistics calibrated on
  noise so activations have realistic magnitudes, objectness prior 0.01) for every size and batch, model only
  and end to end (decode + score threshold + NMS on the CPU, as `Detector` does), for the model as built
  (`eager_fp32`) and for the fast paths of `asff_viz.inference.fast` (`fast_fp32`, `fast_bf16`, optionally compiled);
* achieved GFLOP/s (FLOPs counted analytically: conv and matmul MACs x 2, plus the deformable conv's bilinear
  sampling) against the GFLOP/s of a single large convolution timed in the same run with the same threads, the
  practical ceiling of the machine: efficiency = model GFLOP/s / ceiling GFLOP/s;
* where the fast fp32 (and bf16) forward's time goes at 416, batch 1: per part of the model (backbone stages, SPP, neck,
  fusion, deformable convs, head) with each part's GFLOP/s against the ceiling, and per kind of operator
  (`bench.profile`);
* the deformable convolution: its share of a forward, and the whole model against the same network with the
  deformable conv replaced by a plain 3x3 conv of the same weights;
* fusion capture on vs off, gradient-flow analysis vs a forward, and one attribution (time);
* training steps (SGD, random labels, `asff_viz.training.loss`) of a full-size and a width-0.25 model, and the data
  loader's throughput when a synthetic dataset is given;
* dataset-scale analyses (`analyze scale-stats`, `gradflow`, `compare`, `evolution`, `evaluate`, each its real
  command) against plain batched inference over the same synthetic validation images, on the checkpoint and on
  the full-size model, when a synthetic dataset is given (`bench.dataset`);
* bf16 accuracy against float32: AP on a synthetic validation split when a checkpoint is given (`--weights`),
  else agreement of the decoded outputs of the calibrated random model;
* peak memory (max RSS on CPU, `torch.cuda.max_memory_allocated` on GPU).

Timings are medians of interleaved repeats (every configuration runs once per round, in a rotating order), so
load from other processes hits all configurations alike. `--quick` runs a reduced set (416 px, batch 1, few
repeats) in about two minutes on a 2-core CPU, for development; the full run is what docs/performance.md
reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.config import ModelConfig
from ..utils.allocator import keep_freed_memory
from ..utils.argtypes import input_size, non_negative_int, output_file, positive_int
from ..utils.fileio import atomic_write_text
from ..utils.timing import CLOCKS
from .environment import environment, peak_rss_mb
from .models import calibrated_model, inference_variants, model_flops
from .report import format_table, json_default, targets
from .sections import (
    analysis_cost,
    bf16_accuracy,
    capture_cost,
    conv_ceiling,
    deform_cost,
    forward_grid,
    loader_throughput,
    training_throughput,
)

DEFORM_SIZE = 416  # the input size of the single-size measurements (capture, deformable conv, analysis)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=input_size, nargs="+", default=None,
                        help="input sizes, multiples of 32 (default 320 416 608)")
    parser.add_argument("--batches", type=positive_int, nargs="+", default=None,
                        help="batch sizes (default 1 8 on CPU, 1 8 64 on GPU)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed rounds per measurement (default 5)")
    parser.add_argument("--quick", action="store_true", help="reduced set for development (~2 minutes on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's own choice; 1 with --quick on CPU)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default=None,
                        help="wall time, or the thread's CPU time (one thread on CPU only: steadier on a shared "
                        "machine); default wall, cpu with --quick on CPU")
    parser.add_argument("--compile", nargs="?", const="auto", default=None,
                        help="also time torch.compile'd fast paths; optional mode (default: reduce-overhead, i.e. "
                        "CUDA graphs, on a GPU, the default mode on CPU); compiling takes minutes on a CPU")
    parser.add_argument("--weights", default=None, help="checkpoint for the bf16 AP check")
    parser.add_argument("--synthetic", default=None, help="synthetic dataset folder (val split for the AP check, "
                        "train split for the data-loader measurement)")
    parser.add_argument("--integrated-steps", type=non_negative_int, default=None,
                        help="integrated-gradients steps to time (default 16; 0 in --quick)")
    parser.add_argument("--dataset-images", type=non_negative_int, default=None,
                        help="validation images of the checkpoint's dataset analyses with --synthetic (default 500; "
                        "32 in --quick; 0: only the full-size model's)")
    parser.add_argument("--full-size-images", type=non_negative_int, default=None,
                        help="validation images of the full-size model's dataset analyses (default 48; 0 in --quick: "
                        "left out)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=("forward", "profile", "mobilenet", "deform", "capture", "analysis", "dataset",
                                 "training", "accuracy"),
                        help="sections to leave out")
    parser.add_argument("--out", type=output_file, default="bench.json",
                        help="JSON results (the table goes next to it as .md)")
    parser.add_argument("--table", type=output_file, default=None, help="Markdown table path (default: --out with .md)")
    args = parser.parse_args(argv)
    # What can be checked is checked now, not after minutes of timing.
    if args.weights is not None:
        from ..checkpoint import CheckpointError, load_model

        try:
            load_model(args.weights)
        except CheckpointError as error:
            parser.error(f"argument --weights: {error}")
    if args.synthetic is not None and not (Path(args.synthetic) / "annotations" / "val.json").is_file():
        parser.error(f"argument --synthetic: {args.synthetic} has no annotations/val.json; pass a folder written by "
                     "`python -m asff_viz.data.synthetic` with a validation split")
    return args


@dataclass
class Settings:
    """What a run measures, and how: resolved from the flags and the machine."""

    device: torch.device
    quick: bool
    sizes: list[int]
    batches: list[int]
    repeats: int
    warmup: int
    integrated_steps: int
    compile_mode: bool | str
    clock_kind: str

    @property
    def clock(self):
        return CLOCKS[self.clock_kind]


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Threads, device, clock and sizes of the run; exits with one line when the flags cannot work here."""
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick and args.device == "cpu":
        # Development runs share the CPU with other jobs: one thread is not stalled by a preempted partner
        # thread at every parallel region, so its numbers are far steadier (the full run keeps torch's default).
        torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but CUDA is not available here; use --device cpu.")
    clock_kind = args.clock or ("cpu" if args.quick and device.type == "cpu" and torch.get_num_threads() == 1
                                else "wall")
    if clock_kind == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        sys.exit("error: --clock cpu measures one thread's CPU time: use it with --device cpu --threads 1.")
    if device.type == "cuda":
        # What a GPU deployment would set: autotuned conv algorithms, and TF32 for float32 convs and matmuls.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_mode: bool | str = False
    if args.compile:
        compile_mode = args.compile if args.compile != "auto" else ("reduce-overhead" if device.type == "cuda"
                                                                    else True)
    quick = args.quick
    sizes = args.sizes or ([DEFORM_SIZE] if quick else [320, 416, 608])
    batches = args.batches or ([1] if quick else ([1, 8, 64] if device.type == "cuda" else [1, 8]))
    repeats = args.repeats or (3 if quick else 5)
    warmup = 1 if device.type == "cpu" else 3
    integrated_steps = args.integrated_steps if args.integrated_steps is not None else (0 if quick else 16)
    return Settings(device=device, quick=quick, sizes=sizes, batches=batches, repeats=repeats, warmup=warmup,
                    integrated_steps=integrated_steps, compile_mode=compile_mode, clock_kind=clock_kind)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # as the commands do: what users get
    settings = resolve_settings(args)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    results = measure(args, settings, log)
    results["targets"] = targets(results)
    results["seconds"] = time.perf_counter() - started

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2, default=json_default) + "\n")
    table = format_table(results)
    table_path = Path(args.table) if args.table else out.with_suffix(".md")
    atomic_write_text(table_path, table)
    print()
    print(table)
    log(f"wrote {out} and {table_path}")
    return results


def mobilenet_forward(settings: Settings, ceilings: dict, with_bf16: bool, log, *, profile: bool = False) -> dict:
    """The official light model (MobileNetV2 + ASFF) timed like the Darknet one, at the same sizes and batches;
    profile: also where its fast fp32 forward's time goes (the `profile` section's table)."""
    log("MobileNetV2 ASFF forward latency and throughput (BatchNorm calibrated on noise)")
    model = calibrated_model(ModelConfig(backbone="mobilenet_v2"))
    flops = {size: model_flops(model, size) for size in sorted(set(settings.sizes) | {DEFORM_SIZE})}
    variants = inference_variants(model, settings.device, with_bf16=with_bf16, compile=settings.compile_mode)
    rows = forward_grid(variants, flops, ceilings, settings.sizes, settings.batches, settings.repeats,
                        settings.warmup, settings.device, log, clock=settings.clock)
    result = {"variant": model.config.variant, "parameters": sum(p.numel() for p in model.parameters()),
              "flops": flops, "forward": rows}
    if profile:
        from .profile import profile_forward

        log(f"where the MobileNetV2 model's fast fp32 forward's time goes at {DEFORM_SIZE}, batch 1")
        result["profile"] = profile_forward(model, variants["fast_fp32"], DEFORM_SIZE, settings.repeats,
                                            ceilings["float32"]["gflops_per_s"], log)
    return result


def measure(args: argparse.Namespace, settings: Settings, log) -> dict:
    """Every section the flags ask for, in one run (so the ratios between them hold)."""
    device, quick, sizes, batches = settings.device, settings.quick, settings.sizes, settings.batches
    repeats, warmup, clock = settings.repeats, settings.warmup, settings.clock
    results: dict = {"environment": environment(device),
                     "settings": {"mode": "quick" if quick else "full", "sizes": sizes, "batches": batches,
                                  "repeats": repeats, "warmup": warmup, "compile": settings.compile_mode,
                                  "clock": settings.clock_kind, "tf32": device.type == "cuda"}}
    log(f"{results['environment']['cpu']} / {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with_bf16 = results["environment"]["bf16_supported"]

    log("ceiling: the fastest of four large 3x3 convs")
    ceiling_batch = 1 if device.type == "cpu" else 16
    results["ceilings"] = {"float32": conv_ceiling(device, torch.float32, repeats, ceiling_batch, clock=clock)}
    if with_bf16:
        results["ceilings"]["bfloat16"] = conv_ceiling(device, torch.bfloat16, repeats, ceiling_batch, clock=clock)
    for ceiling in results["ceilings"].values():
        log(f"  {ceiling['dtype']}: {ceiling['gflops_per_s']:.1f} GFLOP/s")

    log("building the full-size model (BatchNorm calibrated on noise)")
    model = calibrated_model()
    deform_size = DEFORM_SIZE
    results["flops"] = {size: model_flops(model, size) for size in sorted(set(sizes) | {deform_size})}
    variants = inference_variants(model, device, with_bf16=with_bf16, compile=settings.compile_mode)
    results["memory"] = {"after_build_rss": peak_rss_mb()}

    if "forward" not in args.skip:
        log("forward latency and throughput")
        results["forward"] = forward_grid(variants, results["flops"], results["ceilings"], sizes, batches, repeats,
                                          warmup, device, log, clock=clock)
        results["memory"]["after_forward_rss"] = peak_rss_mb()
    if "profile" not in args.skip:
        from .profile import profile_forward

        log(f"where the fast forward's time goes at {deform_size}, batch 1")
        results["profile"] = profile_forward(model, variants["fast_fp32"], deform_size, repeats,
                                             results["ceilings"]["float32"]["gflops_per_s"], log)
        if "fast_bf16" in variants:
            results["profile_bf16"] = profile_forward(model, variants["fast_bf16"], deform_size, repeats,
                                                      results["ceilings"]["bfloat16"]["gflops_per_s"], log,
                                                      variant="fast_bf16")
    if "mobilenet" not in args.skip:
        results["mobilenet"] = mobilenet_forward(settings, results["ceilings"], with_bf16, log,
                                                 profile="profile" not in args.skip)
    if "deform" not in args.skip:
        log(f"deformable conv cost at {deform_size}")
        compared = ("eager_fp32", "fast_bf16") if quick else None
        results["deform"] = deform_cost(variants, results["flops"], deform_size, repeats, warmup, device, log,
                                        compared, clock=clock)
    if "capture" not in args.skip:
        log(f"fusion capture cost at {deform_size}")
        captured = ("eager_fp32",) if quick else ("eager_fp32", "fast_fp32", "fast_bf16")
        results["capture"] = capture_cost(variants, deform_size, repeats if quick else max(repeats, 7), log, captured)
    if "analysis" not in args.skip:
        log(f"gradient flow and attribution at {deform_size} (model as built)")
        results["analysis"] = analysis_cost(variants["eager_fp32"], deform_size, repeats, device,
                                            integrated_steps=settings.integrated_steps, log=log, clock=clock)
        results["memory"]["after_analysis_rss"] = peak_rss_mb()
    if "accuracy" not in args.skip:
        log("bf16 against float32")
        results["bf16_accuracy"] = bf16_accuracy(variants, deform_size, device, weights=args.weights,
                                                 synthetic=args.synthetic, log=log)
    del variants, model
    if "dataset" not in args.skip and args.synthetic and device.type == "cpu":
        from .dataset import dataset_cost

        log("dataset analyses against plain inference over the same images")
        results["dataset"] = dataset_cost(
            args.synthetic, args.weights, size=deform_size,
            images=args.dataset_images if args.dataset_images is not None else (32 if quick else 500),
            full_size_images=args.full_size_images if args.full_size_images is not None else (0 if quick else 48),
            log=log)
        results["memory"]["after_dataset_rss"] = peak_rss_mb()
    if "training" not in args.skip:
        log("training steps")
        train_size = 320
        full_batch, small_batch = (2, 4) if device.type == "cpu" else (16, 32)
        results["training"] = (training_throughput(1.0, train_size, full_batch, 1 if quick else 5, device, log,
                                                   channels_first=not quick, clock=clock)
                               + training_throughput(0.25, train_size, small_batch, 2 if quick else 6, device, log,
                                                     clock=clock))
        if args.synthetic:
            workers = min(4, max(1, (os.cpu_count() or 2) - 1))
            results["loader"] = loader_throughput(args.synthetic, train_size, full_batch, 4 if quick else 20,
                                                  workers, device, log)
        results["memory"]["after_training_rss"] = peak_rss_mb()
    if device.type == "cuda":
        results["memory"]["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device) / 1024 ** 2
    return results
