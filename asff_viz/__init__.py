"""asff_viz: YOLOv3-ASFF with introspection of its adaptively spatial feature fusion."""

from .checkpoint import CheckpointError, load_model
from .config import ModelConfig
from .models import build_model

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ModelConfig", "build_model", "load_model", "__version__"]
