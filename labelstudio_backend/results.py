"""Segmentation results as Label Studio prediction JSON (brushlabels RLE regions).

Every label segmented gives a region, an empty mask included (no pixels, score 0), so that each
quality verdict is stored in the prediction's ``result`` as region meta text
(``insid3 quality: <verdict> (...)``), which the Data Manager's *Prediction results contains*
filter searches.
"""

from __future__ import annotations

import uuid

from .labelconfig import BrushTarget
from .rle import mask_to_rle

QUALITY_PREFIX = "insid3 quality: "


def region(target: BrushTarget, label: str, result) -> dict:
    """One ``brushlabels`` region for ``label`` with its score and its quality verdict as meta text.

    ``result.mask`` is ``(H, W)`` bool; an empty mask gives an empty region of score 0.
    """
    height, width = result.mask.shape
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(result.mask), "brushlabels": [label]},
        "score": region_score(result),
        "meta": {"text": [quality_text(result.quality.as_dict())]},
    }


def region_score(result) -> float:
    """The result's confidence rounded to 4 digits; 0 for an empty mask."""
    return round(float(result.score), 4) if result.mask.any() else 0.0


def quality_text(quality: dict) -> str:
    """A reviewer-readable, filterable line such as ``insid3 quality: ok (area_ratio 0.123, components 1, ...)``."""
    details = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in quality.items() if key != "verdict")
    return f"{QUALITY_PREFIX}{quality['verdict']} ({details})"


def prediction(target: BrushTarget, per_label: dict, model_version: str) -> dict:
    """The prediction of one task from its ``label -> SegmentationResult`` map.

    One region per label; the task's ``score`` is the mean of the region scores (0 when every
    mask is empty), so sorting by *Prediction score* puts empty and weak predictions first.
    """
    regions = [region(target, label, result) for label, result in per_label.items()]
    scores = [item["score"] for item in regions]
    return {
        "result": regions,
        "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
        "model_version": model_version,
    }
