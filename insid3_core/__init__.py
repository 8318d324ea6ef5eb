"""insid3_core: training-free segmentation by example with frozen DINOv3 features (INSID3)."""

from .backbone import TEST_CHECKPOINT, Backbone, BackboneError, load_backbone, random_backbone
from .config import EngineConfig
from .engine import Segmenter, merge_references
from .results import Prediction, References, ReferenceSet, SegmentationResult
from .io import InputError, load_image, load_mask
from .quality import QualityReport, QualityThresholds, quality_report

__version__ = "0.2.0"

__all__ = [
    "TEST_CHECKPOINT",
    "Backbone",
    "BackboneError",
    "EngineConfig",
    "InputError",
    "Prediction",
    "QualityReport",
    "QualityThresholds",
    "ReferenceSet",
    "References",
    "SegmentationResult",
    "Segmenter",
    "load_backbone",
    "load_image",
    "load_mask",
    "merge_references",
    "quality_report",
    "random_backbone",
]
