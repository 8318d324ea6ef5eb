"""Segmentation results as Label Studio prediction JSON (brushlabels RLE regions).

Every label segmented gives a region, an empty mask included (no pixels, score 0), so that each
quality verdict is stored in the prediction's ``result`` as region meta text
(``insid3 quality: <verdict> (...)``), which the Data Manager's *Prediction results contains*
filter searches. With instances on, a label gives one region per instance instead, each with the
label's verdict.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import numpy as np

from .labelconfig import BrushTarget
from .rle import mask_to_rle

QUALITY_PREFIX = "insid3 quality: "


def region(target: BrushTarget, label: str, mask: np.ndarray, score: float, quality: dict) -> dict:
    """One ``brushlabels`` region painting ``mask`` (``(H, W)`` bool) with ``label``, its ``score``
    and the quality verdict ``quality`` (``QualityReport.as_dict()``) as meta text."""
    height, width = mask.shape
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
        "score": score,
        "meta": {"text": [quality_text(quality)]},
    }


def label_regions(target: BrushTarget, label: str, result, instances: list | None = None) -> list[dict]:
    """The regions of one label's ``SegmentationResult``, each carrying the label's verdict.

    Parameters
    ----------
    target : BrushTarget
    label : str
    result : insid3_core.SegmentationResult
        ``result.mask`` is ``(H, W)`` bool.
    instances : list of insid3_core.instances.Instance, or None
        ``None``: one region of the whole mask, scored :func:`region_score`. A list: one region
        per instance, scored by the instance; an empty list (nothing left to split) gives one
        empty region of score 0.
    """
    quality = result.quality.as_dict()
    if instances is None:
        return [region(target, label, result.mask, region_score(result), quality)]
    if not instances:
        return [region(target, label, np.zeros_like(result.mask), 0.0, quality)]
    return [region(target, label, instance.mask, round(float(instance.score), 4), quality) for instance in instances]


def region_score(result) -> float:
    """The result's confidence rounded to 4 digits; 0 for an empty mask."""
    return round(float(result.score), 4) if result.mask.any() else 0.0


def quality_text(quality: dict) -> str:
    """A reviewer-readable, filterable line such as ``insid3 quality: ok (area_ratio 0.123, components 1, ...)``."""
    details = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in quality.items() if key != "verdict")
    return f"{QUALITY_PREFIX}{quality['verdict']} ({details})"


def prediction(target: BrushTarget, per_label: dict, model_version: str,
               split: Callable[[object], list | None] | None = None) -> dict:
    """The prediction of one task from its ``label -> SegmentationResult`` map.

    One region per label, or per instance when ``split`` (a ``SegmentationResult`` to its
    instances, ``None`` for a whole region) is given. The task's ``score`` is the mean of the
    labels' :func:`region_score` (0 when every mask is empty), however many instances each
    label has, so sorting by *Prediction score* puts empty and weak predictions first.
    """
    regions = [item for label, result in per_label.items()
               for item in label_regions(target, label, result, split(result) if split else None)]
    scores = [region_score(result) for result in per_label.values()]
    return {
        "result": regions,
        "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
        "model_version": model_version,
    }
