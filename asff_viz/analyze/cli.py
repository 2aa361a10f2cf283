"""The command line: `python -m asff_viz.analyze <command> ... --out DIR`.

Commands: figure3, scale-stats, gradflow, evolution, compare (each with --help), and replot DIR, which re-draws a
scale-stats or gradflow run's figures from its saved statistics with no model. Every command writes its
figures as NAME.pdf + NAME.png (300 dpi) with the numbers behind them in NAME.csv, a run.json recording how to
regenerate them, and caches per-image model results under OUT/cache (or --cache), so that running the same
command again re-plots without re-running the model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..checkpoint import CheckpointError
from ..data.errors import DatasetError
from ..inference.transforms import ImageError
from ..introspection.trace import TraceError
from ..utils.allocator import keep_freed_memory
from ..utils.argtypes import describe_os_error
from . import compare, evolution, figure3, gradflow, replot, scale_stats
from .sources import AnalysisError

COMMANDS = (figure3, scale_stats, gradflow, evolution, compare, replot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None):
    """Run one analysis command; returns its `RunContext` (output folder, record, cache statistics)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--replot" in argv:  # `COMMAND --replot DIR`: the same as `replot DIR` (no other option is needed)
        position = argv.index("--replot")
        if position + 1 >= len(argv):
            build_parser().error("argument --replot: expected the folder of an earlier run")
        dpi = argv[argv.index("--png-dpi"):argv.index("--png-dpi") + 2] if "--png-dpi" in argv else []
        argv = ["replot", argv[position + 1], *dpi]
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    # Our own progress lines at INFO; other libraries (fontTools subsetting fonts into PDFs) stay quiet.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("asff_viz").setLevel(logging.INFO)
    try:
        return args.handler(args, argv)
    except (AnalysisError, CheckpointError, DatasetError, ImageError, TraceError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:  # a full disk or a folder made unwritable while the command ran
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        raise SystemExit(2) from None
