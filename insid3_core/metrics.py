"""Scores of predictions against ground truth: mask IoU, boundary F-score, keypoint PCK."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage


class BoundaryScore(NamedTuple):
    """Boundary agreement of a predicted mask with the truth (all in [0, 1])."""

    f: float
    precision: float
    recall: float


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two ``(H, W)`` bool masks; 1.0 when both are empty."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def same_partition(first, second) -> bool:
    """Whether two labellings of the same items (``(N,)`` integer labels: arrays, tensors or lists)
    group them identically, whatever the label numbers."""
    first, second = np.asarray(first).ravel().tolist(), np.asarray(second).ravel().tolist()
    pairs = set(zip(first, second))
    return len(first) == len(second) and len(pairs) == len(set(first)) == len(set(second))


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-connected background neighbour, ``(H, W)`` bool.

    Outside the image counts as foreground, so the image border is not an object boundary.
    """
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=1)


def default_tolerance(shape: tuple[int, int]) -> float:
    """DAVIS's boundary tolerance: ``ceil(0.008 * image diagonal)`` pixels."""
    return float(math.ceil(0.008 * math.hypot(*shape)))


def boundary_f_score(predicted: np.ndarray, truth: np.ndarray, tolerance: float | None = None) -> BoundaryScore:
    """Boundary precision, recall and F-measure within a pixel tolerance (DAVIS / BSDS style).

    A boundary pixel (see :func:`mask_boundary`) of the prediction is correct when a truth
    boundary pixel lies within ``tolerance`` pixels (Euclidean distance, i.e. a disk of that
    radius), and the other way round for recall; ``F = 2PR / (P + R)``. Both boundaries empty
    gives 1; only one empty gives F = 0 (precision 1 for an empty prediction, recall 1 for an
    empty truth).

    Parameters
    ----------
    predicted, truth : np.ndarray
        ``(H, W)`` bool masks.
    tolerance : float or None
        Pixels; ``None`` uses :func:`default_tolerance` of the mask's size.
    """
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {predicted.shape} and {truth.shape}")
    tolerance = default_tolerance(truth.shape) if tolerance is None else tolerance
    predicted_edge, true_edge = mask_boundary(predicted), mask_boundary(truth)
    if not predicted_edge.any() or not true_edge.any():
        both_empty = not predicted_edge.any() and not true_edge.any()
        return BoundaryScore(float(both_empty), float(not predicted_edge.any()), float(not true_edge.any()))
    precision = float((ndimage.distance_transform_edt(~true_edge)[predicted_edge] <= tolerance).mean())
    recall = float((ndimage.distance_transform_edt(~predicted_edge)[true_edge] <= tolerance).mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return BoundaryScore(f, precision, recall)


def pck(predicted: np.ndarray, truth: np.ndarray, extent: float | np.ndarray, alpha: float = 0.1) -> float:
    """Percentage of correct keypoints: the share of points within ``alpha * extent`` of the truth.

    Parameters
    ----------
    predicted, truth : np.ndarray
        ``(P, 2)`` ``(x, y)`` in pixels.
    extent : float or np.ndarray
        Scalar or ``(P,)`` reference lengths: ``max(H, W)`` of the image (PF-PASCAL style) or
        of the object's bounding box (SPair-71k style).
    alpha : float

    Returns
    -------
    float
        In [0, 1].
    """
    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 2 or predicted.shape[1] != 2:
        raise ValueError(f"expected two (P, 2) arrays of points, got {predicted.shape} and {truth.shape}")
    if not len(truth):
        raise ValueError("pck needs at least one point")
    distances = np.linalg.norm(predicted - truth, axis=1)
    return float((distances <= alpha * np.asarray(extent, dtype=np.float64)).mean())
