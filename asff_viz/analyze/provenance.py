"""run.json: everything needed to regenerate an analysis's figures exactly.

It records the full command line, the parsed arguments, each checkpoint (path and sha256), the dataset
(annotation file and its sha256, image folder, the images used, each with its sha256), the pre-processing and
thresholds, the seed, the device and the library versions, and the files written.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from ..inference.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..utils.codeversion import code_identity
from ..utils.fileio import atomic_write_text


def library_versions() -> dict:
    import cv2
    import matplotlib
    import numpy
    import torch

    from .. import __version__

    versions = {"asff_viz": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__, "matplotlib": matplotlib.__version__, "opencv": cv2.__version__}
    try:
        from importlib.metadata import version

        versions["pycocotools"] = version("pycocotools")
    except Exception:  # metadata may be absent in unusual installs; the record is still useful without it
        versions["pycocotools"] = None
    return versions


def preprocessing_record(size: int) -> dict:
    return {"input_size": int(size), "resize": "plain square resize (cv2 INTER_LINEAR), no letterbox",
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": "1/255"},
            "channel_order": "RGB"}


class RunRecord:
    """Collects the provenance of one analysis run and writes OUT/run.json."""

    def __init__(self, command: str, arguments: dict, argv: list[str] | None = None) -> None:
        argv = list(sys.argv[1:] if argv is None else argv)
        self.started = time.time()
        self.data: dict = {
            "command": command,
            "command_line": "python -m asff_viz.analyze " + shlex.join(argv),
            "arguments": {key: _plain(value) for key, value in arguments.items() if key != "handler"},
            "checkpoints": [],
            "dataset": None,
            "images": [],
            "preprocessing": None,
            "seed": arguments.get("seed"),
            "device": None,
            "versions": library_versions(),
            # The commit and whether the tree had uncommitted changes: `asff_viz 0.1.0` alone names no code.
            "code": code_identity(),
            "platform": platform.platform(),
            "outputs": [],
        }

    def add_checkpoint(self, entry: dict) -> None:
        self.data["checkpoints"].append(entry)

    def add_image(self, path: str | os.PathLike, sha256: str, **extra) -> None:
        self.data["images"].append({"file": str(path), "sha256": sha256, **extra})

    def add_outputs(self, paths) -> None:
        self.data["outputs"].extend(str(p) for p in paths)

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = _plain(value)

    def write(self, out_dir: str | os.PathLike) -> Path:
        out_dir = Path(out_dir)
        self.data["elapsed_seconds"] = round(time.time() - self.started, 3)
        outputs = sorted({str(Path(p).relative_to(out_dir)) if Path(p).is_relative_to(out_dir) else str(p)
                          for p in self.data["outputs"]})
        self.data["outputs"] = outputs
        path = out_dir / "run.json"
        atomic_write_text(path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        return path


def _plain(value):
    """argparse values -> JSON-ready (paths as strings, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


__all__ = ["RunRecord", "library_versions", "preprocessing_record"]
