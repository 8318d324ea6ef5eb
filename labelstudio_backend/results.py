"""Segmentation results as Label Studio prediction JSON, in the project's region type.

Every label segmented gives a region (brush or bitmask: an empty mask too, with no pixels and
score 0), so that each quality verdict is stored in the prediction's ``result`` as region meta
text (``insid3 quality: <verdict> (...)``), which the Data Manager's *Prediction results
contains* filter searches. Polygons give one region per connected part (none for an empty
mask: :func:`verdict_fields` gives such a label the ``empty`` verdict). With instances on, a label gives one region per instance instead, each with the label's
verdict.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import numpy as np

from .labelconfig import RegionTarget
from .regions import mask_values

QUALITY_PREFIX = "insid3 quality: "


def regions(target: RegionTarget, label: str, mask: np.ndarray, score: float, quality: dict,
            tolerance: float = 1.0) -> list[dict]:
    """The regions showing ``mask`` (``(H, W)`` bool) as ``label`` in ``target``'s type, with the
    ``score`` and the quality verdict ``quality`` (``QualityReport.as_dict()``) as meta text;
    ``tolerance``: polygon simplification in pixels."""
    height, width = mask.shape
    return [{
        "id": uuid.uuid4().hex[:10],
        "from_name": target.from_name,
        "to_name": target.to_name,
        "type": target.kind,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": score,
        "meta": {"text": [quality_text(quality)]},
    } for value in mask_values(target.kind, label, mask, tolerance)]


def label_regions(target: RegionTarget, label: str, result, instances: list | None = None,
                  tolerance: float = 1.0) -> list[dict]:
    """The regions of one label's ``SegmentationResult``, each carrying the label's verdict.

    Parameters
    ----------
    target : RegionTarget
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
        return regions(target, label, result.mask, region_score(result), quality, tolerance)
    if not instances:
        return regions(target, label, np.zeros_like(result.mask), 0.0, quality, tolerance)
    return [item for instance in instances
            for item in regions(target, label, instance.mask, round(float(instance.score), 4), quality, tolerance)]


def region_score(result) -> float:
    """The result's confidence rounded to 4 digits; 0 for an empty mask."""
    return round(float(result.score), 4) if result.mask.any() else 0.0


def quality_text(quality: dict) -> str:
    """A reviewer-readable, filterable line such as ``insid3 quality: ok (area_ratio 0.123, components 1, ...)``."""
    details = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in quality.items() if key != "verdict")
    return f"{QUALITY_PREFIX}{quality['verdict']} ({details})"


def prediction(target: RegionTarget, per_label: dict, model_version: str,
               split: Callable[[str, object], list | None] | None = None, tolerance: float = 1.0) -> dict:
    """The prediction of one task from its ``label -> SegmentationResult`` map.

    One region per label, or per instance when ``split`` (a label and its ``SegmentationResult``
    to the instances, ``None`` for a whole region) is given. The task's ``score`` is the mean of the
    labels' :func:`region_score` (0 when every mask is empty), however many instances each
    label has, so sorting by *Prediction score* puts empty and weak predictions first.
    ``tolerance``: polygon simplification in pixels.
    """
    found = [item for label, result in per_label.items()
             for item in label_regions(target, label, result, split(label, result) if split else None, tolerance)]
    scores = [region_score(result) for result in per_label.values()]
    return {
        "result": found,
        "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
        "model_version": model_version,
    }


VERDICT_FIELDS = ("insid3_verdict", "insid3_verdicts", "insid3_score", "insid3_model_version")
"""Task data fields the Data Manager shows as sortable, filterable columns (set by ``preannotate``)."""


def verdict_fields(prediction: dict, labels: Sequence[str] = ()) -> dict:
    """A prediction's verdicts as task data fields (:data:`VERDICT_FIELDS`): ``insid3_verdict`` is
    ``ok`` or the failures found (e.g. ``empty, too_small``), ``insid3_verdicts`` each label's, with
    the prediction's score and model version. ``labels``: those segmented; one with no region in
    the prediction (an empty polygon mask gives none) is ``empty``."""
    from insid3_core.quality import VERDICTS

    per_label = {}
    for region in prediction["result"]:
        text = (region.get("meta") or {}).get("text") or [""]
        named = region["value"].get(region["type"]) or []
        if text[0].startswith(QUALITY_PREFIX) and named:
            per_label[named[0]] = text[0][len(QUALITY_PREFIX):].split(" ", 1)[0]
    per_label = {**{label: per_label.get(label, "empty") for label in labels}, **per_label}
    failures = sorted({verdict for verdict in per_label.values() if verdict != "ok"}, key=VERDICTS.index)
    return {
        "insid3_verdict": ", ".join(failures) or ("ok" if per_label else "empty"),
        "insid3_verdicts": ", ".join(f"{label}: {verdict}" for label, verdict in per_label.items()),
        "insid3_score": prediction["score"],
        "insid3_model_version": prediction["model_version"],
    }
