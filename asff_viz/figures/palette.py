"""The one palette of every figure, the app and `detect`: colours for classes, source levels, categories and
outcomes (Okabe & Ito's, which stay apart under the common colour-vision deficiencies) and the colormaps."""

from __future__ import annotations

import matplotlib.colors as mcolors

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
    "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7",
    "grey": "#999999",
}
# Detected and ground-truth classes, cycling.
CLASS_COLORS = tuple(OKABE_ITO[name] for name in ("orange", "sky_blue", "bluish_green", "yellow", "blue",
                                                  "vermillion", "reddish_purple", "grey"))
# The three source levels: vermillion, black, blue. They stay apart, and apart from the white of "uniform" in the
# dominant-source maps, under deuteranopia, protanopia and tritanopia (simulated, Machado et al. 2009); Okabe-Ito's
# bluish green, used before for stride 16, turned grey (chroma 7) under deuteranopia.
SOURCE_COLORS = (OKABE_ITO["vermillion"], OKABE_ITO["black"], OKABE_ITO["blue"])
# Categories of a chart (models, modes, controls).
CATEGORY_COLORS = (OKABE_ITO["blue"], OKABE_ITO["orange"], OKABE_ITO["reddish_purple"], OKABE_ITO["bluish_green"],
                   OKABE_ITO["vermillion"], OKABE_ITO["sky_blue"], OKABE_ITO["yellow"], OKABE_ITO["black"])
OUTCOME_COLORS = {"true positive": OKABE_ITO["bluish_green"], "missed": OKABE_ITO["vermillion"],
                  "false positive": OKABE_ITO["sky_blue"]}

WEIGHT_CMAP = "viridis"  # fusion weights: probabilities, on the fixed scale 0..1
MAGNITUDE_CMAP = "cividis"  # magnitudes without a natural maximum (gradient norms)
ENTROPY_CMAP = "magma"
CONFLICT_CMAP = "magma"
SIGNED_CMAP = "RdBu_r"


def class_color(label: int) -> str:
    """The colour of class index `label` (cycling through the palette)."""
    return CLASS_COLORS[int(label) % len(CLASS_COLORS)]


def class_rgb(label: int) -> tuple[int, int, int]:
    """`class_color(label)` as 8-bit RGB (for drawing with OpenCV)."""
    return tuple(round(255 * value) for value in mcolors.to_rgb(class_color(label)))


def category_color(index: int) -> str:
    return CATEGORY_COLORS[int(index) % len(CATEGORY_COLORS)]


def label_text_color(color: str) -> str:
    """Black or white, whichever reads better on `color` (by its luminance)."""
    red, green, blue = mcolors.to_rgb(color)
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.55 else "white"
