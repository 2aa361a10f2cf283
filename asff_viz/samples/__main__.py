"""`python -m asff_viz.samples`: re-render the bundled sample images and their annotations.

Without --out it writes nothing: it says whether this machine reproduces the bundled files byte for byte (exit
status 0) or which files differ (1). With --out DIR it writes the rendering there; files already in DIR are
replaced only with --overwrite, so the bundled samples are never replaced by accident.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2

from . import SAMPLES_DIR, generate_samples, render_samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asff_viz.samples", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", type=Path, help="folder to write the rendered images and annotations.json into")
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same name in --out")
    args = parser.parse_args(argv)
    rendered = render_samples()
    if args.out is None:
        differing = [name for name, data in rendered.items()
                     if not (SAMPLES_DIR / name).is_file() or (SAMPLES_DIR / name).read_bytes() != data]
        if not differing:
            print(f"this machine renders the {len(rendered)} bundled files of {SAMPLES_DIR} byte for byte")
            return 0
        print(f"{len(differing)} of {len(rendered)} files render differently here: {', '.join(differing)} "
              f"- nothing written (OpenCV {cv2.__version__} here; the bundled files are drawn by the pinned "
              "5.1.0, and other versions draw the letter glyphs differently)", file=sys.stderr)
        return 1
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    existing = [name for name in rendered if (args.out / name).exists()]
    if existing and not args.overwrite:
        parser.error(f"--out {args.out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    try:
        paths = generate_samples(args.out, rendered)
    except OSError as error:
        print(f"error: could not write into {args.out}: {error.strerror or error}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
