"""Seed cluster and aggregation into the low-resolution mask (docs/algorithm.md step 6)."""

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
    prototypes: torch.Tensor,
) -> torch.Tensor:
    """Aggregation score ``cross_k * intra_k * a_k`` of every cluster, for B targets and K classes at once.

    Parameters
    ----------
    labels : torch.Tensor
        ``(B, N)`` int64 cluster labels ``0..L_b-1`` of each target.
    candidates : torch.Tensor
        ``(K, B, N)`` bool candidate patches (forward ∧ backward) of each class.
    features, debiased : torch.Tensor
        ``(B, N, C)`` original and debiased L2-normalised features.
    similarity : torch.Tensor
        ``(K, B, N)`` debiased similarity of each patch to each class's prototype.
    prototypes : torch.Tensor
        ``(K, C)`` reference prototypes ``p``.

    Returns
    -------
    torch.Tensor
        ``(K, B, L)`` float32 scores, ``L = max L_b`` (a target's clusters past its own ``L_b``
        score 0); the seed cluster's area weight is 1. Meaningful only where the class has at
        least one candidate in the target.
    """
    classes, batch = similarity.shape[:2]
    slots = int(labels.max()) + 1
    flat = (labels + slots * torch.arange(batch, device=labels.device)[:, None]).view(-1)  # (B N,) cluster slot
    sizes = torch.zeros(batch * slots, device=labels.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
    sizes = sizes.view(batch, slots).clamp_(min=1.0)
    matched = torch.zeros(classes, batch * slots, device=labels.device).index_add_(1, flat, candidates.flatten(1).float())
    matched = matched.view(classes, batch, slots)
    cross = torch.zeros(classes, batch * slots, device=labels.device).index_add_(1, flat, similarity.flatten(1).float())
    cross = cross.view(classes, batch, slots) / sizes
    seed_similarity = torch.einsum("bnc,kc->kbn", _slot_prototypes(debiased, flat, batch, slots), prototypes)
    seed = torch.where(matched > 0, seed_similarity, -torch.inf).argmax(dim=2)  # (K, B)
    original = _slot_prototypes(features, flat, batch, slots)
    intra = torch.einsum("bnc,kbc->kbn", original, original[torch.arange(batch, device=labels.device), seed])
    area = (matched / sizes).scatter_(2, seed[..., None], 1.0)
    return cross * intra * area


def _slot_prototypes(features: torch.Tensor, flat: torch.Tensor, batch: int, slots: int) -> torch.Tensor:
    """``(B, L, C)`` :func:`cluster_prototypes` of each target, from ``(B, N, C)`` features and flat cluster slots."""
    return cluster_prototypes(features.flatten(0, 1), flat, batch * slots).view(batch, slots, -1)
