"""What the CPU fast path's latest levers buy, each against the fast path without it, in one process.

    python -m asff_viz.bench.levers [--sizes 416 608] [--batches 1 8] [--repeats 5] [--threads N] [--out F.json]

The full-size model (random weights, BatchNorm calibrated, `bench.models.calibrated_model`) through
`optimize_for_inference` three times per dtype: `before`, with `pack_weights=False`, every `InPlaceResidual` back
to a plain `Bottleneck` and whole batches (`cpu_chunk_pixels=0`); `whole`, as shipped but with whole batches; and
`now`, as shipped (batches in chunks). So `before / whole` is what packed weights and in-place residuals buy, and
`whole / now` what chunked batches buy. Forwards are timed interleaved, round by round, and each speed-up is the
median of the per-round ratios, so load from other processes hits all paths alike. bf16 is measured where this
CPU runs bf16 oneDNN kernels. The outputs of `before` and `now` are compared on the same input: the largest
difference, relative to the output's scale, is reported next to the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..inference.fast import InPlaceResidual, optimize_for_inference, weight_packing_available
from ..models.blocks import Bottleneck
from ..utils.allocator import keep_freed_memory
from ..utils.timing import median, paired_ratio, run_interleaved


def unpacked_fast_path(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The fast path without packed weights, with out-of-place residual adds and whole batches."""
    fast = optimize_for_inference(model, dtype=dtype, pack_weights=False, cpu_chunk_pixels=0)
    for module in fast.modules():
        if type(module) is InPlaceResidual:
            module.__class__ = Bottleneck
    return fast


def _relative_difference(first: list, second: list) -> float:
    return max(float((a.prediction.float() - b.prediction.float()).abs().max() / a.prediction.float().abs().max())
               for a, b in zip(first, second, strict=True))


def _forward(path: nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            path(images)
    return run


def lever_speedups(model: nn.Module, sizes: Sequence[int], batches: Sequence[int], repeats: int,
                   log: Callable[[str], None] = print) -> list[dict]:
    """One row per size, batch and dtype: ms of the three paths, the speed-ups and the outputs' difference."""
    if not weight_packing_available():
        raise RuntimeError("this PyTorch has no oneDNN weight packing: nothing to compare")
    dtypes = {"fp32": None}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes["bf16"] = torch.bfloat16
    paths = {}
    for name, dtype in dtypes.items():
        paths[f"{name}_before"] = unpacked_fast_path(model, dtype)
        paths[f"{name}_whole"] = optimize_for_inference(model, dtype=dtype, cpu_chunk_pixels=0)
        paths[f"{name}_now"] = optimize_for_inference(model, dtype=dtype)
    rows = []
    for size in sizes:
        for batch in batches:
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size + batch))
            with torch.inference_mode():  # the outputs compared below; also each path's warm-up (weights packed)
                outputs = {name: path(images) for name, path in paths.items()}
            cases = {name: _forward(path, images) for name, path in paths.items()}
            times = run_interleaved(cases, repeats=repeats, warmup=0, device=torch.device("cpu"))
            for name in dtypes:
                before, whole, now = (times[f"{name}_{path}"]["total"] for path in ("before", "whole", "now"))
                row = {"dtype": name, "size": size, "batch": batch, "before_ms": median(before) * 1e3,
                       "whole_ms": median(whole) * 1e3, "now_ms": median(now) * 1e3,
                       "speedup_packing": paired_ratio(before, whole), "speedup_chunks": paired_ratio(whole, now),
                       "speedup": paired_ratio(before, now),
                       "relative_difference": _relative_difference(outputs[f"{name}_before"], outputs[f"{name}_now"])}
                rows.append(row)
                log(f"{size}px batch {batch} {name}: {row['before_ms']:.1f} -> {row['whole_ms']:.1f} -> "
                    f"{row['now_ms']:.1f} ms; packing and in-place residuals {row['speedup_packing']:.3f}x, "
                    f"chunks {row['speedup_chunks']:.3f}x, both {row['speedup']:.3f}x; outputs differ by "
                    f"{row['relative_difference']:.1e} of their scale")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.bench.levers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[416, 608])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the commands do
    if any(size < 32 or size % 32 for size in args.sizes):
        parser.error(f"--sizes must be positive multiples of 32, got {args.sizes}")
    if any(batch < 1 for batch in args.batches) or args.repeats < 1:
        parser.error("--batches and --repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out}: is a folder; give a file name")
    from .models import calibrated_model

    try:
        rows = lever_speedups(calibrated_model(), args.sizes, args.batches, args.repeats)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))
        except OSError as error:
            print(f"error: {args.out}: cannot write the results ({error.strerror or error})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
