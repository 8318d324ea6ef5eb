"""Seed cluster and aggregation into the low-resolution mask (ALGORITHM.md step 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cluster_prototypes(features: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Mean member feature of each cluster, L2-normalised.

    Parameters
    ----------
    features : torch.Tensor
        ``(N, C)``.
    labels : torch.Tensor
        ``(N,)`` int64 in ``0..count-1``.
    count : int
        Number of clusters ``K``.

    Returns
    -------
    torch.Tensor
        ``(K, C)`` L2-normalised.
    """
    sums = torch.zeros(count, features.shape[1], dtype=features.dtype, device=features.device)
    return F.normalize(sums.index_add_(0, labels, features), dim=1)


def cluster_scores(
    labels: torch.Tensor,
    candidates: torch.Tensor,
    features: torch.Tensor,
    debiased: torch.Tensor,
    similarity: torch.Tensor,
    prototype: torch.Tensor,
) -> torch.Tensor:
    """Aggregation score ``cross_k * intra_k * a_k`` of every cluster of one target.

    Parameters
    ----------
    labels : torch.Tensor
        ``(N,)`` int64 cluster labels ``0..K-1``.
    candidates : torch.Tensor
        ``(N,)`` bool candidate patches (forward ∧ backward); at least one must be set.
    features, debiased : torch.Tensor
        ``(N, C)`` original and debiased L2-normalised features.
    similarity : torch.Tensor
        ``(N,)`` debiased similarity of each patch to the prototype.
    prototype : torch.Tensor
        ``(C,)`` reference prototype ``p``.

    Returns
    -------
    torch.Tensor
        ``(K,)`` float32 scores; the seed cluster's area weight is 1.
    """
    count = int(labels.max()) + 1
    sizes = torch.bincount(labels, minlength=count).float()
    matched = torch.bincount(labels[candidates], minlength=count).float()
    area = matched / sizes
    seed_similarity = cluster_prototypes(debiased, labels, count) @ prototype
    seed = torch.argmax(torch.where(matched > 0, seed_similarity, -torch.inf))
    original = cluster_prototypes(features, labels, count)
    intra = original @ original[seed]
    cross = torch.bincount(labels, weights=similarity, minlength=count).float() / sizes
    area[seed] = 1.0
    return cross * intra * area
