"""glibc's malloc kept from handing freed activations back to the kernel (`asff_viz.utils.allocator`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from asff_viz.utils.allocator import allocator_configured_elsewhere

# Allocate, write and free a 64 MB tensor four times; print whether the settings were applied and the fewest page
# faults of the last three rounds (the first maps the memory in any case).
REUSE = """
import resource, sys, torch
from asff_viz.utils.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(16 << 20)
    del tensor
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


def _run(mode: str, **environ) -> tuple[str, int]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("MALLOC_") and name not in ("GLIBC_TUNABLES", "LD_PRELOAD",
                                                             "ASFF_VIZ_KEEP_FREED_MEMORY")}
    result = subprocess.run([sys.executable, "-c", REUSE, mode], env={**env, **environ}, capture_output=True,
                            text=True, check=True, timeout=120)
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
def test_freed_memory_is_reused_instead_of_mapped_again():
    applied, default = _run("default")
    assert applied == "None" and default >= 16  # 64 MB unmapped when freed, faulted in again (16,384 4-KiB pages)
    applied, kept = _run("keep")
    assert applied == "True" and kept <= default // 10
    # Left alone where the user configured the allocator: the default behaviour again.
    applied, faults = _run("keep", MALLOC_ARENA_MAX="2")
    assert applied == "False" and faults >= 16


def test_other_allocator_settings_are_respected():
    assert allocator_configured_elsewhere({}) is None
    assert allocator_configured_elsewhere({"PATH": "/usr/bin", "LD_PRELOAD": ""}) is None
    assert "MALLOC_TRIM_THRESHOLD_" in allocator_configured_elsewhere({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert "GLIBC_TUNABLES" in allocator_configured_elsewhere({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert allocator_configured_elsewhere({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is None
    assert "LD_PRELOAD" in allocator_configured_elsewhere({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    assert "=0" in allocator_configured_elsewhere({"ASFF_VIZ_KEEP_FREED_MEMORY": "0"})
    assert allocator_configured_elsewhere({"ASFF_VIZ_KEEP_FREED_MEMORY": "1"}) is None


@pytest.mark.parametrize("module, argv", [
    ("asff_viz.analyze.cli", ["replot", "{tmp}/no_such_run"]),
    ("asff_viz.evaluate", ["--annotations", "{tmp}/missing.json", "--images", "{tmp}", "--out", "{tmp}/eval"]),
    ("asff_viz.detect", ["--source", "{tmp}/missing.jpg", "--out", "{tmp}/detect"]),
    ("asff_viz.train", None),
])
def test_commands_keep_freed_memory_before_any_work(module, argv, tmp_path, monkeypatch):
    # Each command sets the allocator first (here its input is missing, so it stops right after).
    import importlib

    command = importlib.import_module(module)
    calls = []
    monkeypatch.setattr(command, "keep_freed_memory", lambda: calls.append(1) or False)
    if argv is None:  # train checks its flags and data first; here it stops where the work would start
        from types import SimpleNamespace

        monkeypatch.setattr(command, "parse_args", lambda argv: SimpleNamespace(run=SimpleNamespace(device="cpu")))
        monkeypatch.setattr(command, "init_distributed", lambda device: (_ for _ in ()).throw(SystemExit(0)))
        argv = []
    try:
        command.main([word.format(tmp=tmp_path) for word in argv])
    except SystemExit:
        pass
    assert calls == [1]


def test_the_bench_reports_the_allocator_without_setting_it():
    # Reporting is not configuring: environment() says what the caller (the bench's main) set.
    result = subprocess.run([sys.executable, "-c", (
        "import torch; from asff_viz.bench.environment import environment; "
        "from asff_viz.utils import allocator; "
        "before = environment(torch.device('cpu'))['freed_memory_kept']; "
        "print(before, allocator._applied is None)")], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.split() == ["False", "True"]
