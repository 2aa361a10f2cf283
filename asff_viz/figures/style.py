"""One publication style for every analysis figure, and the one way figures (plus their data) are written.

Figures are sized for a two-column paper: `COLUMN_WIDTH` (3.5 in, one column) or `DOUBLE_WIDTH` (7.16 in,
both columns), with 7 pt text, so that they are readable printed at 100 % without rescaling. Colours:

* categories use the Okabe-Ito palette, which stays distinguishable under the common colour-vision
  deficiencies; source levels keep one colour everywhere (`SOURCE_COLORS`: stride 32 vermillion, stride 16
  bluish green, stride 8 blue, the order of the RGB composite's red, green and blue);
* fusion weights are probabilities: `WEIGHT_CMAP` (viridis, perceptually uniform) on the fixed scale 0..1;
* magnitudes without a natural maximum (gradient norms) use cividis.

`save_figure` writes NAME.pdf (vector, fonts embedded as TrueType so that text stays editable), NAME.png
(300 dpi) and NAME.csv (the numbers drawn), and the PDF carries no creation date, so that regenerating a figure
from the same data gives the same file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from ..analyze.fusion_statistics import LEVEL_LABELS
from ..utils.fileio import atomic_write, atomic_write_text

COLUMN_WIDTH = 3.5  # inches: one column of a two-column paper (IEEE / CVF)
DOUBLE_WIDTH = 7.16  # inches: the full text width
PNG_DPI = 300

SHORT_LEVEL_LABELS = ("s32", "s16", "s8")

STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 7.0,
    "axes.titlesize": 7.0,
    "axes.labelsize": 7.0,
    "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "legend.fontsize": 6.5,
    "legend.title_fontsize": 6.5,
    "figure.titlesize": 7.5,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "lines.linewidth": 1.0,
    "lines.markersize": 3.0,
    "patch.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": PNG_DPI,
    "pdf.fonttype": 42,  # TrueType: text stays text in the PDF (editable, searchable)
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "image.interpolation": "nearest",
}


@contextlib.contextmanager
def publication_style() -> Iterator[None]:
    """matplotlib rc parameters of the style, for building and saving figures (restored afterwards)."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float = COLUMN_WIDTH, height: float | None = None, **kwargs) -> Figure:
    """A pyplot-free Figure in the style (call inside `publication_style()`); height default width / 1.6."""
    return Figure(figsize=(width, height if height is not None else width / 1.6), layout="constrained", **kwargs)


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Rows of dicts -> CSV (columns: `columns`, else the union of keys in first-seen order). NaN -> empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row.get(key)) for key in columns})
    atomic_write_text(path, handle.getvalue())
    return path


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if value is None:
        return ""
    return value


def save_figure(figure: Figure, directory: str | os.PathLike, name: str, rows: Sequence[dict] | None = None,
                columns: Sequence[str] | None = None, png_dpi: int = PNG_DPI) -> list[Path]:
    """Write DIRECTORY/NAME.pdf, NAME.png (300 dpi) and, with `rows`, NAME.csv. Returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    with publication_style():
        pdf = directory / f"{name}.pdf"
        atomic_write(pdf, lambda stream: figure.savefig(stream, format="pdf", metadata={
            "Creator": "asff_viz.analyze", "CreationDate": None}))
        png = directory / f"{name}.png"
        atomic_write(png, lambda stream: figure.savefig(stream, format="png", dpi=png_dpi,
                                                        metadata={"Software": "asff_viz.analyze"}))
        paths += [pdf, png]
    if rows is not None:
        paths.append(write_csv(directory / f"{name}.csv", rows, columns))
    return paths


__all__ = ["COLUMN_WIDTH", "DOUBLE_WIDTH", "LEVEL_LABELS", "PNG_DPI", "SHORT_LEVEL_LABELS", "STYLE", "new_figure",
           "publication_style", "save_figure", "write_csv"]
