"""asff_viz: YOLOv3-ASFF with introspection of its adaptively spatial feature fusion."""

from .checkpoint import CheckpointError, load_model
from .inference.detector import DetectionResult, Detector
from .introspection import Counterfactual, Trace, capture, trace_image
from .models import build_model
from .models.config import ModelConfig

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Counterfactual", "DetectionResult", "Detector", "ModelConfig", "Trace",
           "build_model", "capture", "load_model", "trace_image", "__version__"]
