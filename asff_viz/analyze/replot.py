"""`replot DIR`: re-draw the figures of an earlier analysis run (any command) from what it saved beside them
(traces, scale_stats.npz, gradflow_statistics.npz, evolution_checkpoint_*.npz, compare_variant_*.npz and
compare_shown.npz, and run.json), with no checkpoint and no model. `python -m asff_viz.analyze COMMAND --replot
DIR` is the same. (compare_detections reads its few images again from their recorded paths.)

    python -m asff_viz.analyze replot runs/analysis/gradflow [--png-dpi 600]

The figures and tables are rewritten in DIR with the run's own settings (thresholds, bootstrap resamples, seed);
run.json keeps its record and gains a `replots` entry.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from ..utils.argtypes import positive_int
from ..utils.fileio import atomic_write_text
from .sources import AnalysisError

REPLOTTABLE = {"scale-stats": "scale_stats.npz", "gradflow": "gradflow_statistics.npz", "figure3": None,
               "evolution": None, "compare": "compare_shown.npz"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("replot", help="re-draw an analysis run's figures from its files, no model",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="the --out folder of the earlier run")
    parser.add_argument("--png-dpi", type=positive_int, default=None, help="resolution (default: the run's)")
    parser.add_argument("--no-progress", action="store_true", help="accepted like the other commands' (no bar here)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, argv=None):
    from .runner import RunContext

    directory = Path(args.directory)
    record_path = directory / "run.json"
    if not record_path.is_file():
        raise AnalysisError(f"{directory}: no run.json; pass the --out folder of a scale-stats or gradflow run.")
    try:
        record = json.loads(record_path.read_text())
        command = record["command"]
        arguments = dict(record["arguments"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AnalysisError(f"{record_path}: not a run.json of asff_viz.analyze ({error}).") from None
    if command not in REPLOTTABLE:
        raise AnalysisError(f"{directory}: a {command!r} run; replot reads the runs of figure3, scale-stats, "
                            "gradflow, evolution and compare.")
    data_path = directory / (REPLOTTABLE[command] or "run.json")
    if not data_path.is_file():
        raise AnalysisError(f"{data_path}: missing; it is written by {command} runs of this version.")
    arguments.update(out=str(directory), no_cache=True, cache=None, device="cpu", no_progress=True)
    if args.png_dpi is not None:
        arguments["png_dpi"] = args.png_dpi
    namespace = argparse.Namespace(**arguments)
    context = RunContext(command, namespace, argv)
    if command == "figure3":
        from ..introspection.trace import Trace
        from .figure3 import draw

        names = record.get("names")
        files = record.get("traces")
        if not names or not files:
            raise AnalysisError(f"{record_path}: a figure3 run from before traces were saved; run it again.")
        suffix = files[0][len(f"figure3_{names[0]}"):-len(".trace.npz")]
        draw(context, [Trace.load(directory / name) for name in files], names, suffix)
    elif command == "compare":
        from .compare import draw, load_shown
        from .fusion_statistics import FusionStatistics

        labels = record["labels"]
        statistics = [FusionStatistics.load(directory / f"compare_variant_{i}.npz") for i in range(len(labels))]
        draw(context, labels, record["metrics"], statistics, record["paired"], record["has_fusion_weights"],
             load_shown(data_path, len(labels)), record["class_names"])
    elif command == "evolution":
        from .evolution import draw_checkpoints, draw_run
        from .fusion_statistics import FusionStatistics

        points = [(float(point["epoch"]), point["checkpoint"],
                   FusionStatistics.load(directory / point["statistics"]).by_coco_size())
                  for point in record.get("checkpoint_points", [])]
        if points:
            draw_checkpoints(context, points, bool(record.get("x_is_epoch", True)))
        if record.get("training_run"):  # the run's logs are data: read again from where they were
            draw_run(context, Path(record["training_run"]))
    elif command == "scale-stats":
        from .fusion_statistics import FusionStatistics
        from .scale_stats import write_figures

        write_figures(context, FusionStatistics.load(data_path), min_count=int(arguments.get("min_count", 5)))
    else:
        from .flow_statistics import GradientFlowStatistics
        from .gradflow import write_figures

        write_figures(context, GradientFlowStatistics.load(data_path), samples=int(arguments.get("bootstrap", 1000)))
    replots = list(record.get("replots", []))
    replots.append({"command_line": "python -m asff_viz.analyze " + shlex.join(sys.argv[1:] if argv is None
                                                                                 else argv),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": context.record.data["code"],
                    "outputs": sorted({str(Path(p).name) for p in context.record.data["outputs"]})})
    atomic_write_text(record_path, json.dumps({**record, "replots": replots}, indent=2) + "\n")
    return context
