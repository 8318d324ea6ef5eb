"""Average-linkage clustering of a target's patches (ALGORITHM.md step 5).

Two exact implementations of the same partition: scipy's (CPU) and a reciprocal-nearest-
neighbour one in torch that runs on the features' device. Average linkage is reducible, so
merging every pair of mutual nearest clusters at once builds the same dendrogram as merging
one pair at a time; cutting it below ``1 - tau`` gives the same partition.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from .config import CLUSTERING_METHODS

TORCH_MEMORY_BUDGET = 8 * 2**30
"""Bytes the torch clustering may use at once; a batch is clustered in chunks that fit."""


def cluster_patches(features: torch.Tensor, tau: float, method: str = "auto") -> torch.Tensor:
    """Partition patches by average linkage on cosine distance, cut below ``1 - tau``.

    Clusters merge while their average distance ``1 - clamp(x_i · x_j, -1, 1)`` is strictly
    below ``1 - tau``.

    Parameters
    ----------
    features : torch.Tensor
        ``(N, C)`` or ``(B, N, C)`` L2-normalised ORIGINAL (not debiased) features, one
        target per leading index.
    tau : float
    method : {"auto", "scipy", "torch"}
        ``auto`` runs torch on an accelerator (all targets of a batch together) and scipy
        on the CPU (one target at a time).

    Returns
    -------
    torch.Tensor
        ``(N,)`` or ``(B, N)`` int64 labels ``0..K-1`` per target, on the features' device;
        only the partition is meaningful.
    """
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"clustering method must be one of {CLUSTERING_METHODS}, got {method!r}")
    if features.ndim == 2:
        return cluster_patches(features[None], tau, method)[0]
    if method == "torch" or (method == "auto" and features.device.type != "cpu"):
        per_target = 32 * features.shape[1] ** 2  # float64 sums, distances and two scatter buffers
        chunk = max(1, TORCH_MEMORY_BUDGET // per_target)
        return torch.cat([_torch_average_linkage(part, 1.0 - tau) for part in features.split(chunk)])
    labels = [torch.from_numpy(_scipy_average_linkage(target, tau)) for target in features]
    return torch.stack(labels).to(features.device)


def _cosine_similarities(features: torch.Tensor) -> torch.Tensor:
    """``(..., N, N)`` float32 ``clamp(x_i · x_j, -1, 1)`` on the features' device."""
    return (features @ features.transpose(-1, -2)).clamp_(-1.0, 1.0)


def _cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``(..., N, N)`` float64 distances ``1 - clamp(x_i · x_j, -1, 1)`` (product in float32)."""
    return 1.0 - _cosine_similarities(features).double()


def _scipy_average_linkage(features: torch.Tensor, tau: float) -> np.ndarray:
    if features.shape[0] < 2:
        return np.zeros(features.shape[0], dtype=np.int64)
    similarity = _cosine_similarities(features).cpu().numpy()
    count = similarity.shape[0]
    condensed = np.empty(count * (count - 1) // 2, dtype=np.float64)
    start = 0
    for row in range(count - 1):  # row by row: 10x faster than squareform on float32, no N x N float64
        stop = start + count - 1 - row
        np.subtract(1.0, similarity[row, row + 1 :], out=condensed[start:stop], dtype=np.float64)
        start = stop
    del similarity
    tree = linkage(condensed, method="average")
    labels = fcluster(tree, t=np.nextafter(1.0 - tau, -np.inf), criterion="distance")
    return labels.astype(np.int64) - 1


def _torch_average_linkage(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """Merge all mutual nearest cluster pairs closer than ``threshold``, in every target at once.

    ``sums[b, i, j]`` is the total point-to-point distance between clusters i and j of target
    b, so their average-linkage distance is ``sums[b, i, j] / (n_i n_j)``. After each round the
    clusters of every target are renumbered ``0..K_b-1`` and the tensors shrink to the largest
    ``K_b``; ``sizes`` is 0 on the padding. One host synchronisation per round.

    Parameters
    ----------
    features : torch.Tensor
        ``(B, N, C)`` L2-normalised.
    threshold : float
        ``1 - tau``.

    Returns
    -------
    torch.Tensor
        ``(B, N)`` int64 labels ``0..K_b-1``.
    """
    batch, count = features.shape[:2]
    sums = _cosine_distances(features)
    sizes = torch.ones(batch, count, dtype=torch.float64, device=features.device)
    labels = torch.arange(count, device=features.device).expand(batch, count).clone()
    while sums.shape[1] > 1:
        count = sums.shape[1]
        index = torch.arange(count, device=sums.device).expand(batch, count)
        alive = sizes > 0
        distances = sums / (sizes[:, :, None] * sizes[:, None, :])
        distances.masked_fill_(~(alive[:, :, None] & alive[:, None, :]), torch.inf)
        distances.diagonal(dim1=1, dim2=2).fill_(torch.inf)
        nearest_distance, nearest = distances.min(dim=2)
        del distances
        merging = alive & (nearest.gather(1, nearest) == index) & (nearest_distance < threshold) & (index < nearest)
        parent = torch.cat([index, index[:, :1]], dim=1)  # a spare column takes the non-merging writes
        parent.scatter_(1, torch.where(merging, nearest, count), index)
        parent = parent[:, :count]
        kept = (parent == index) & alive
        any_merge, merged = torch.stack([merging.any().long(), kept.sum(dim=1).max()]).tolist()
        if not any_merge:
            break
        renumber = kept.cumsum(dim=1) - 1
        assignment = torch.where(alive, renumber.gather(1, parent), merged)  # padding -> a spare row
        rows = sums.new_zeros(batch, merged + 1, count).scatter_add_(1, assignment[:, :, None].expand(-1, -1, count), sums)
        sums = sums.new_zeros(batch, merged + 1, merged + 1).scatter_add_(
            2, assignment[:, None, :].expand(-1, merged + 1, -1), rows
        )[:, :merged, :merged]
        del rows
        sizes = sizes.new_zeros(batch, merged + 1).scatter_add_(1, assignment, sizes)[:, :merged]
        labels = assignment.gather(1, labels)
    return labels
