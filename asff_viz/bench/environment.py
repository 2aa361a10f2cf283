"""The machine a benchmark ran on: CPU model and flags, bf16 support, library versions, peak memory."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
from pathlib import Path

import torch

from ..utils.allocator import allocator_configured_elsewhere, freed_memory_kept


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024


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
        # Whether glibc keeps freed memory for reuse (set by the caller, `asff_viz.utils.allocator`), and why not
        # where the environment configures the allocator otherwise.
        "freed_memory_kept": freed_memory_kept(), "allocator_note": allocator_configured_elsewhere(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 1024 ** 3, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info
