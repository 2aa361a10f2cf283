"""Analyses for papers: Figure 3, fusion statistics by scale, gradient flow over a dataset, training evolution,
comparisons. Run as `python -m asff_viz.analyze <command> --help`; see docs/analysis.md.

Modules: `statistics` (streaming accumulators and their math, pure numpy), `plots` (figures), `style` (the
publication style and `save_figure`), `cache` (per-image results on disk), `inputs` (models, datasets),
`provenance` (run.json), one module per command, `cli`.
"""

from .statistics import FusionStatistics, GradientFlowStatistics, match_detections, mean_weights_in_box

__all__ = ["FusionStatistics", "GradientFlowStatistics", "match_detections", "mean_weights_in_box"]
