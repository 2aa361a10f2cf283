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
* the deformable convolution: its share of a forward, and the whole model against the same network with the
  deformable conv replaced by a plain 3x3 conv of the same weights;
* fusion capture on vs off, gradient-flow analysis vs a forward, and one attribution (time);
* training steps (SGD, random labels, `asff_viz.training.loss`) of a full-size and a width-0.25 model, and the data
  loader's throughput when a synthetic dataset is given;
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
import copy
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..inference.fast import optimize_for_inference
from ..inference.postprocess import DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD, postprocess
from ..models import build_model
from ..models.config import ModelConfig
from ..models.deform_conv import DeformConv2d
from ..utils.argtypes import input_size, non_negative_int, output_file, positive_int
from ..utils.fileio import atomic_write_text

CEILING_SHAPE = (256, 152, 152)  # channels, height, width of the 256 -> 256 3x3 reference convolution
DEFORM_SIZE = 416  # the input size of the single-size measurements (capture, deformable conv, analysis)


# ----------------------------------------------------------------------------------------------- timing

_CLOCK: Callable[[], float] = time.perf_counter


def clock() -> float:
    """The benchmark's clock: wall time, or with `--clock cpu` the calling thread's CPU time."""
    return _CLOCK()


def use_clock(kind: str) -> None:
    """'wall' (time.perf_counter) or 'cpu' (time.thread_time: the time this thread ran, which leaves out the time
    other processes took the core; meaningful with one torch thread on CPU only)."""
    global _CLOCK
    _CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}[kind]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(cases: dict[str, Callable[[], dict[str, float] | None]], *, repeats: int, warmup: int,
                    device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Run every case `warmup` times, then `repeats` rounds of all cases in a rotating order.

    A case either returns a dict of the durations it timed itself (e.g. {"model": ..., "end_to_end": ...}), or
    anything else, and then its wall time (synchronized) is recorded under "total".
    Returns {case: {name: [seconds]}}.
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    synchronize(device)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = clock()
            parts = cases[name]()
            synchronize(device)
            elapsed = clock() - start
            for key, value in (parts if isinstance(parts, dict) else {"total": elapsed}).items():
                times[name].setdefault(key, []).append(value)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how disturbed a measurement was."""
    if len(values) < 2:
        return 0.0
    return float((max(values) - min(values)) / statistics.median(values))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024


# ------------------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that decide bf16 speed: AVX-512 BF16 and AMX tiles."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(flags & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx2"})
    except OSError:
        pass
    return []


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "torch_threads": torch.get_num_threads(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(), "onednn": torch.backends.mkldnn.is_available(),
        "bf16_supported": bf16_supported(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 1024 ** 3, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


# ------------------------------------------------------------------------------------------------ models


def sample_image(size: int, device: torch.device) -> torch.Tensor:
    """A bundled sample image preprocessed to (3, size, size), or noise if the samples are missing."""
    try:
        from ..inference.transforms import preprocess, read_image
        from ..samples import list_samples, sample_path

        tensor, _ = preprocess(read_image(sample_path(list_samples()[0])), size)
    except Exception:  # the benchmark does not depend on the samples; noise times the same
        tensor = torch.randn(3, size, size, generator=torch.Generator().manual_seed(2))
    return tensor.to(device)


@torch.no_grad()
def calibrated_model(config: ModelConfig | None = None, *, size: int = 256, seed: int = 0) -> nn.Module:
    """The model of `config` (full-size ASFF by default) with random weights, made to behave like a trained one
    where speed is concerned: BatchNorm statistics computed on a sample image and a noise image, so activations
    keep realistic magnitudes for images and noise alike (no decay into denormals, which would slow a CPU down,
    and no overflowing box sizes), and objectness biased to 0.01 (few candidates above the display threshold,
    as for a trained model). Eval mode, on the CPU.
    """
    from ..training.params import set_objectness_prior

    torch.manual_seed(seed)
    model = build_model(config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the statistics
            module.reset_running_stats()
    model.train()
    model(torch.stack([sample_image(size, torch.device("cpu")), torch.randn(3, size, size)]))
    set_objectness_prior(model, 0.01)
    return model.eval()


class PlainConvInsteadOfDeform(nn.Module):
    """A deformable conv's weights used as a plain 3x3 conv (offsets ignored): the issue-2 comparison."""

    def __init__(self, deform: DeformConv2d) -> None:
        super().__init__()
        self.weight, self.bias = deform.weight, deform.bias
        self.stride, self.padding, self.dilation = deform.stride, deform.padding, deform.dilation

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def without_deformation(model: nn.Module) -> nn.Module:
    """A copy of `model` whose head convs ignore their offsets (same FLOPs, no sampling)."""
    copied = copy.deepcopy(model)
    for level in copied.head.levels:
        level.adaption.dconv = PlainConvInsteadOfDeform(level.adaption.dconv)
    return copied


def model_flops(model: nn.Module, size: int) -> dict:
    """FLOPs of one forward at batch 1: conv and matmul (MACs x 2, counted by FlopCounterMode on the model as
    built) plus the deformable convs' bilinear sampling (4 corners x 2 per sampled value)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    counts = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    sampling = 0
    for level, stride in zip(model.head.levels, model.strides, strict=True):
        _, channels, kernel_h, kernel_w = level.adaption.dconv.weight.shape
        sampling += 8 * channels * kernel_h * kernel_w * (size // stride) ** 2
    matmul = sum(n for op, n in counts.items() if "mm" in op)
    deform_matmul = sum(2 * level.adaption.dconv.weight.numel() * (size // stride) ** 2
                        for level, stride in zip(model.head.levels, model.strides, strict=True))
    total = sum(counts.values()) + sampling
    return {"gflop": total / 1e9, "conv_gflop": counts.get("aten.convolution", 0) / 1e9, "matmul_gflop": matmul / 1e9,
            "deform_sampling_gflop": sampling / 1e9, "deform_share_of_flops": (deform_matmul + sampling) / total}


# ---------------------------------------------------------------------------------------------- sections


def ceiling_case(device: torch.device, dtype: torch.dtype, shape: Sequence[int]) -> tuple[Callable[[], object], int]:
    """A C -> C 3x3 conv on a (B, C, H, W) input, channels-last (the layout the fast paths use), and its FLOPs."""
    batch, channels, height, width = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=generator).to(device, dtype)
    weight = (torch.randn(channels, channels, 3, 3, generator=generator) * 0.02).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)

    def case() -> None:
        with torch.inference_mode():
            F.conv2d(x, weight, padding=1)

    return case, 2 * batch * channels * channels * 9 * height * width


def conv_ceiling(device: torch.device, dtype: torch.dtype, repeats: int, batch: int) -> dict:
    """GFLOP/s of the fastest of a few large 3x3 convs: 256 channels at 152 x 152 (the reference shape) and the
    model's own 256/512/1024-channel shapes at 608 px. The fastest shape is then re-timed next to the model in
    every forward measurement, so that efficiency is a ratio of numbers taken under the same load."""
    candidates = [(batch, *CEILING_SHAPE), (batch, 256, 76, 76), (batch, 512, 38, 38), (batch, 1024, 19, 19)]
    cases, flops = {}, {}
    for shape in candidates:
        name = "x".join(map(str, shape))
        cases[name], flops[name] = ceiling_case(device, dtype, shape)
    times = run_interleaved(cases, repeats=repeats, warmup=1, device=device)
    rates = {name: flops[name] / median(times[name]["total"]) / 1e9 for name in cases}
    best = max(rates, key=rates.get)
    seconds = median(times[best]["total"])
    return {"dtype": str(dtype).replace("torch.", ""), "shape": [int(v) for v in best.split("x")],
            "gflop": flops[best] / 1e9, "ms": seconds * 1e3, "gflops_per_s": rates[best],
            "spread": spread(times[best]["total"]), "candidates_gflops_per_s": rates}


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-round ratios: two configurations timed in the same round share that round's load."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


def inference_variants(model: nn.Module, device: torch.device, *, with_bf16: bool,
                       compile: bool | str) -> dict:
    """The model as built and its fast paths (`asff_viz.inference.fast`), on `device`."""
    variants = {"eager_fp32": model.to(device), "fast_fp32": optimize_for_inference(model).to(device)}
    if compile:
        variants["fast_fp32_compiled"] = optimize_for_inference(model, compile=compile).to(device)
    if with_bf16:
        variants["fast_bf16"] = optimize_for_inference(model, dtype=torch.bfloat16).to(device)
        if compile:
            variants["fast_bf16_compiled"] = optimize_for_inference(model, dtype=torch.bfloat16,
                                                                    compile=compile).to(device)
    return variants


def forward_case(model: nn.Module, images: torch.Tensor, device: torch.device) -> Callable[[], dict]:
    """A self-timed forward, then decode + threshold + NMS on the CPU as `Detector` runs them."""

    def case() -> dict:
        with torch.inference_mode():
            start = clock()
            outputs = model(images)
            synchronize(device)
            model_done = clock()
            decoded = model.decode(outputs).float().cpu()
            postprocess(decoded, DISPLAY_CONF_THRESHOLD, NMS_THRESHOLD)
            end = clock()
        return {"model": model_done - start, "end_to_end": end - start}

    return case


def forward_grid(variants: dict, flops: dict, ceilings: dict, sizes: Sequence[int], batches: Sequence[int],
                 repeats: int, warmup: int, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    """Every variant at every size and batch, with the ceiling convs timed in the same rounds."""
    rows = []
    for size in sizes:
        for batch in batches:
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
            cases = {name: forward_case(model, images, device) for name, model in variants.items()}
            ceiling_flops = {}
            for dtype_name, ceiling in ceilings.items():
                cases[f"ceiling_{dtype_name}"], ceiling_flops[dtype_name] = ceiling_case(
                    device, getattr(torch, dtype_name), ceiling["shape"])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                times = run_interleaved(cases, repeats=repeats, warmup=warmup, device=device)
            except torch.cuda.OutOfMemoryError:
                log(f"  {size}px batch {batch}: out of memory, skipped")
                continue
            for name in variants:
                parts = times[name]
                seconds, total = median(parts["model"]), median(parts["end_to_end"])
                gflops = flops[size]["gflop"] * batch / seconds
                dtype_name = "bfloat16" if "bf16" in name else "float32"
                row = {"variant": name, "size": size, "batch": batch, "latency_ms": seconds * 1e3,
                       "end_to_end_ms": total * 1e3, "images_per_s": batch / seconds,
                       "end_to_end_images_per_s": batch / total, "gflops_per_s": gflops, "efficiency": None,
                       "spread": spread(parts["model"]), "latency_all_ms": [t * 1e3 for t in parts["model"]]}
                if dtype_name in ceiling_flops:
                    # model GFLOP/s / ceiling GFLOP/s, round by round = (model FLOPs / ceiling FLOPs) x time ratio.
                    ceiling_times = times[f"ceiling_{dtype_name}"]["total"]
                    row["ceiling_gflops_per_s"] = ceiling_flops[dtype_name] / median(ceiling_times) / 1e9
                    row["efficiency"] = (flops[size]["gflop"] * 1e9 * batch / ceiling_flops[dtype_name]
                                         * paired_ratio(ceiling_times, parts["model"]))
                rows.append(row)
                efficiency = f", {row['efficiency']:.2f} of the ceiling" if row["efficiency"] is not None else ""
                log(f"  {size}px batch {batch} {name:>20}: {seconds * 1e3:8.1f} ms model, {total * 1e3:8.1f} ms end "
                    f"to end, {gflops:7.1f} GFLOP/s{efficiency}")
            if device.type == "cuda":
                rows[-1]["peak_memory_mb_all_variants"] = torch.cuda.max_memory_allocated(device) / 1024 ** 2
    return rows


def deform_cost(variants: dict, flops: dict, size: int, repeats: int, warmup: int, device: torch.device,
                log: Callable[[str], None], names: Sequence[str] | None = None) -> dict:
    """Each variant against itself with plain convs in the head (ratio), and the time inside the deformable
    convs as a share of the forward (measured with hooks on the fast float32 model)."""
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    cases = {}
    for name, model in variants.items():
        if "compiled" in name or (names is not None and name not in names):
            continue
        cases[name] = _forward_only(model, images)
        cases[name + "+plain_conv"] = _forward_only(without_deformation(model), images)
    times = run_interleaved(cases, repeats=repeats, warmup=warmup, device=device)
    result = {"size": size, "batch": 1, "flop_share": flops[size]["deform_share_of_flops"], "ratios": {}}
    for name in variants:
        if name in cases:
            ratio = paired_ratio(times[name]["total"], times[name + "+plain_conv"]["total"])
            result["ratios"][name] = ratio
            log(f"  {name}: full model / plain-conv model = {ratio:.3f}")
    for name in ("fast_fp32", "fast_bf16"):
        if name in variants:
            share = _deform_time_share(variants[name], images, repeats, device)
            result[f"time_share_{name}"] = share
            log(f"  {name}: deformable convs take {share:.1%} of the forward")
    return result


def _forward_only(model: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def case() -> None:
        with torch.inference_mode():
            model(images)
    return case


def _deform_time_share(model: nn.Module, images: torch.Tensor, repeats: int, device: torch.device) -> float:
    inside: list[float] = []
    started: dict[int, float] = {}

    def before(module, _inputs):
        synchronize(device)
        started[id(module)] = clock()

    def after(module, _inputs, _output):
        synchronize(device)
        inside.append(clock() - started.pop(id(module)))

    handles = []
    for level in model.head.levels:
        handles.append(level.adaption.dconv.register_forward_pre_hook(before))
        handles.append(level.adaption.dconv.register_forward_hook(after))
    shares = []
    try:
        with torch.inference_mode():
            model(images)
            for _ in range(repeats):
                inside.clear()
                synchronize(device)
                start = clock()
                model(images)
                synchronize(device)
                shares.append(sum(inside) / (clock() - start))
    finally:
        for handle in handles:
            handle.remove()
    return median(shares)


def capture_cost(variants: dict, size: int, repeats: int, log: Callable[[str], None],
                 names: Sequence[str] = ("eager_fp32", "fast_fp32", "fast_bf16")) -> dict:
    """Forward with fusion capture on / off (interleaved), through the introspection package's own measure."""
    from ..introspection.capture import measure_capture_overhead

    result = {"size": size, "batch": 1}
    for name in names:
        if name in variants:
            measured = measure_capture_overhead(variants[name], size=size, repeats=repeats, warmup=1)
            result[name] = {"ratio": measured["ratio"], "plain_ms": measured["plain_seconds"] * 1e3,
                            "captured_ms": measured["captured_seconds"] * 1e3}
            log(f"  {name}: capture on / off = {measured['ratio']:.3f}")
    return result


def analysis_cost(model: nn.Module, size: int, repeats: int, device: torch.device, *, integrated_steps: int,
                  log: Callable[[str], None]) -> dict:
    """Gradient-flow analysis vs a forward (interleaved), and attributions (time)."""
    from ..introspection.attribution import integrated_gradients, saliency
    from ..introspection.decomposition import SumOfScores, gradient_flow

    image = sample_image(size, device)
    with torch.inference_mode():
        decoded = model.decode(model(image.unsqueeze(0)))[0]
    row = int((decoded[:, 4] * decoded[:, 5:].max(dim=1).values).argmax())
    cases = {"forward": _forward_only(model, image.unsqueeze(0)),
             "gradient_flow": lambda: gradient_flow(model, image, SumOfScores())}
    times = run_interleaved(cases, repeats=repeats, warmup=1, device=device)
    forward = median(times["forward"]["total"])
    result = {"size": size, "forward_ms": forward * 1e3,
              "gradient_flow_ms": median(times["gradient_flow"]["total"]) * 1e3,
              "gradient_flow_ratio": median(times["gradient_flow"]["total"]) / forward}
    log(f"  gradient flow = {result['gradient_flow_ratio']:.1f} forwards ({result['gradient_flow_ms']:.0f} ms)")
    start = clock()
    saliency(model, image, row)
    synchronize(device)
    result["saliency_ms"] = (clock() - start) * 1e3
    log(f"  saliency: {result['saliency_ms']:.0f} ms")
    if integrated_steps:
        start = clock()
        integrated_gradients(model, image, row, n_steps=integrated_steps, internal_batch_size=4)
        synchronize(device)
        result["integrated_gradients_ms"] = (clock() - start) * 1e3
        result["integrated_gradients_steps"] = integrated_steps
        log(f"  integrated gradients ({integrated_steps} steps): {result['integrated_gradients_ms']:.0f} ms")
    return result


def random_labels(batch: int, size: int, num_classes: int, generator: torch.Generator, boxes: int = 6
                  ) -> torch.Tensor:
    """(B, boxes, 6) training labels [class, cx, cy, w, h, mixup ratio 1] in input pixels."""
    sizes = torch.empty(batch, boxes, 2).uniform_(0.05, 0.5, generator=generator) * size
    centres = torch.empty(batch, boxes, 2).uniform_(0.25, 0.75, generator=generator) * size
    classes = torch.randint(0, num_classes, (batch, boxes, 1), generator=generator).float()
    return torch.cat([classes, centres, sizes, torch.ones(batch, boxes, 1)], dim=2)


def training_throughput(width: float, size: int, batch: int, steps: int, device: torch.device,
                        log: Callable[[str], None], channels_first: bool = True) -> list[dict]:
    """Images/s of SGD steps with random labels: float32 channels-last (and NCHW unless `channels_first` is
    False), and on a GPU bf16 autocast."""
    from ..training.loss import YOLOv3Loss
    from ..training.params import set_objectness_prior

    generator = torch.Generator().manual_seed(3)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    settings = ([("fp32", None, False)] if channels_first else []) + [("fp32_channels_last", None, True)]
    if device.type == "cuda":
        settings += [("amp_bf16", torch.bfloat16, False), ("amp_bf16_channels_last", torch.bfloat16, True)]
    cases = {}
    for name, amp_dtype, channels_last in settings:
        torch.manual_seed(0)
        model = build_model(width=width).to(device)
        set_objectness_prior(model, 0.01)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        criterion = YOLOv3Loss.from_config(model.config).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
        labels = random_labels(batch, size, model.num_classes, generator).to(device)
        batch_images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        cases[name] = _training_step(model, criterion, optimizer, batch_images, labels, amp_dtype, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = run_interleaved(cases, repeats=steps, warmup=1, device=device)
    rows = []
    for name, parts in times.items():
        seconds = median(parts["total"])
        rows.append({"width": width, "size": size, "batch": batch, "variant": name, "step_ms": seconds * 1e3,
                     "images_per_s": batch / seconds, "spread": spread(parts["total"])})
        log(f"  width {width} {size}px batch {batch} {name:>22}: {batch / seconds:6.2f} images/s "
            f"({seconds * 1e3:.0f} ms/step)")
    if device.type == "cuda":
        rows[-1]["peak_memory_mb_all_variants"] = torch.cuda.max_memory_allocated(device) / 1024 ** 2
    return rows


def _training_step(model, criterion, optimizer, images, labels, amp_dtype, device) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
        loss = criterion(outputs, labels)["total"]
        loss.backward()
        optimizer.step()
    return step


def loader_throughput(synthetic: str, size: int, batch: int, batches: int, workers: int, device: torch.device,
                      log: Callable[[str], None]) -> dict:
    """Images/s the training data pipeline (decode, augment, collate) delivers with `workers` processes."""
    from torch.utils.data import DataLoader

    from ..data.augment import TrainDataset, collate
    from ..data.coco import COCODetection

    root = Path(synthetic)
    dataset = TrainDataset(COCODetection(root / "annotations" / "train.json", root / "images" / "train"),
                           input_size=size)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        try:
            images = next(iterator)[0]
        except StopIteration:
            break
        count += images.shape[0]
    seconds = time.perf_counter() - start
    result = {"size": size, "batch": batch, "workers": workers, "images_per_s": count / seconds if count else None}
    log(f"  data loader ({workers} workers): {result['images_per_s'] or 0:.1f} images/s")
    return result


def bf16_accuracy(variants: dict, size: int, device: torch.device, *, weights: str | None,
                  synthetic: str | None, log: Callable[[str], None]) -> dict:
    """bf16 vs float32: AP points on the synthetic validation split with a trained checkpoint (at its input
    size), else the agreement of the decoded outputs of the calibrated random model on a sample image."""
    if "fast_bf16" not in variants:
        return {"skipped": "bf16 is not supported on this device"}
    if weights is not None:
        from ..checkpoint import load_model
        from ..data.coco import COCODetection
        from ..inference.coco_eval import evaluate_coco

        model = load_model(weights, device=device)
        size = int(model.metadata.get("input_size") or size)  # the size the checkpoint was trained for
        if synthetic is None:
            root = Path(tempfile.mkdtemp(prefix="asff_bench_val_"))
            from ..data.synthetic import generate

            paths = generate(root, seed=12345, train=0, val=100, size=size)
            annotations, images = paths.val_annotations, paths.val_images
        else:
            annotations = Path(synthetic) / "annotations" / "val.json"
            images = Path(synthetic) / "images" / "val"
        dataset = COCODetection(annotations, images)
        result = {"weights": str(weights), "images": len(dataset), "size": size}
        for name, candidate in (("fp32", model), ("bf16", optimize_for_inference(model, dtype=torch.bfloat16))):
            metrics, _ = evaluate_coco(candidate, dataset, size, device=device, batch_size=8)
            result[f"AP_{name}"], result[f"AP50_{name}"] = metrics["AP"], metrics["AP50"]
        result["AP_difference_points"] = 100 * (result["AP_bf16"] - result["AP_fp32"])
        log(f"  AP fp32 {result['AP_fp32']:.4f}, bf16 {result['AP_bf16']:.4f}: "
            f"{result['AP_difference_points']:+.2f} points")
        return result
    image = sample_image(size, device).unsqueeze(0)
    with torch.inference_mode():
        reference = variants["eager_fp32"](image)
        candidate = variants["fast_bf16"](image)
        reference_rows = variants["eager_fp32"].decode(reference)[0]
        candidate_rows = variants["fast_bf16"].decode(candidate)[0]
    relative = [float((c.prediction.float() - r.prediction).abs().max() / r.prediction.abs().max())
                for c, r in zip(candidate, reference, strict=True)]
    score_reference = reference_rows[:, 4] * reference_rows[:, 5:].max(dim=1).values
    score_candidate = candidate_rows[:, 4] * candidate_rows[:, 5:].max(dim=1).values
    top_reference = set(score_reference.topk(10).indices.tolist())
    top_candidate = set(score_candidate.topk(10).indices.tolist())
    result = {"weights": None, "size": size, "max_relative_logit_error_per_level": relative,
              "max_score_difference": float((score_candidate - score_reference).abs().max()),
              "top10_same_rows": len(top_reference & top_candidate),
              "note": "random weights amplify rounding from layer to layer; the accuracy check is the AP one "
                      "(--weights)"}
    log(f"  random model: logits within {max(relative):.1%} of their range, scores within "
        f"{result['max_score_difference']:.3f}, {result['top10_same_rows']}/10 same top rows "
        "(random weights: not an accuracy measure; pass --weights for the AP check)")
    return result


# ------------------------------------------------------------------------------------------------ report


def targets(results: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    rows = []

    def add(name: str, value: float | None, limit: float, better: str, note: str = "") -> None:
        met = None if value is None or math.isnan(value) else (value <= limit if better == "max" else value >= limit)
        rows.append({"target": name, "value": value, "limit": limit, "kind": better, "met": met, "note": note})

    def forward(variant: str, size: int, batch: int) -> dict | None:
        return next((r for r in results.get("forward", []) if r["variant"] == variant and r["size"] == size
                     and r["batch"] == batch), None)

    capture = results.get("capture", {})
    if "eager_fp32" in capture:
        add("fusion capture on/off at 416 (model as built)", capture["eager_fp32"]["ratio"], 1.03, "max")
    if "fast_fp32" in capture:
        add("fusion capture on/off at 416 (fast fp32)", capture["fast_fp32"]["ratio"], 1.03, "max")
    deform = results.get("deform", {})
    if "time_share_fast_fp32" in deform:
        add("deformable conv share of a forward at 416 (fast fp32)", deform["time_share_fast_fp32"], 0.10, "max",
            f"its FLOPs alone are {deform['flop_share']:.1%} of the model's")
    for name, ratio in deform.get("ratios", {}).items():
        add(f"model / plain-conv model at 416 ({name})", ratio, 1.25, "max", "issue 2")
    for variant in ("fast_fp32", "fast_fp32_compiled"):
        row = forward(variant, 608, 1)
        if row is not None and row["efficiency"] is not None:
            add(f"{variant.replace('_', ' ')} at 608, batch 1: share of the conv ceiling", row["efficiency"], 0.75,
                "min")
    row = forward("eager_fp32", 608, 1)
    if row is not None and row["efficiency"] is not None:
        add("model as built, fp32 at 608, batch 1: share of the conv ceiling", row["efficiency"], 0.75, "min",
            "reference")
    for batch in sorted({r["batch"] for r in results.get("forward", [])}):
        fp32, bf16 = forward("fast_fp32", 416, batch), forward("fast_bf16", 416, batch)
        if fp32 and bf16:
            speedup = (paired_ratio(fp32["latency_all_ms"], bf16["latency_all_ms"]) if "latency_all_ms" in fp32
                       else fp32["latency_ms"] / bf16["latency_ms"])
            add(f"bf16 speed-up over fast fp32 at 416, batch {batch}", speedup, 1.5, "min")
    accuracy = results.get("bf16_accuracy", {})
    if "AP_difference_points" in accuracy:
        add("bf16 AP minus fp32 AP (points, absolute)", abs(accuracy["AP_difference_points"]), 0.5, "max")
    if results.get("environment", {}).get("device", "").startswith("cuda"):
        for variant in ("fast_bf16_compiled", "fast_bf16", "fast_fp32"):
            row = forward(variant, 608, 1)
            if row:
                add(f"GPU batch-1 latency at 608 ms ({variant})", row["latency_ms"], 5.0, "max")
                break
        for variant in ("fast_bf16_compiled", "fast_bf16"):
            row = forward(variant, 416, 64)
            if row:
                add(f"GPU images/s at 416, batch 64 ({variant})", row["images_per_s"], 2000.0, "min")
                break
    return rows


def _number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def format_table(results: dict) -> str:
    """The results as Markdown tables (what docs/performance.md shows)."""
    env = results["environment"]
    lines = [f"Machine: {env.get('gpu') or env['cpu']}, {env['torch_threads']} torch threads, torch {env['torch']}, "
             f"device {env['device']}, CPU flags {', '.join(env['cpu_flags']) or 'n/a'}, load average at start "
             f"{_number((env.get('load_average') or [math.nan])[0], 1)}; mode {results['settings']['mode']}, "
             f"{results['settings']['repeats']} repeats (medians), "
             f"{'thread CPU time' if results['settings'].get('clock') == 'cpu' else 'wall-clock time'}.", ""]
    lines += ["| ceiling conv (fastest 3x3 tried) | dtype | ms | GFLOP/s | other shapes, GFLOP/s |",
              "|---|---|---|---|---|"]
    for ceiling in results["ceilings"].values():
        others = ", ".join(f"{name} {_number(rate, 0)}" for name, rate in ceiling["candidates_gflops_per_s"].items()
                           if [int(v) for v in name.split("x")] != ceiling["shape"])
        lines.append(f"| {'x'.join(map(str, ceiling['shape']))} | {ceiling['dtype']} | {_number(ceiling['ms'], 1)} "
                     f"| {_number(ceiling['gflops_per_s'], 1)} | {others} |")
    lines += ["", "| size | GFLOP (batch 1) | deformable conv share of FLOPs |", "|---|---|---|"]
    for size, flops in results["flops"].items():
        lines.append(f"| {size} | {_number(flops['gflop'], 1)} | {flops['deform_share_of_flops']:.1%} |")
    lines += ["", "| variant | size | batch | model ms | end-to-end ms | images/s | GFLOP/s | of ceiling |",
              "|---|---|---|---|---|---|---|---|"]
    for row in results.get("forward", []):
        lines.append(f"| {row['variant']} | {row['size']} | {row['batch']} | {_number(row['latency_ms'], 1)} | "
                     f"{_number(row['end_to_end_ms'], 1)} | {_number(row['images_per_s'], 2)} | "
                     f"{_number(row['gflops_per_s'], 1)} | {_number(row['efficiency'], 2)} |")
    deform = results.get("deform")
    if deform:
        lines += ["", f"Deformable conv at {deform['size']}, batch 1: {deform['flop_share']:.1%} of the FLOPs; "
                  + "; ".join(f"time share ({name[len('time_share_'):]}) {value:.1%}"
                              for name, value in deform.items() if name.startswith("time_share_"))
                  + "; full model / plain-conv model: "
                  + ", ".join(f"{name} {ratio:.3f}" for name, ratio in deform["ratios"].items()) + "."]
    capture = results.get("capture")
    if capture:
        lines += ["", f"Fusion capture at {capture['size']}, batch 1, on / off: " + ", ".join(
            f"{name} {value['ratio']:.3f}" for name, value in capture.items() if isinstance(value, dict)) + "."]
    analysis = results.get("analysis")
    if analysis:
        text = (f"Analysis at {analysis['size']} (model as built): gradient flow {analysis['gradient_flow_ms']:.0f} ms "
                f"= {analysis['gradient_flow_ratio']:.1f} forwards; saliency {analysis['saliency_ms']:.0f} ms")
        if "integrated_gradients_ms" in analysis:
            text += (f"; integrated gradients ({analysis['integrated_gradients_steps']} steps) "
                     f"{analysis['integrated_gradients_ms']:.0f} ms")
        lines += ["", text + "."]
    if results.get("training"):
        lines += ["", "| training | size | batch | variant | images/s | ms/step |", "|---|---|---|---|---|---|"]
        for row in results["training"]:
            lines.append(f"| width {row['width']} | {row['size']} | {row['batch']} | {row['variant']} | "
                         f"{_number(row['images_per_s'], 2)} | {_number(row['step_ms'], 0)} |")
    if results.get("loader"):
        loader = results["loader"]
        lines += ["", f"Data loader at {loader['size']} px, batch {loader['batch']}, {loader['workers']} workers: "
                  f"{_number(loader['images_per_s'], 1)} images/s."]
    accuracy = results.get("bf16_accuracy")
    if accuracy and "AP_difference_points" in accuracy:
        lines += ["", f"bf16 accuracy ({accuracy['images']} synthetic validation images at {accuracy['size']}): "
                  f"AP fp32 {accuracy['AP_fp32']:.4f}, bf16 {accuracy['AP_bf16']:.4f}, "
                  f"difference {accuracy['AP_difference_points']:+.2f} points."]
    elif accuracy and "max_score_difference" in accuracy:
        lines += ["", f"bf16 against fp32 without a checkpoint (random weights, sample image at {accuracy['size']}; "
                  "not an accuracy measure, run with --weights for the AP check): logits within "
                  f"{max(accuracy['max_relative_logit_error_per_level']):.1%} of their range, scores within "
                  f"{accuracy['max_score_difference']:.3f}, {accuracy['top10_same_rows']}/10 same top rows."]
    memory = results.get("memory", {})
    if memory:
        lines += ["", "Peak memory: " + ", ".join(f"{k} {_number(v, 0)} MB" for k, v in memory.items()) + "."]
    if results.get("targets"):
        lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
        for row in results["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
            note = f" ({row['note']})" if row["note"] else ""
            lines.append(f"| {row['target']}{note} | {_number(row['value'], 3)} | "
                         f"{'<=' if row['kind'] == 'max' else '>='} {row['limit']} | {met} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main


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
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=("forward", "deform", "capture", "analysis", "training", "accuracy"),
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


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
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
    use_clock(clock_kind)
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
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    results: dict = {"environment": environment(device),
                     "settings": {"mode": "quick" if quick else "full", "sizes": sizes, "batches": batches,
                                  "repeats": repeats, "warmup": warmup, "compile": compile_mode, "clock": clock_kind,
                                  "tf32": device.type == "cuda"}}
    log(f"{results['environment']['cpu']} / {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with_bf16 = results["environment"]["bf16_supported"]

    log("ceiling: the fastest of four large 3x3 convs")
    ceiling_batch = 1 if device.type == "cpu" else 16
    results["ceilings"] = {"float32": conv_ceiling(device, torch.float32, repeats, ceiling_batch)}
    if with_bf16:
        results["ceilings"]["bfloat16"] = conv_ceiling(device, torch.bfloat16, repeats, ceiling_batch)
    for ceiling in results["ceilings"].values():
        log(f"  {ceiling['dtype']}: {ceiling['gflops_per_s']:.1f} GFLOP/s")

    log("building the full-size model (BatchNorm calibrated on noise)")
    model = calibrated_model()
    deform_size = DEFORM_SIZE
    results["flops"] = {size: model_flops(model, size) for size in sorted(set(sizes) | {deform_size})}
    variants = inference_variants(model, device, with_bf16=with_bf16, compile=compile_mode)
    results["memory"] = {"after_build_rss": peak_rss_mb()}

    if "forward" not in args.skip:
        log("forward latency and throughput")
        results["forward"] = forward_grid(variants, results["flops"], results["ceilings"], sizes, batches, repeats,
                                          warmup, device, log)
        results["memory"]["after_forward_rss"] = peak_rss_mb()
    if "deform" not in args.skip:
        log(f"deformable conv cost at {deform_size}")
        compared = ("eager_fp32", "fast_bf16") if quick else None
        results["deform"] = deform_cost(variants, results["flops"], deform_size, repeats, warmup, device, log,
                                        compared)
    if "capture" not in args.skip:
        log(f"fusion capture cost at {deform_size}")
        captured = ("eager_fp32",) if quick else ("eager_fp32", "fast_fp32", "fast_bf16")
        results["capture"] = capture_cost(variants, deform_size, repeats if quick else max(repeats, 7), log, captured)
    if "analysis" not in args.skip:
        log(f"gradient flow and attribution at {deform_size} (model as built)")
        results["analysis"] = analysis_cost(variants["eager_fp32"], deform_size, repeats, device,
                                            integrated_steps=integrated_steps, log=log)
        results["memory"]["after_analysis_rss"] = peak_rss_mb()
    if "accuracy" not in args.skip:
        log("bf16 against float32")
        results["bf16_accuracy"] = bf16_accuracy(variants, deform_size, device, weights=args.weights,
                                                 synthetic=args.synthetic, log=log)
    del variants, model
    if "training" not in args.skip:
        log("training steps")
        train_size = 320
        full_batch, small_batch = (2, 4) if device.type == "cpu" else (16, 32)
        results["training"] = (training_throughput(1.0, train_size, full_batch, 1 if quick else 5, device, log,
                                                   channels_first=not quick)
                               + training_throughput(0.25, train_size, small_batch, 2 if quick else 6, device, log))
        if args.synthetic:
            workers = min(4, max(1, (os.cpu_count() or 2) - 1))
            results["loader"] = loader_throughput(args.synthetic, train_size, full_batch, 4 if quick else 20,
                                                  workers, device, log)
        results["memory"]["after_training_rss"] = peak_rss_mb()
    if device.type == "cuda":
        results["memory"]["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device) / 1024 ** 2
    results["targets"] = targets(results)
    results["seconds"] = time.perf_counter() - started

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2, default=_json_default) + "\n")
    table = format_table(results)
    table_path = Path(args.table) if args.table else out.with_suffix(".md")
    atomic_write_text(table_path, table)
    print()
    print(table)
    log(f"wrote {out} and {table_path}")
    return results


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


