"""Analyses for papers: Figure 3, fusion statistics by scale, gradient flow over a dataset, training evolution,
comparisons. Run as `python -m asff_viz.analyze <command> --help`; see docs/analysis.md.

Modules: `statistics` (streaming accumulators and their math, pure numpy), `results_cache` (per-image results
on disk), `sources` (models, datasets), `provenance` (run.json), `runner` (what the commands share), one module
per command (`figure3`, `scale_stats`, `gradflow`, `evolution`, `compare`, `replot`), `cli`. The figures are
drawn by `asff_viz.figures.plots` in the style of `asff_viz.figures.style`.
"""

from ..ops.matching import match_to_ground_truth
from .cells import mean_weights_in_box
from .flow_statistics import GradientFlowStatistics
from .fusion_statistics import FusionStatistics

__all__ = ["FusionStatistics", "GradientFlowStatistics", "match_to_ground_truth", "mean_weights_in_box"]
