"""What capturing the fusion weights costs: inference timed with and without `capture`, interleaved."""

from __future__ import annotations

import torch
from torch import nn

from .capture import capture


def measure_capture_overhead(model: nn.Module, size: int = 416, repeats: int = 7, warmup: int = 1,
                             batch_size: int = 1) -> dict:
    """Time inference with and without capturing the fusion weights, interleaved, and compare medians.

    Plain and captured forwards alternate (and swap order every repeat: `asff_viz.utils.timing.run_interleaved`) so
    that load from other processes hits both alike. Runs under `torch.no_grad` on the model's device with random
    input. Each forward is timed by the wall clock and, on CPU, by this process's CPU time, which other processes
    competing for the cores disturb less (though not at all only on an idle machine).
    Returns {"size", "repeats", "clock" ("process_cpu" on CPU, else "wall"), "plain_seconds",
    "captured_seconds" (medians by that clock), "ratio" (captured / plain), "wall_ratio", "paired_ratio"
    (median of the ratios of adjacent runs), "best_ratio" (fastest captured / fastest plain), and the
    per-repeat lists "plain_all", "captured_all", "plain_wall", "captured_wall"}.
    """
    import time

    from ..utils.timing import median, paired_ratio, run_interleaved, synchronize

    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, size, size, device=device)
    on_cpu = device.type == "cpu"

    def case(captured: bool):
        def run() -> dict[str, float]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            if captured:
                with capture(model) as recorder:
                    model(images)
                weights = recorder.fusion_weights  # noqa: F841  (kept alive until the timer stops)
            else:
                model(images)
            synchronize(device)
            return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

        return run

    with torch.no_grad():
        times = run_interleaved({"plain": case(False), "captured": case(True)}, repeats=repeats, warmup=warmup,
                                device=device)
    key = "cpu" if on_cpu else "wall"
    plain_times, captured_times = times["plain"][key], times["captured"][key]
    plain_wall, captured_wall = times["plain"]["wall"], times["captured"]["wall"]
    plain_median, captured_median = median(plain_times), median(captured_times)
    return {"size": size, "repeats": repeats, "clock": "process_cpu" if on_cpu else "wall",
            "plain_seconds": plain_median, "captured_seconds": captured_median,
            "ratio": captured_median / plain_median,
            "wall_ratio": median(captured_wall) / median(plain_wall),
            # Each captured run sits next to a plain one: the median of those pairs' ratios cancels slow drifts
            # of the machine's load.
            "paired_ratio": paired_ratio(captured_times, plain_times),
            # The least-disturbed run of each kind (what `timeit` reports) on a machine shared with others.
            "best_ratio": min(captured_times) / min(plain_times),
            "plain_all": plain_times, "captured_all": captured_times,
            "plain_wall": plain_wall, "captured_wall": captured_wall}
