"""Average-linkage clustering of a target's patches (ALGORITHM.md step 5)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform


def cosine_distances(features: torch.Tensor) -> np.ndarray:
    """Condensed cosine distances ``1 - clamp(x_i · x_j, -1, 1)`` of L2-normalised rows.

    Parameters
    ----------
    features : torch.Tensor
        ``(N, C)`` L2-normalised (the Gram matrix is formed on the features' device).

    Returns
    -------
    np.ndarray
        ``(N * (N - 1) / 2,)`` float64, scipy's condensed order.
    """
    gram = (features @ features.T).clamp_(-1.0, 1.0).cpu().numpy().astype(np.float64)
    distances = np.subtract(1.0, gram, out=gram)
    np.fill_diagonal(distances, 0.0)
    return squareform(distances, checks=False)


def cluster_patches(features: torch.Tensor, tau: float) -> np.ndarray:
    """Partition patches by average linkage on cosine distance, cut below ``1 - tau``.

    Clusters merge while their average distance is strictly below ``1 - tau``.

    Parameters
    ----------
    features : torch.Tensor
        ``(N, C)`` L2-normalised ORIGINAL (not debiased) features of one target.
    tau : float

    Returns
    -------
    np.ndarray
        ``(N,)`` int64 labels ``0..K-1``; only the partition is meaningful.
    """
    if features.shape[0] < 2:
        return np.zeros(features.shape[0], dtype=np.int64)
    tree = linkage(cosine_distances(features), method="average")
    labels = fcluster(tree, t=np.nextafter(1.0 - tau, -np.inf), criterion="distance")
    return labels.astype(np.int64) - 1
