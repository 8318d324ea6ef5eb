"""Splitting a predicted mask into instances, each with its own mask, score and box."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .results import SegmentationResult

INSTANCE_METHODS = ("necks", "components", "clusters")
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Instance:
    """One object of a predicted mask.

    Attributes
    ----------
    mask : np.ndarray
        ``(H, W)`` bool, a part of the result's mask; instances of one result are disjoint.
    lowres_mask : np.ndarray
        ``(h, w)`` bool, the instance's patches.
    score : float
        Mean debiased similarity of the instance's patches to the reference prototype, in [0, 1].
    box : tuple of float
        ``(x, y, width, height)`` of ``mask`` in pixels (COCO ``bbox``).
    """

    mask: np.ndarray
    lowres_mask: np.ndarray
    score: float
    box: tuple[float, float, float, float]


def instance_labels(
    lowres: np.ndarray, clusters: np.ndarray | None = None, method: str = "necks", min_patches: int = 1
) -> np.ndarray:
    """Label the instances of a feature-resolution mask.

    Parameters
    ----------
    lowres : np.ndarray
        ``(h, w)`` bool mask.
    clusters : np.ndarray or None
        ``(h, w)`` int cluster labels; needed by ``method="clusters"``.
    method : {"necks", "components", "clusters"}
        ``components``: 8-connected regions. ``clusters``: 8-connected regions of patches
        sharing a cluster label. ``necks``: 8-connected regions, each split where it holds
        several cores far from its border (touching convex objects meet at a narrow neck),
        every patch going to its nearest core.
    min_patches : int
        Regions with fewer patches are dropped.

    Returns
    -------
    np.ndarray
        ``(h, w)`` int32: 0 outside instances, ``1..n`` inside, numbered in raster order of
        their first patch.
    """
    if method not in INSTANCE_METHODS:
        raise ValueError(f"instance method must be one of {INSTANCE_METHODS}, got {method!r}")
    if min_patches < 1:
        raise ValueError(f"min_patches must be >= 1, got {min_patches}")
    if method == "clusters":
        if clusters is None:
            raise ValueError("method='clusters' needs the result's cluster labels")
        labels = np.zeros(lowres.shape, dtype=np.int64)
        for cluster in np.unique(clusters[lowres]):
            regions, _ = ndimage.label(lowres & (clusters == cluster), structure=_EIGHT_NEIGHBOURS)
            labels = np.where(regions > 0, regions + labels.max(), labels)
    else:
        labels, _ = ndimage.label(lowres, structure=_EIGHT_NEIGHBOURS)
        if method == "necks":
            labels = _split_at_necks(lowres, labels)
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < min_patches] = 0
    values, first = np.unique(labels.ravel(), return_index=True)
    order = values[np.argsort(first)]
    order = order[order > 0]
    renumbered = np.zeros(sizes.shape[0], dtype=np.int32)
    renumbered[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return renumbered[labels]


def _split_at_necks(mask: np.ndarray, regions: np.ndarray, core_ratio: float = 0.5) -> np.ndarray:
    """Split regions holding several cores, giving each pixel of such a region to its nearest core.

    A core is a connected part of a region farther from the background than ``core_ratio``
    times the region's largest distance to it; two objects meeting at a neck narrower than
    that keep separate cores.
    """
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    peak = np.asarray(ndimage.maximum(distance, regions, index=np.arange(regions.max() + 1)))
    cores, _ = ndimage.label(mask & (distance > core_ratio * peak[regions]), structure=_EIGHT_NEIGHBOURS)
    split = regions.copy()
    for region in range(1, regions.max() + 1):
        inside = regions == region
        region_cores = np.where(inside, cores, 0)
        if np.unique(region_cores).size <= 2:
            continue
        nearest = ndimage.distance_transform_edt(region_cores == 0, return_distances=False, return_indices=True)
        split[inside] = region_cores[nearest[0], nearest[1]][inside] + split.max()
    return split


def split_instances(
    result: SegmentationResult, method: str = "necks", min_patches: int = 1
) -> list[Instance]:
    """The instances of an engine result (see :func:`instance_labels` for the methods).

    Every pixel of ``result.mask`` goes to the instance of its nearest foreground patch, so the
    instance masks partition the result's mask, less the pixels nearest to a region dropped by
    ``min_patches`` (which belong to no instance: they neither stretch a kept instance's box nor
    add to its area).
    """
    labels = instance_labels(result.lowres_mask, result.clusters, method, min_patches)
    count = int(labels.max())
    if count == 0:
        return []
    dropped = count + 1  # the patches of regions below ``min_patches``: their pixels go to no instance
    seeds = np.where(result.lowres_mask & (labels == 0), dropped, labels)
    nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
    filled = seeds[nearest[0], nearest[1]]
    height, width = result.mask.shape
    rows = np.minimum(np.arange(height) * labels.shape[0] // height, labels.shape[0] - 1)
    cols = np.minimum(np.arange(width) * labels.shape[1] // width, labels.shape[1] - 1)
    full = np.where(result.mask, filled[rows[:, None], cols[None, :]], 0)
    full[full == dropped] = 0
    instances = []
    for index in range(1, count + 1):
        mask = full == index
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        patches = labels == index
        score = float(np.clip(result.similarity[patches].mean(), 0.0, 1.0))
        box = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
        instances.append(Instance(mask, patches, score, box))
    return instances
