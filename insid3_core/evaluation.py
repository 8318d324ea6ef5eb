"""Running few-shot episodes and scoring them as the few-shot segmentation papers do.

Per class, intersections and unions of the foreground are summed over all the class's queries of
a fold; the class IoU is their ratio and a fold's mIoU the mean over its classes. FB-IoU is the
mean of the foreground and background IoU, each summed over all queries of the fold. Results
over several folds are the mean of the per-fold numbers (HSNet's protocol; a ratio with a zero
union counts as 0, as there).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .config import BATCH_SIZE
from .datasets import Episode, Sample
from .engine import Segmenter
from .io import InputError, load_image, reference_mask


@dataclass(frozen=True)
class QueryOutcome:
    """One query of one episode, predicted and compared with its truth.

    Attributes
    ----------
    episode : Episode
    query : Sample
    prediction : np.ndarray
        ``(H, W)`` bool.
    truth : np.ndarray
        ``(H, W)`` bool.
    counts : np.ndarray
        ``(2, 2)`` int64, see :func:`iou_counts`.
    score : float
        The engine's confidence.
    """

    episode: Episode
    query: Sample
    prediction: np.ndarray
    truth: np.ndarray
    counts: np.ndarray
    score: float


def iou_counts(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Intersection and union of background and foreground.

    Parameters
    ----------
    prediction, truth : np.ndarray
        ``(H, W)`` bool.

    Returns
    -------
    np.ndarray
        ``(2, 2)`` int64: rows background, foreground; columns intersection, union.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    foreground = np.count_nonzero(prediction & truth), np.count_nonzero(prediction | truth)
    background = truth.size - foreground[1], truth.size - foreground[0]
    return np.array([background, foreground], dtype=np.int64)


def ratio(intersection: int, union: int) -> float:
    """``intersection / union``, 0 for an empty union."""
    return float(intersection) / max(int(union), 1)


def run_episodes(
    segmenter: Segmenter, episodes: Iterable[Episode], batch_size: int = BATCH_SIZE, workers: int | None = None
) -> Iterator[QueryOutcome]:
    """Encode each episode's references once and segment its queries in batches of ``batch_size``.

    Raises :class:`InputError` naming the file when a support's mask is empty or differs in size
    from its image, or a query's truth mask does.
    """
    for episode in episodes:
        references = segmenter.encode({episode.label: [support_pair(support) for support in episode.supports]})
        results = segmenter.segment(references, [query.image for query in episode.queries], batch_size, workers)
        for query, result in zip(episode.queries, results):
            truth = query.mask()
            if truth.shape != result.mask.shape:
                raise InputError(f"{query.source}: mask is {truth.shape[1]}x{truth.shape[0]} but its image "
                                 f"{query.image} is {result.mask.shape[1]}x{result.mask.shape[0]} (width x height)")
            yield QueryOutcome(episode, query, result.mask, truth, iou_counts(result.mask, truth), result.score)


def support_pair(support: Sample) -> tuple[Image.Image, np.ndarray]:
    """A support's decoded image and ``(H, W)`` bool mask, checked as the engine checks references
    but named by where the mask comes from (given an array, the engine could name only the image)."""
    image = load_image(support.image)
    return image, reference_mask(support.source, image, support.mask())


def summarise(entries: Iterable[tuple[int, str, np.ndarray]]) -> dict:
    """mIoU and FB-IoU per fold and over folds.

    Parameters
    ----------
    entries : iterable of (fold, class name, counts)
        ``counts`` is a query's ``(2, 2)`` :func:`iou_counts`.

    Returns
    -------
    dict
        ``miou`` and ``fb_iou`` (means over folds, in [0, 1]) and ``folds``: per fold ``miou``,
        ``fb_iou``, ``queries``, ``background`` and ``classes`` (per class ``iou``, ``queries``,
        ``intersection``, ``union`` of the foreground).
    """
    totals: dict[int, dict[str, np.ndarray]] = {}
    queries: dict[int, dict[str, int]] = {}
    for fold, label, counts in entries:
        fold_totals = totals.setdefault(fold, {})
        fold_totals[label] = fold_totals.get(label, np.zeros((2, 2), np.int64)) + counts
        queries.setdefault(fold, {}).setdefault(label, 0)
        queries[fold][label] += 1
    folds = {fold: fold_summary(totals[fold], queries[fold]) for fold in sorted(totals)}
    return {
        "miou": float(np.mean([f["miou"] for f in folds.values()])) if folds else 0.0,
        "fb_iou": float(np.mean([f["fb_iou"] for f in folds.values()])) if folds else 0.0,
        "folds": folds,
    }


def fold_summary(totals: dict[str, np.ndarray], queries: dict[str, int]) -> dict:
    """Scores of one fold from its classes' summed ``(2, 2)`` counts."""
    classes = {
        label: {"iou": ratio(*counts[1]), "queries": queries[label],
                "intersection": int(counts[1, 0]), "union": int(counts[1, 1])}
        for label, counts in sorted(totals.items())
    }
    overall = sum(totals.values())
    background, foreground = ratio(*overall[0]), ratio(*overall[1])
    return {
        "miou": float(np.mean([c["iou"] for c in classes.values()])),
        "fb_iou": (background + foreground) / 2,
        "queries": sum(queries.values()),
        "background": {"iou": background, "intersection": int(overall[0, 0]), "union": int(overall[0, 1])},
        "classes": classes,
    }
