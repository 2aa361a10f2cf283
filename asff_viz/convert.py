"""Convert an official ASFF checkpoint (`module_list.*` keys) to the asff_viz checkpoint format.

    python -m asff_viz.convert OFFICIAL.pth OUT.pt [--class-names FILE] [--input-size N]

The family and variant (Darknet-53: ASFF, ASFF* with RFB, or the YOLOv3 baseline; MobileNetV2: with or without
ASFF), the class count and the width are read from the file's keys and shapes. The result loads with
`asff_viz.load_model(OUT.pt)` and gives bit-identical outputs. --class-names is a text file with one name per line
(blank lines ignored) or a JSON list; default: the 80 COCO names for 80-class models, else class_0, class_1, ...
--input-size defaults to the official test size: 608 (Darknet-53), 416 (MobileNetV2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import CheckpointError, convert_official
from .utils.argtypes import describe_os_error, input_size, output_file


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file (one per line, blank lines ignored) or a JSON list of strings."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the class-names file ({error}).") from None
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: not valid JSON ({error}); expected a list of class names.") from None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise CheckpointError(f"{path}: expected a JSON list of class-name strings.")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="official checkpoint (.pth, a state_dict with module_list.* keys)")
    parser.add_argument("destination", type=output_file, help="asff_viz checkpoint to write (.pt)")
    parser.add_argument("--class-names", default=None, help="text file, one class name per line (or a JSON list)")
    parser.add_argument("--input-size", type=input_size, default=None,
                        help="input size stored as the default (the official test size: 608, MobileNetV2 416)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Convert; returns the exit status (0 on success, 1 with a message on stderr otherwise)."""
    args = parse_args(argv)
    if Path(args.destination).resolve() == Path(args.source).resolve():
        print("error: the destination is the source file; write the converted checkpoint elsewhere.",
              file=sys.stderr)
        return 1
    try:
        class_names = read_class_names(args.class_names) if args.class_names else None
        metadata = convert_official(args.source, args.destination, class_names=class_names,
                                    input_size=args.input_size)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk or an unwritable folder: nothing was written (atomic save)
        print(f"error: {describe_os_error(error, args.destination)}", file=sys.stderr)
        return 1
    print(f"{args.source} -> {args.destination}: {metadata['variant']}, {len(metadata['class_names'])} classes, "
          f"input size {metadata['input_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
