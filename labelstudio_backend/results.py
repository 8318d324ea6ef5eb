"""Segmentation results as Label Studio prediction JSON (brushlabels RLE regions)."""

from __future__ import annotations

import uuid

from .labelconfig import BrushTarget
from .rle import mask_to_rle


def region(target: BrushTarget, label: str, result) -> dict:
    """One ``brushlabels`` region for ``label``; its quality verdict is shown as region meta text."""
    height, width = result.mask.shape
    quality = result.quality.as_dict()
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(result.mask), "brushlabels": [label]},
        "score": round(float(result.score), 4),
        "meta": {"text": [quality_text(quality)]},
    }


def quality_text(quality: dict) -> str:
    """A reviewer-readable line such as ``insid3 quality: ok (area 12.3%, 1 component)``."""
    details = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in quality.items() if key != "verdict")
    return f"insid3 quality: {quality['verdict']} ({details})"


def prediction(target: BrushTarget, per_label: dict, model_version: str) -> dict:
    """The prediction of one task from its ``label -> SegmentationResult`` map.

    Empty masks give no region; the task's ``score`` is the mean over labels (0 when none).
    """
    regions = [region(target, label, result) for label, result in per_label.items() if result.mask.any()]
    scores = [float(result.score) for result in per_label.values()]
    return {
        "result": regions,
        "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
        "model_version": model_version,
    }
