"""Timing shared by the benchmark and the capture-overhead measurement: clocks, interleaved repeats (every case
once per round, in a rotating order, so that load from other processes hits all cases alike) and robust summaries."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    "cpu": time.thread_time,  # the time this thread ran: leaves out the time other processes took the core
    "process_cpu": time.process_time,
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(cases: dict[str, Callable[[], dict[str, float] | None]], *, repeats: int, warmup: int,
                    device: torch.device,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, list[float]]]:
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


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-round ratios: two configurations timed in the same round share that round's load."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])
