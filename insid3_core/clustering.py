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
from scipy.spatial.distance import squareform

METHODS = ("auto", "scipy", "torch")


def cluster_patches(features: torch.Tensor, tau: float, method: str = "auto") -> torch.Tensor:
    """Partition patches by average linkage on cosine distance, cut below ``1 - tau``.

    Clusters merge while their average distance ``1 - clamp(x_i · x_j, -1, 1)`` is strictly
    below ``1 - tau``.

    Parameters
    ----------
    features : torch.Tensor
        ``(N, C)`` L2-normalised ORIGINAL (not debiased) features of one target.
    tau : float
    method : {"auto", "scipy", "torch"}
        ``auto`` runs torch on an accelerator and scipy on the CPU.

    Returns
    -------
    torch.Tensor
        ``(N,)`` int64 labels ``0..K-1`` on the features' device; only the partition is
        meaningful.
    """
    if method not in METHODS:
        raise ValueError(f"clustering method must be one of {METHODS}, got {method!r}")
    if method == "torch" or (method == "auto" and features.device.type != "cpu"):
        return _torch_average_linkage(features, 1.0 - tau)
    return torch.from_numpy(_scipy_average_linkage(features, tau)).to(features.device)


def _cosine_gram(features: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` cosine similarities clamped to [-1, 1], float32 on the features' device."""
    return (features @ features.T).clamp_(-1.0, 1.0)


def _scipy_average_linkage(features: torch.Tensor, tau: float) -> np.ndarray:
    if features.shape[0] < 2:
        return np.zeros(features.shape[0], dtype=np.int64)
    similarity = _cosine_gram(features).cpu().numpy()
    condensed = np.subtract(1.0, squareform(similarity, checks=False), dtype=np.float64)
    del similarity
    tree = linkage(condensed, method="average")
    labels = fcluster(tree, t=np.nextafter(1.0 - tau, -np.inf), criterion="distance")
    return labels.astype(np.int64) - 1


def _torch_average_linkage(features: torch.Tensor, threshold: float) -> torch.Tensor:
    """Merge all mutual nearest cluster pairs closer than ``threshold`` until none is left.

    Keeps ``sums``, the total point-to-point distance between clusters (float64), so the
    average-linkage distance of clusters i and j is ``sums[i, j] / (n_i n_j)``.
    """
    sums = 1.0 - _cosine_gram(features).double()
    sizes = torch.ones(sums.shape[0], dtype=torch.float64, device=sums.device)
    labels = torch.arange(sums.shape[0], device=sums.device)
    while sums.shape[0] > 1:
        count = sums.shape[0]
        distances = sums / (sizes[:, None] * sizes[None, :])
        distances.fill_diagonal_(torch.inf)
        nearest_distance, nearest = distances.min(dim=1)
        del distances
        index = torch.arange(count, device=sums.device)
        merging = (nearest[nearest] == index) & (nearest_distance < threshold) & (index < nearest)
        parent = index.clone()
        parent[nearest[merging]] = index[merging]
        kept = parent == index
        renumber = torch.cumsum(kept, dim=0) - 1
        merged = int(renumber[-1]) + 1
        if merged == count:
            break
        assignment = renumber[parent]
        rows = sums.new_zeros(merged, count).index_add_(0, assignment, sums)
        sums = sums.new_zeros(merged, merged).index_add_(1, assignment, rows)
        del rows
        sizes = sizes.new_zeros(merged).index_add_(0, assignment, sizes)
        labels = assignment[labels]
    return labels
