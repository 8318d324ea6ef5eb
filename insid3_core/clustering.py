"""Average-linkage clustering of a target's patches (ALGORITHM.md step 5).

Two exact implementations of the same partition: scipy's (CPU) and a reciprocal-nearest-
neighbour one in torch that runs on the features' device, all targets of a batch together.
Average linkage is reducible, so merging every pair of mutual nearest clusters at once builds
the same dendrogram as merging one pair at a time; cutting it below ``1 - tau`` gives the same
partition.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from .config import CLUSTERING_METHODS

TORCH_MEMORY_BUDGET = 8 * 2**30
"""Bytes the torch clustering may use at once; a batch is clustered in chunks that fit."""

CHAIN_LENGTH = 8
"""Most clusters a merging pair may absorb one after another within one round."""

CHAIN_BUDGET = 2**22
"""Rounds look for such chains only while ``pairs * CHAIN_LENGTH * K`` (float64 cells) stays below it."""


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
        per_target = 32 * features.shape[1] ** 2  # float64 sums, their float32/float64 build and shrink copies
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

    Each cluster keeps its nearest neighbour and a lower bound on its distance to every other
    cluster, so a round touches only the merged rows and columns and the rows that pointed at
    them (see :class:`_NearestNeighbourLinkage`). Two to four host synchronisations per round.

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
    if count < 2:
        return torch.zeros(batch, count, dtype=torch.int64, device=features.device)
    linkage_state = _NearestNeighbourLinkage(_cosine_distances(features), threshold)
    while linkage_state.merge_round():
        linkage_state.compact_if_sparse()
    return linkage_state.labels()


class _NearestNeighbourLinkage:
    """Reciprocal-nearest-neighbour average linkage with cached nearest neighbours.

    ``sums[b, i, j]`` is the total point-to-point distance between clusters i and j of target
    b (``inf`` on the diagonal and in the columns of merged-away clusters), so their average
    distance is ``sums[b, i, j] / (n_i n_j)``. Average linkage is reducible: a merged cluster
    is never closer to a third cluster than the nearer of its two parts. Hence

    - a cluster whose nearest neighbour is at ``threshold`` or farther never merges again;
    - a cluster whose nearest neighbour did not merge keeps it;
    - ``bound``, the second-nearest distance at a cluster's last full search, stays a lower
      bound on its distance to every cluster but its nearest; a cluster whose nearest merged
      keeps the merged cluster when the new distance does not exceed ``bound``, and is
      searched again only otherwise.

    While few pairs merge per round, each merging pair also absorbs in the same round the
    chain of clusters it would otherwise absorb one per round (:meth:`_absorbable_chains`).
    When the largest live count of the batch falls to half the matrix, the matrices shrink to
    it.
    """

    def __init__(self, sums: torch.Tensor, threshold: float) -> None:
        """``sums``: ``(B, N, N)`` float64 cosine distances; modified in place."""
        batch, count = sums.shape[:2]
        device = sums.device
        sums.diagonal(dim1=1, dim2=2).fill_(torch.inf)
        self.sums = sums
        self.threshold = threshold
        self.sizes = torch.ones(batch, count, dtype=torch.float64, device=device)
        self.alive = torch.ones(batch, count, dtype=torch.bool, device=device)
        self.live_total = batch * count
        self.assignment = torch.arange(count, device=device).expand(batch, count).clone()
        distance, nearest, bound = self._nearest_two(torch.arange(batch * count, device=device))
        self.nearest_distance = distance.view(batch, count)
        self.nearest = nearest.view(batch, count)
        self.bound = bound.view(batch, count)

    @property
    def count(self) -> int:
        return self.sums.shape[1]

    def _nearest_two(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest distance, nearest cluster and second-nearest distance of flat rows ``(R,)``."""
        count = self.count
        flat = self.sums.view(-1, count)
        row_sizes = self.sizes.view(-1)
        results = []
        for chunk in rows.split(max(1, 2**26 // count)):
            scaled = flat.index_select(0, chunk).div_(self.sizes.index_select(0, chunk // count))
            values, indices = scaled.topk(2, dim=1, largest=False)
            values.div_(row_sizes.index_select(0, chunk)[:, None])
            results.append((values[:, 0], indices[:, 0], values[:, 1]))
        if len(results) == 1:
            return results[0]
        return tuple(torch.cat(parts) for parts in zip(*results))

    def merge_round(self) -> bool:
        """Merge every mutual nearest pair closer than the threshold; ``False`` when none is left.

        Clusters are addressed by flat row ``b * K + i`` of the ``(B, K)`` state tensors.
        """
        count = self.count
        index = torch.arange(count, device=self.sums.device)
        nearest = self.nearest
        merging = (self.nearest_distance < self.threshold) & (nearest.gather(1, nearest) == index) & (index < nearest)
        kept = merging.view(-1).nonzero()[:, 0]
        if kept.numel() == 0:
            return False
        gone = kept - kept % count + nearest.view(-1).index_select(0, kept)
        if kept.numel() * CHAIN_LENGTH * count <= CHAIN_BUDGET:
            chain_kept, chain_gone = self._absorbable_chains(kept, gone)
            kept, gone = torch.cat([kept, chain_kept]), torch.cat([gone, chain_gone])
        self.live_total -= kept.numel()
        kept_local = kept % count
        self._add_into(kept, gone, kept_local)
        survivor = index.repeat(self.nearest.shape[0], 1)
        survivor.view(-1).index_copy_(0, gone, kept_local)
        self.assignment = survivor.gather(1, self.assignment)
        changed = torch.zeros_like(merging).view(-1).index_fill_(0, torch.cat([kept, gone]), True).view_as(merging)
        pointing = (self.nearest_distance < self.threshold) & changed.gather(1, nearest) & ~changed
        merged = survivor.gather(1, nearest)
        distance = self.sums.gather(2, merged[..., None])[..., 0] / self.sizes.gather(1, merged) / self.sizes
        keep = pointing & (distance <= self.bound)
        self.nearest = torch.where(keep, merged, nearest)
        self.nearest_distance = torch.where(keep, distance, self.nearest_distance)
        self.nearest_distance.view(-1).index_fill_(0, gone, torch.inf)
        search = (pointing & ~keep).view(-1).index_fill_(0, kept, True)
        rows = search.nonzero()[:, 0]
        distance, nearest, bound = self._nearest_two(rows)
        self.nearest_distance.view(-1).index_copy_(0, rows, distance)
        self.nearest.view(-1).index_copy_(0, rows, nearest)
        self.bound.view(-1).index_copy_(0, rows, bound)
        return True

    def _absorbable_chains(self, kept: torch.Tensor, gone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clusters that each merging pair would absorb one after another, in this same round.

        A large cluster absorbs the small clusters pointing at it one per round, each being
        its only mutual nearest neighbour at a time. For the merged pair ``G_0 = kept ∪ gone``
        this takes the ``CHAIN_LENGTH`` clusters ``q_1, q_2, ...`` whose nearest is ``kept``
        or ``gone``, nearest first, and accepts the longest prefix where, for every ``k``,
        ``q_{k+1}`` is the nearest cluster of ``G_k = G_0 ∪ q_1 ∪ ... ∪ q_k`` (over the
        clusters before this round's merges, which by reducibility cannot come closer), lies
        closer than the threshold, and is within its own bound of ``G_k`` (so ``G_k`` is its
        nearest too). Each accepted step is a mutual nearest merge of the sequential process.

        Parameters
        ----------
        kept, gone : torch.Tensor
            ``(M,)`` flat rows of this round's mutual pairs, before they merge.

        Returns
        -------
        chain_kept, chain_gone : torch.Tensor
            ``(A,)`` flat rows: ``chain_gone[a]`` merges into ``chain_kept[a]`` (a ``kept`` row).
        """
        count = self.count
        flat = self.sums.view(-1, count)
        pairs = kept.numel()
        rows = torch.arange(flat.shape[0], device=flat.device)
        pair_of = torch.full_like(rows, pairs)  # ``pairs``: in no merging pair
        pair_of[kept] = rows[:pairs]
        pair_of[gone] = rows[:pairs]
        pointed = pair_of[self.nearest.view(-1) + rows - rows % count]
        candidate = (self.nearest_distance.view(-1) < self.threshold) & (pointed < pairs) & (pair_of == pairs)
        pair = torch.where(candidate, pointed, pairs)
        looked_up = pair.clamp(max=pairs - 1)
        to_pair = flat.gather(1, (kept % count)[looked_up, None]) + flat.gather(1, (gone % count)[looked_up, None])
        first = torch.where(candidate, to_pair[:, 0] / self.sizes.view(-1), torch.inf)  # ∝ d(q, G_0)
        order = first.argsort()
        order = order[pair[order].argsort(stable=True)]
        sorted_pair = pair[order]
        per_pair = torch.zeros(pairs + 1, dtype=torch.int64, device=flat.device).index_add_(0, pair, torch.ones_like(pair))
        rank = rows - (per_pair.cumsum(0) - per_pair)[sorted_pair]
        slot = torch.where((rank < CHAIN_LENGTH) & (sorted_pair < pairs), sorted_pair * CHAIN_LENGTH + rank, pairs * CHAIN_LENGTH)
        table = torch.full((pairs * CHAIN_LENGTH + 1,), -1, dtype=torch.int64, device=flat.device)
        members = table.index_copy_(0, slot, order)[:-1].view(pairs, CHAIN_LENGTH)  # the last slot takes the rest
        present = members >= 0
        members = members.clamp(min=0)
        sizes = self.sizes.view(-1)
        member_rows = flat[members].masked_fill_(~present[..., None], 0.0)  # (M, L, K)
        grown = torch.cat([(flat[kept] + flat[gone])[:, None], member_rows[:, :-1]], dim=1).cumsum_(dim=1)
        grown_sizes = torch.cat([(sizes[kept] + sizes[gone])[:, None], (sizes[members] * present)[:, :-1]], dim=1)
        grown_sizes = grown_sizes.cumsum_(dim=1)
        distances = grown.div_(self.sizes[kept // count][:, None, :]).div_(grown_sizes[..., None])  # d(G_k, .)
        to_next = distances.gather(2, (members % count)[..., None])[..., 0]
        accepted = (
            present
            & (to_next <= distances.min(dim=2).values)
            & (to_next < self.threshold)
            & (to_next <= self.bound.view(-1)[members])
        ).cumprod(dim=1)
        absorbed = accepted.view(-1).nonzero()[:, 0]
        return kept.repeat_interleave(CHAIN_LENGTH)[absorbed], members.view(-1)[absorbed]

    def _add_into(self, kept: torch.Tensor, gone: torch.Tensor, kept_local: torch.Tensor) -> None:
        """Add the rows, then the columns, of flat rows ``gone`` into ``kept`` (``(M,)`` each).

        ``kept_local`` is ``kept``'s column within its target.
        """
        count = self.count
        flat = self.sums.view(-1, count)
        flat.index_add_(0, kept, flat.index_select(0, gone))
        cells = self.sums.view(-1)
        column = torch.arange(count, device=cells.device) * count
        first_cell = (kept - kept_local) * count + kept_local  # cell (b, 0, i)
        kept_columns = (first_cell[:, None] + column).view(-1)
        gone_columns = (first_cell[:, None] + (gone - kept)[:, None] + column).view(-1)
        cells.index_add_(0, kept_columns, cells.index_select(0, gone_columns))
        cells.index_fill_(0, gone_columns, torch.inf)
        sizes = self.sizes.view(-1)
        sizes.index_add_(0, kept, sizes.index_select(0, gone))
        self.alive.view(-1).index_fill_(0, gone, False)

    def compact_if_sparse(self) -> None:
        """Shrink the matrices to the largest live count when it is at most half of them.

        A target with fewer live clusters is padded with merged-away ones, whose columns are
        ``inf`` and whose nearest distance is set to ``inf``.
        """
        batch, count = self.alive.shape
        if self.live_total > batch * count // 2:
            return
        counts = self.alive.sum(dim=1)
        size = int(counts.max())
        if size > count // 2:
            return
        order = torch.argsort((~self.alive).to(torch.uint8), dim=1, stable=True)[:, :size]
        valid = torch.arange(size, device=order.device) < counts[:, None]
        renumber = (self.alive.cumsum(dim=1) - 1).clamp_(min=0)
        rows = self.sums.gather(1, order[:, :, None].expand(-1, -1, count))
        self.sums = rows.gather(2, order[:, None, :].expand(-1, size, -1))
        self.sizes = self.sizes.gather(1, order)
        self.nearest_distance = self.nearest_distance.gather(1, order).masked_fill_(~valid, torch.inf)
        self.bound = self.bound.gather(1, order)
        self.nearest = torch.where(valid, renumber.gather(1, self.nearest).gather(1, order), 0)
        self.assignment = renumber.gather(1, self.assignment)
        self.alive = valid

    def labels(self) -> torch.Tensor:
        """``(B, N)`` int64 labels ``0..K_b-1`` of the original points."""
        return (self.alive.cumsum(dim=1) - 1).gather(1, self.assignment)
