"""Where a forward's time goes (the bench's `profile` section): per part of the model and per kind of operator.

Parts are the model's own modules, timed with hooks on the fast path (CPU work is synchronous, so a module's
time is the wall time between its pre-hook and its hook): the backbone's stages, SPP, the rest of the neck,
the fusion, the deformable convs of the head and the rest of the head; `decode` is outside them. Each part's
FLOPs come from `FlopCounterMode` on the model as built (per module), the deformable convs' bilinear sampling
added, so a part's efficiency is its GFLOP/s against the conv ceiling of the same run. Operators come from
`torch.profiler` (self CPU time), grouped into convolutions, deformable sampling, pooling, concatenation,
copies and layout changes, interpolation, activations and the rest.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from statistics import median

import torch
from torch import nn

from ..models.blocks import SPP

# Operator kinds: the first kind with a pattern in an operator's short name (after "::") decides; the
# deformable conv's matmul is the only addmm (or, packed in bf16, oneDNN linear) of the model.
OPERATOR_KINDS = (
    ("convolution", ("conv",)),
    ("deformable conv: matmul", ("addmm", "linear")),
    ("deformable conv: sampling and grids", ("embedding_bag", "floor", "clamp", "arange", "where", "gather",
                                             "index")),
    ("elementwise (fusion sums, residual adds, bilinear weights)", ("mul", "add", "sub", "div")),
    ("pooling (SPP)", ("pool",)),
    ("concatenation", ("cat",)),
    ("copies and layout changes", ("copy", "contiguous", "clone", "permute")),
    ("interpolation", ("upsample",)),
    ("activation", ("leaky", "relu", "sigmoid", "softmax", "exp")),
    ("allocation and views", ("empty", "resize", "as_strided", "view", "slice", "narrow", "fill", "select",
                              "expand", "reshape", "squeeze", "transpose", "unbind", "split", "chunk")),
)


def operator_kind(name: str) -> str:
    short = name.lower().split("::")[-1]
    if short in ("to", "t", "detach", "alias"):
        return "allocation and views"
    return next((kind for kind, patterns in OPERATOR_KINDS if any(p in short for p in patterns)), "other")


def model_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """name -> the modules a part is made of, in forward order; the parts do not overlap, none is empty.

    A backbone stage held in a ModuleList (MobileNetV2's inverted residual blocks, never called as a whole) is
    split into its runs of blocks at one resolution, each run starting at a block that downsamples.
    """
    parts: dict[str, list[nn.Module]] = {}
    for name, stage in model.backbone.named_children():
        if not isinstance(stage, nn.ModuleList):
            parts[f"backbone.{name}"] = [stage]
            continue
        runs: list[list[int]] = []
        for index, block in enumerate(stage):
            if not runs or _downsamples(block):
                runs.append([])
            runs[-1].append(index)
        for run in runs:
            parts[f"backbone.{name} {run[0]}-{run[-1]}"] = [stage[index] for index in run]
    parts["neck: SPP"] = [module for module in model.neck.modules() if isinstance(module, SPP)]
    parts["neck: other"] = [model.neck]  # the SPP time is taken out below
    parts["fusion"] = [model.fusion]
    parts["head: deformable convs"] = [level.adaption.dconv for level in model.head.levels
                                       if getattr(level, "adaption", None) is not None]
    parts["head: other"] = [model.head]
    return {part: modules for part, modules in parts.items() if modules}


def _downsamples(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in module.modules())


NESTED = {"neck: other": "neck: SPP", "head: other": "head: deformable convs"}  # outer part -> inner part


def part_flops(model: nn.Module, size: int) -> dict[str, float]:
    """GFLOP of each part at batch 1 on the model as built (conv and matmul MACs x 2; the deformable convs'
    sampling, 4 corners x 2 per sampled value, added to theirs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    by_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    names = {module: name for name, module in model.named_modules()}
    prefix = type(model).__name__
    flops = {}
    for part, modules in model_parts(model).items():
        flops[part] = sum(by_module.get(f"{prefix}.{names[module]}", 0) for module in modules)
    for outer, inner in NESTED.items():
        if inner in flops:
            flops[outer] -= flops[inner]
    for dconv, stride in [(level.adaption.dconv, stride) for level, stride in zip(model.head.levels, model.strides,
                                                                                     strict=True)
                          if getattr(level, "adaption", None) is not None]:
        _, channels, kernel_h, kernel_w = dconv.weight.shape
        flops["head: deformable convs"] += 8 * channels * kernel_h * kernel_w * (size // stride) ** 2
    return {part: value / 1e9 for part, value in flops.items()}


def part_times(model: nn.Module, images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of each part over `repeats` forwards (after one warm-up), plus `total` and `outside parts`."""
    spans: dict[str, list[float]] = defaultdict(list)
    handles = []
    starts: dict[int, float] = {}
    for part, modules in model_parts(model).items():
        for module in modules:
            def before(module, _inputs):
                starts[id(module)] = time.perf_counter()

            def after(module, _inputs, _output, part=part):
                spans[part].append(time.perf_counter() - starts[id(module)])

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    totals = []
    try:
        with torch.inference_mode():
            model(images)  # warm-up
            spans.clear()
            for _ in range(repeats):
                start = time.perf_counter()
                model(images)
                totals.append(time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    # Each module runs once per forward, so forward i's spans of a part are its i-th run of len / repeats.
    per_forward = {}
    for part, values in spans.items():
        count = len(values) // repeats
        per_forward[part] = [sum(values[i * count:(i + 1) * count]) for i in range(repeats)]
    for outer, inner in NESTED.items():
        if inner in per_forward:
            per_forward[outer] = [o - i for o, i in zip(per_forward[outer], per_forward[inner], strict=True)]
    # What no part covers (the model's own glue between parts), forward by forward: never negative.
    per_forward["outside parts"] = [total - sum(values[i] for values in per_forward.values())
                                    for i, total in enumerate(totals)]
    ms = {part: median(values) * 1e3 for part, values in per_forward.items()}
    ms["total"] = median(totals) * 1e3
    return ms


def operator_times(model: nn.Module, images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Share of self CPU time per operator kind (`OPERATOR_KINDS`), over `repeats` profiled forwards."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(images)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(repeats):
                model(images)
    kinds: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        if event.self_cpu_time_total <= 0:
            continue
        kinds[operator_kind(event.key)] += event.self_cpu_time_total
    total = sum(kinds.values())
    return {kind: value / total for kind, value in sorted(kinds.items(), key=lambda item: -item[1])}


def profile_forward(eager: nn.Module, fast: nn.Module, size: int, repeats: int, ceiling_gflops: float,
                    log: Callable[[str], None], variant: str = "fast_fp32") -> dict:
    """Per-part time, GFLOP and efficiency of a fast forward (`variant`, against the ceiling of its own dtype)
    at batch 1, and operator-kind shares."""
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(5))
    images = images.contiguous(memory_format=torch.channels_last)
    flops = part_flops(eager, size)
    times = part_times(fast, images, repeats)
    rows = []
    for part, gflop in flops.items():
        ms = times.get(part, 0.0)
        rate = gflop / (ms / 1e3) if ms > 0 else float("nan")
        rows.append({"part": part, "ms": ms, "share": ms / times["total"], "gflop": gflop, "gflops_per_s": rate,
                     "efficiency": rate / ceiling_gflops if gflop > 0 else None})
    rows.append({"part": "outside parts (decode excluded: head outputs, glue)", "ms": times["outside parts"],
                 "share": times["outside parts"] / times["total"], "gflop": 0.0, "gflops_per_s": None,
                 "efficiency": None})
    shares = ", ".join(f"{r['part']} {r['share']:.0%}" for r in rows)
    log(f"  {variant} forward {times['total']:.1f} ms at {size}: {shares}")
    return {"size": size, "batch": 1, "variant": variant, "total_ms": times["total"], "parts": rows,
            "operators": operator_times(fast, images, repeats)}


__all__ = ["OPERATOR_KINDS", "model_parts", "operator_kind", "operator_times", "part_flops", "part_times",
           "profile_forward"]
