"""glibc's malloc set to keep freed memory for reuse, for processes that run large forwards again and again.

Out of the box glibc hands large freed blocks back to the kernel: a block above its mmap threshold (which adapts,
but never beyond 32 MB) is unmapped when freed, and the top of the heap is trimmed once more than twice that is
free. A float32 forward of the full-size model frees activations of 10-50 MB and allocates them again on the
next call, and the kernel maps and zero-fills every page again: on a 2-core Xeon about 11,000 page faults per
416-px forward, 27,000 at 608 and 75,000 at 416 batch 8, 2-8 % of the forward's time. `keep_freed_memory` raises
both thresholds to 1 GiB, so that a freed activation is there for the next forward. The process keeps its peak
memory instead of giving part of it back between calls.

The commands (`analyze`, `evaluate`, `detect`, `train`, the bench, the app) call it first; a library user may
too. It changes nothing where glibc is not the allocator (macOS, musl, jemalloc or tcmalloc preloaded), where the
user configured glibc's malloc (`MALLOC_*` variables or `GLIBC_TUNABLES`), or with `ASFF_VIZ_KEEP_FREED_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

THRESHOLD_BYTES = 1 << 30  # mmap and trim thresholds: blocks up to 1 GiB come from, and go back to, the heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_OPT_OUT = "ASFF_VIZ_KEEP_FREED_MEMORY"

_applied: bool | None = None  # once per process


def allocator_configured_elsewhere(environ=os.environ) -> str | None:
    """Why glibc's malloc is left alone in this environment (a reason to show), or None."""
    if environ.get(_OPT_OUT, "").strip() in ("0", "false", "no", "off"):
        return f"{_OPT_OUT}={environ[_OPT_OUT]}"
    tuned = sorted(name for name in environ if name.startswith("MALLOC_"))
    if tuned:
        return f"{tuned[0]} is set"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preloaded = environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded (LD_PRELOAD)"
    return None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to `THRESHOLD_BYTES` (see the module docstring), once per process.
    Returns whether they are set."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and \
                allocator_configured_elsewhere() is None:
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = (mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
                        and mallopt(_M_TRIM_THRESHOLD, THRESHOLD_BYTES) == 1)
    return _applied


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` has set the thresholds in this process (it is not called here)."""
    return bool(_applied)


__all__ = ["THRESHOLD_BYTES", "allocator_configured_elsewhere", "freed_memory_kept", "keep_freed_memory"]
