"""Looking inside YOLOv3-ASFF: fusion-weight capture and traces, gradient flow, captum attributions.

`capture` and `trace_image` are cheap and safe on a shared model; `gradflow` and `attribution` run backward
passes (`attribution` imports captum, so it is imported on use: `from asff_viz.introspection import
attribution`). Figures are drawn by `asff_viz.figures.traces` from the objects these return.
"""

from .capture import Counterfactual, Recorder, capture
from .decomposition import GradientFlow, compare_with_uniform, decompose_gradients, gradient_flow
from .objectives import DetectionScore, SumOfScores, TrainingLoss, ground_truth_labels
from .overhead import measure_capture_overhead
from .trace import DetectionRecord, Trace, TraceError, trace_image

__all__ = [
    "Counterfactual", "DetectionRecord", "DetectionScore", "GradientFlow", "Recorder", "SumOfScores", "Trace",
    "TraceError", "TrainingLoss", "capture", "compare_with_uniform", "decompose_gradients", "gradient_flow",
    "ground_truth_labels", "measure_capture_overhead", "trace_image",
]
