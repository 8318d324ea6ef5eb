"""Interactive pre-annotation ("paint one, get all"): the region an annotator drew on a task is a
reference from that very image, and the answer is every other instance of the concept in it.

Label Studio sends it as a ``/predict`` request for one task whose ``params.context.result``
holds the annotator's regions (brush, bitmask or polygon of the project's control, or keypoints:
a keypoint stands for a disk of :data:`KEYPOINT_RADIUS` of the image's longer side). Each label
with a region is segmented from it alone; the mask is split into instances and those the
annotator already drew (see :func:`other_instances`) are left out.
"""

from __future__ import annotations

import numpy as np

from .budget import Lease
from .errors import BackendError
from .labelconfig import RegionTarget
from .regions import annotation_masks

KEYPOINT_RADIUS = 1 / 64
"""Radius of the disk a keypoint stands for, as a share of the image's longer side."""
MAX_DRAWN_REGIONS = 1000
"""Most regions and keypoints one interactive request may hold."""
DRAWN_SHARE = 0.5
"""An instance and a drawn part sharing more than this share of the smaller one: drawn already."""


def context_regions(context) -> list[dict]:
    """The annotator's regions of a ``/predict`` request's ``params.context`` (``[]`` when none)."""
    results = context.get("result") if isinstance(context, dict) else None
    return [item for item in results if isinstance(item, dict)] if isinstance(results, list) else []


def drawn_masks(regions: list[dict], target: RegionTarget, size: tuple[int, int], max_pixels: int,
                lease: Lease | None = None) -> dict[str, np.ndarray]:
    """``label -> (H, W) bool`` of the drawn regions of ``target``'s labels; keypoints as disks.

    At most :data:`MAX_DRAWN_REGIONS` regions; each label's mask is counted in ``lease``.
    """
    if len(regions) > MAX_DRAWN_REGIONS:
        raise BackendError(f"the context holds {len(regions)} regions, more than the {MAX_DRAWN_REGIONS} "
                           "one interactive request may draw", 413)
    height, width = size
    masks = annotation_masks({"id": "context", "result": regions}, target, max_pixels, lease, size)
    for item in regions:
        value = item.get("value")
        if item.get("type") != "keypointlabels" or not isinstance(value, dict):
            continue
        labels = target.own_labels(value.get("keypointlabels"))
        if not labels:
            continue
        rows, columns, disk = keypoint_disk(value, height, width)
        for label in labels:
            if label not in masks:
                if lease is not None:
                    lease.take(height * width, f"the mask of {label[:40]!r}")
                masks[label] = np.zeros((height, width), dtype=bool)
            masks[label][rows, columns] |= disk
    return {label: mask for label, mask in masks.items() if mask.any()}


def keypoint_disk(value: dict, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """Where the disk a keypoint value (``x``, ``y`` in percent) stands for lies in an ``(H, W)``
    image: its rows and columns, and the bool disk within them."""
    import math

    try:
        x, y = float(value["x"]) / 100 * width, float(value["y"]) / 100 * height
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise BackendError(f"a keypoint of the context has no x/y percentages ({err})", 422) from None
    if not (0 <= x <= width and 0 <= y <= height):
        raise BackendError(f"a keypoint of the context lies outside its image ({str(value.get('x'))[:40]}%, "
                           f"{str(value.get('y'))[:40]}%)", 422)
    radius = max(1.0, KEYPOINT_RADIUS * max(height, width))
    top, left = max(0, math.floor(y - radius)), max(0, math.floor(x - radius))
    bottom, right = min(height, math.ceil(y + radius) + 1), min(width, math.ceil(x + radius) + 1)
    ys, xs = np.mgrid[top:bottom, left:right]
    return slice(top, bottom), slice(left, right), (xs + 0.5 - x) ** 2 + (ys + 0.5 - y) ** 2 <= radius**2


def other_instances(result, drawn: np.ndarray, method: str, min_patches: int) -> list:
    """The instances of ``result`` (``SegmentationResult``) not drawn already (``drawn``: ``(H, W)``
    bool): an instance is drawn when, with one drawn part (a brushed region, a keypoint's disk),
    more than :data:`DRAWN_SHARE` of the smaller of the two lies in the other."""
    from scipy import ndimage

    from insid3_core.instances import split_instances

    parts, count = ndimage.label(drawn)
    sizes = np.bincount(parts.ravel(), minlength=count + 1)
    others = []
    for instance in split_instances(result, method, min_patches):
        overlaps = np.bincount(parts[instance.mask], minlength=count + 1)[1:]
        smaller = np.minimum(sizes[1:], instance.mask.sum())
        if not (overlaps > DRAWN_SHARE * smaller).any():
            others.append(instance)
    return others
