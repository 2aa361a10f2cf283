"""`make gpu-check`: the CUDA paths checked and timed in one go, on a machine with a CUDA device (under 8 minutes).

    python -m asff_viz.bench.gpu_check [--out runs/gpu_check] [--skip-bench]

1. the `gpu`-marked tests (CUDA against CPU: the model, the deformable conv and torchvision's op when it imports,
   capture, the gradient decomposition, the fast paths, AMP training steps, scale-stats);
2. the GPU benchmark: batch-1 latency at 608 and bf16 throughput at 416, batch 64, with `--compile` (CUDA graphs);
3. one JSON (`gpu_check.json`) and one Markdown table (`gpu_check.md`) with the targets: 608 batch-1 latency
   under 5 ms and at least 2,000 images/s at 416, batch 64, bf16 (H200).

It runs from the repository as it is (nothing is downloaded: the machine may have no network) and first checks
that the packages the tests import are present, naming any that is missing. Without a CUDA device it stops at
once with exit status 2 and one line saying so; nothing is run or written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

import torch

from ..utils.argtypes import output_folder
from ..utils.fileio import atomic_write_text

# What the files holding `gpu` tests and the bench import (the app's streamlit and plotly are not among them, nor
# captum): the H200 image lacks only pycocotools of these; `.ci/gpu_wheels.sh` fetches it for `make gpu-check`.
REQUIRED = ("numpy", "cv2", "pycocotools", "matplotlib", "tqdm", "tensorboard", "pytest")
TESTS = Path(__file__).resolve().parents[2] / "tests"
TARGETS = {"latency_608_batch1_ms": ("<", 5.0), "throughput_416_batch64_bf16": (">=", 2000.0)}
BENCH_ARGS = ["--device", "cuda", "--compile", "--sizes", "416", "608", "--batches", "1", "64", "--repeats", "5",
              "--skip", "deform", "capture", "analysis", "training", "accuracy"]


def preflight() -> str | None:
    """Why the check cannot run here (no CUDA device, missing packages), or None."""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"no CUDA device here (torch {torch.__version__}, {build}): gpu-check runs the GPU tests and "
                "benchmark on a machine with one; nothing was run.")
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        return f"missing packages {', '.join(missing)}: install the project's requirements (pyproject.toml) first."
    return None


def _run(command: list[str], timeout: int) -> tuple[int, str]:
    """(exit status, output tail) of a step; a step over its share of the 8-minute budget is stopped and
    reported (status 124), not raised."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout
        return 124, f"{output or ''}[stopped after {timeout} s]"[-4000:]
    return result.returncode, (result.stdout + result.stderr)[-4000:]


def gpu_test_files(folder: Path = TESTS) -> list[Path]:
    """The test files that hold `gpu`-marked tests: only these are collected, so the app's tests (streamlit,
    plotly) need not import on the GPU machine."""
    return sorted(path for path in folder.glob("test_*.py") if "mark.gpu" in path.read_text(encoding="utf-8"))


def run_tests(out: Path, timeout: int) -> dict:
    report = out / "gpu_tests.xml"
    started = time.perf_counter()
    status, tail = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                         *map(str, gpu_test_files()), f"--junitxml={report}"], timeout)
    summary = {"exit_status": status, "seconds": round(time.perf_counter() - started, 1), "output_tail": tail}
    if report.is_file():
        suite = ElementTree.parse(report).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        summary.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
    return summary


def bench_figures(results: dict) -> dict:
    """The two target numbers from a bench JSON: the fastest variant's 608 batch-1 latency and the best bf16
    throughput at 416 batch 64."""
    rows = results.get("forward", [])
    latency = [row["latency_ms"] for row in rows if row["size"] == 608 and row["batch"] == 1]
    throughput = [row["images_per_s"] for row in rows
                  if row["size"] == 416 and row["batch"] == 64 and "bf16" in row["variant"]]
    return {"latency_608_batch1_ms": min(latency) if latency else None,
            "throughput_416_batch64_bf16": max(throughput) if throughput else None}


def target_rows(figures: dict) -> list[dict]:
    rows = []
    for name, (relation, limit) in TARGETS.items():
        value = figures.get(name)
        met = None if value is None else (value < limit if relation == "<" else value >= limit)
        rows.append({"target": name, "measured": value, "limit": f"{relation} {limit:g}", "met": met})
    return rows


def markdown(record: dict) -> str:
    tests = record["tests"]
    lines = [f"GPU check on {record['device']} (torch {record['torch']}, CUDA {record['cuda']}), "
             f"{record['seconds']:.0f} s.", "",
             f"Tests (`pytest -m gpu`): {tests.get('tests', '?')} run, {tests.get('failures', '?')} failed, "
             f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped (exit {tests['exit_status']}).",
             "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for row in record.get("targets", []):
        measured = "n/a" if row["measured"] is None else f"{row['measured']:,.2f}"
        met = "n/a" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['target']} | {measured} | {row['limit']} | {met} |")
    if record.get("bench_table"):
        lines += ["", record["bench_table"]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=output_folder, default="runs/gpu_check")
    parser.add_argument("--skip-bench", action="store_true", help="only the tests")
    args = parser.parse_args(argv)
    problem = preflight()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "tests": run_tests(out, timeout=210)}
    if not args.skip_bench:
        bench_json = out / "bench_gpu.json"
        record["bench_exit_status"], record["bench_output_tail"] = _run(
            [sys.executable, "-m", "asff_viz.bench", *BENCH_ARGS, "--out", str(bench_json)], timeout=240)
        if bench_json.is_file():
            results = json.loads(bench_json.read_text())
            record["bench"] = bench_figures(results)
            record["targets"] = target_rows(record["bench"])
            table = bench_json.with_suffix(".md")
            record["bench_table"] = table.read_text() if table.is_file() else ""
    record["seconds"] = time.perf_counter() - started
    atomic_write_text(out / "gpu_check.json", json.dumps(record, indent=1, default=str) + "\n")
    atomic_write_text(out / "gpu_check.md", markdown(record))
    print(markdown(record))
    failed = (record["tests"]["exit_status"] != 0 or record.get("bench_exit_status", 0) != 0
              or any(row["met"] is False for row in record.get("targets", [])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
