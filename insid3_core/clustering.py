"""Average-linkage clustering of a target's patches (docs/algorithm.md step 5).

Three exact implementations of the same partition: scipy's (CPU); the nearest-neighbour chain
in one Triton program per target, every target of a batch in one launch
(:mod:`insid3_core.triton_clustering`, CUDA); and a reciprocal-nearest-neighbour one in torch
that runs on the features' device, all targets of a batch together. Average linkage is
reducible, so merging every pair of mutual nearest clusters at once builds the same dendrogram
as merging one pair at a time; cutting it below ``1 - tau`` gives the same partition.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from .config import CLUSTERING_METHODS

TORCH_MEMORY_SHARE = 0.25
"""Share of a GPU's memory one torch clustering may use at once (the engine's two device
threads may each run one); a batch is clustered in chunks that fit."""

TORCH_MEMORY_BUDGET = 8 * 2**30
"""Bytes the torch clustering may use at once on other devices."""

CHAIN_LENGTH = 8
"""Most clusters a merging pair may absorb one after another within one round."""

CHAIN_BUDGET = 2**22
"""Rounds look for such chains only while ``pairs * CHAIN_LENGTH * K`` (float64 cells) stays below it."""

SEARCH_CELLS = 2**25
"""Most float64 cells one nearest-neighbour search (rows x K) or one round's row additions
(pairs x K) read at once."""

ROUNDS_PER_CHECK = 4
"""Rounds replayed on a GPU between two reads of the clustering state by the host."""


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
    method : {"auto", "scipy", "torch", "triton"}
        ``auto`` runs triton on a CUDA device when triton imports (torch there otherwise, and
        on other accelerators; all targets of a batch together) and scipy on the CPU (one
        target at a time). ``triton`` on the CPU needs ``TRITON_INTERPRET=1`` (Triton's
        interpreter: for tests).

    Returns
    -------
    torch.Tensor
        ``(N,)`` or ``(B, N)`` int64 labels ``0..K-1`` per target, on the features' device;
        only the partition is meaningful.
    """
    chosen = clustering_method(method, features.device)
    if features.ndim == 2:
        return cluster_patches(features[None], tau, method)[0]
    if chosen == "triton":
        return _triton_clustering(features, tau, required=method == "triton")
    if chosen == "torch":
        per_target = 32 * features.shape[1] ** 2  # float64 sums, their float32/float64 build and shrink copies
        chunk = max(1, _memory_budget(features.device) // per_target)
        return torch.cat([_torch_average_linkage(part, 1.0 - tau) for part in features.split(chunk)])
    labels = [torch.from_numpy(_scipy_average_linkage(target, tau)) for target in features]
    return torch.stack(labels).to(features.device)


def clustering_method(method: str, device: torch.device) -> str:
    """What clustering ``method`` runs on ``device``: ``auto`` is ``triton`` on CUDA when
    :func:`triton_usable`, ``torch`` on other accelerators (and CUDA without triton), ``scipy`` on
    the CPU; a named method is itself. ``triton`` off CUDA is a ``ValueError`` unless
    ``TRITON_INTERPRET=1`` (Triton's CPU interpreter: for tests)."""
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"clustering method must be one of {CLUSTERING_METHODS}, got {method!r}")
    if method == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("clustering='triton' needs a CUDA device (or TRITON_INTERPRET=1: Triton's CPU interpreter)")
    if method != "auto":
        return method
    if device.type == "cuda" and triton_usable():
        return "triton"
    return "scipy" if device.type == "cpu" else "torch"


def triton_usable() -> bool:
    """Whether triton imports (it ships with CUDA builds of torch) and no earlier launch failed."""
    return not _TRITON_FAILED and importlib.util.find_spec("triton") is not None


def _triton_clustering(features: torch.Tensor, tau: float, required: bool) -> torch.Tensor:
    """:func:`~insid3_core.triton_clustering.triton_average_linkage` in chunks that fit the memory
    budget; when the launch fails and triton was not asked for by name, a warning and torch's
    clustering instead (for the rest of the process)."""
    from .triton_clustering import triton_average_linkage

    per_target = 12 * features.shape[1] ** 2  # float32 similarities and the float64 distances made from them
    chunk = max(1, _memory_budget(features.device) // per_target)
    try:
        return torch.cat([triton_average_linkage(_cosine_distances(part).contiguous(), 1.0 - tau)
                          for part in features.split(chunk)])
    except Exception as err:  # a compiler or driver failure on a GPU the kernel never met
        if required:
            raise
        _TRITON_FAILED.append(err)
        warnings.warn(f"the Triton clustering failed on {features.device} ({err}); using the torch clustering",
                      stacklevel=3)
        return cluster_patches(features, tau, "torch")


_TRITON_FAILED: list[Exception] = []


def _memory_budget(device: torch.device) -> int:
    """Bytes the torch clustering may use at once on ``device``."""
    if device.type == "cuda":
        return int(TORCH_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory)
    return TORCH_MEMORY_BUDGET


def _cosine_similarities(features: torch.Tensor) -> torch.Tensor:
    """``(..., N, N)`` float32 ``clamp(x_i · x_j, -1, 1)`` on the features' device."""
    return (features @ features.transpose(-1, -2)).clamp_(-1.0, 1.0)


def _cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``(..., N, N)`` float64 distances ``1 - clamp(x_i · x_j, -1, 1)`` (product in float32),
    made in place in the float64 copy (``-s + 1`` is ``1 - s`` to the bit): at most ``12 N^2``
    bytes a target at once."""
    return _cosine_similarities(features).double().neg_().add_(1.0)


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


def _torch_average_linkage(
    features: torch.Tensor,
    threshold: float,
    slot_limits: tuple[int, int] | None = None,
    rounds_per_check: int | None = None,
) -> torch.Tensor:
    """Merge mutual nearest cluster pairs closer than ``threshold``, in every target at once.

    Each cluster keeps its nearest neighbour and a lower bound on its distance to every other
    cluster, so a round touches only the merged rows and columns and the rows that pointed at
    them (see :class:`_NearestNeighbourLinkage`). Rounds have fixed shapes between two reads
    of the state by the host; on a GPU they replay one captured CUDA graph.

    Parameters
    ----------
    features : torch.Tensor
        ``(B, N, C)`` L2-normalised.
    threshold : float
        ``1 - tau``.
    slot_limits : (int, int) or None
        Most merging pairs and most searched rows a round takes (more wait for later rounds);
        ``None`` sizes them from :data:`SEARCH_CELLS`.
    rounds_per_check : int or None
        Rounds run with the same slots between two reads of the state; ``None``:
        :data:`ROUNDS_PER_CHECK` on a GPU (slots rounded up to powers of two, so that captured
        graphs serve again), 1 elsewhere (slots sized exactly).

    Returns
    -------
    torch.Tensor
        ``(B, N)`` int64 labels ``0..K_b-1``.
    """
    batch, count = features.shape[:2]
    if count < 2:
        return torch.zeros(batch, count, dtype=torch.int64, device=features.device)
    linkage_state = _NearestNeighbourLinkage(_cosine_distances(features), threshold)
    linkage_state.run(slot_limits, rounds_per_check, _RoundGraph() if features.device.type == "cuda" else None)
    return linkage_state.labels()


def _slots(needed: int, limit: int, reusable: bool) -> int:
    """Slots for ``needed`` items, at most ``limit``: the next power of two (at least 8) when
    ``reusable`` (several rounds, and on a GPU one captured graph, serve many checks), else
    ``needed`` (at least 1)."""
    return min(limit, max(8, 1 << (needed - 1).bit_length()) if reusable else max(1, needed))


class _NearestNeighbourLinkage:
    """Reciprocal-nearest-neighbour average linkage with cached nearest neighbours.

    ``sums[b, i, j]`` is the total point-to-point distance between clusters i and j of target
    b (``inf`` on the diagonal and in the columns of merged-away clusters), so their average
    distance is ``sums[b, i, j] / (n_i n_j)``. Average linkage is reducible: a merged cluster
    is never closer to a third cluster than the nearer of its two parts, and two mutual
    nearest clusters stay so while other pairs merge. Hence

    - a cluster whose nearest neighbour is at ``threshold`` or farther never merges again;
    - a cluster whose nearest neighbour did not merge keeps it;
    - ``bound``, the second-nearest distance at a cluster's last full search, stays a lower
      bound on its distance to every cluster but its nearest; a cluster whose nearest merged
      keeps the merged cluster when the new distance does not exceed ``bound``, and is
      searched again only otherwise;
    - a round may merge any subset of the mutual pairs and search any subset of the rows to
      search: the rest are ``stale`` (their nearest is unknown), and a stale cluster takes
      part in no merge until it is searched.

    While few pairs merge per round, each merging pair also absorbs in the same round the
    chain of clusters it would otherwise absorb one per round (:meth:`_absorbable_chains`).

    Per-cluster state is flat, row ``b * K + i`` for cluster i of target b, with one scratch
    row at the end: a round's unused slots write there, so that a round has the same shapes
    whatever merges (no host synchronisation, and a CUDA graph can replay it). The host reads
    the state every few rounds to size the slots, to stop, and to shrink the matrices when
    the largest live count of the batch falls to half of them.
    """

    def __init__(self, sums: torch.Tensor, threshold: float) -> None:
        """``sums``: ``(B, N, N)`` float64 cosine distances; modified in place."""
        batch, count = sums.shape[:2]
        device = sums.device
        sums.diagonal(dim1=1, dim2=2).fill_(torch.inf)
        self.sums = sums
        self.threshold = threshold
        rows = batch * count + 1
        self.sizes = torch.ones(rows, dtype=torch.float64, device=device)
        self.alive = torch.ones(rows, dtype=torch.bool, device=device)
        self.alive[-1].fill_(False)
        self.stale = torch.zeros(rows, dtype=torch.bool, device=device)
        self.nearest = torch.zeros(rows, dtype=torch.int64, device=device)
        self.nearest_distance = torch.full((rows,), torch.inf, dtype=torch.float64, device=device)
        self.bound = torch.full((rows,), torch.inf, dtype=torch.float64, device=device)
        self.assignment = torch.arange(count, device=device).expand(batch, count).clone()
        self.searched = torch.zeros((), dtype=torch.int64, device=device)  # rows the last round had to search
        for chunk in torch.arange(batch * count, device=device).split(max(1, SEARCH_CELLS // count)):
            self._search(chunk, torch.ones_like(chunk, dtype=torch.bool))

    @property
    def batch(self) -> int:
        return self.sums.shape[0]

    @property
    def count(self) -> int:
        return self.sums.shape[1]

    def grid(self, state: torch.Tensor) -> torch.Tensor:
        """The ``(B, K)`` view of flat per-cluster ``state`` (scratch row left out)."""
        return state[:-1].view(self.batch, self.count)

    def run(
        self,
        slot_limits: tuple[int, int] | None = None,
        rounds_per_check: int | None = None,
        graph: _RoundGraph | None = None,
    ) -> None:
        """Merge until no pair closer than the threshold is left.

        ``slot_limits`` and ``rounds_per_check``: see :func:`_torch_average_linkage`; ``graph``
        replays the rounds (on CUDA), ``None`` runs them one by one.
        """
        pair_limit, row_limit = slot_limits or (SEARCH_CELLS, SEARCH_CELLS)
        rounds_per_check = rounds_per_check or (1 if graph is None else ROUNDS_PER_CHECK)
        reusable = rounds_per_check > 1
        slots = (0, 0)
        while True:
            pairs, stale, searched, largest = self._pending().tolist()
            if pairs == 0 and stale == 0:
                return
            if max(largest, 2) <= self.count // 2:
                self.compact(max(largest, 2))
                slots = (0, 0)
            count = self.count
            wanted = (
                _slots(pairs, min(pair_limit, SEARCH_CELLS // count, self.batch * count // 2), reusable),
                _slots(max(searched, 4 * pairs), min(row_limit, SEARCH_CELLS // count, self.batch * count), reusable),
            )
            if not reusable or not all(want <= slot <= 4 * want for want, slot in zip(wanted, slots)):
                slots = wanted  # reused slots keep the captured graph while they are at most 4 times too many
            pair_slots, row_slots = slots
            chains = pair_slots * CHAIN_LENGTH * count <= CHAIN_BUDGET
            if graph is None:
                for _ in range(rounds_per_check):
                    self.merge_round(pair_slots, row_slots, chains)
            else:
                graph.replay(self, (pair_slots, row_slots, chains), rounds_per_check)

    def _mutual(self) -> torch.Tensor:
        """``(B, K)`` bool: the lower-indexed cluster of each fresh mutual pair closer than the threshold."""
        nearest, stale = self.grid(self.nearest), self.grid(self.stale)
        index = torch.arange(self.count, device=nearest.device)
        return (
            (self.grid(self.nearest_distance) < self.threshold)
            & (nearest.gather(1, nearest) == index)
            & (index < nearest)
            & ~stale
            & ~stale.gather(1, nearest)
        )

    def _pending(self) -> torch.Tensor:
        """``(4,)`` int64: mutual pairs, stale clusters, rows the last round had to search, and
        the largest live count of a target."""
        return torch.stack([self._mutual().sum(), self.stale.sum(), self.searched, self.grid(self.alive).sum(dim=1).max()])

    def merge_round(self, pair_slots: int, row_slots: int, chains: bool) -> None:
        """Merge up to ``pair_slots`` mutual pairs (and their chains), search up to ``row_slots`` rows.

        Shapes depend on the arguments only; nothing is read back by the host.
        """
        count, scratch = self.count, self.batch * self.count
        kept, valid = _first_set(self._mutual().view(-1), pair_slots)
        gone = kept - kept % count + self.nearest.index_select(0, kept)
        if chains:
            chain_kept, chain_gone, chain_valid = self._absorbable_chains(kept, gone, valid)
            taken, chain_valid = _first_set(chain_valid, pair_slots)  # the first absorptions of each chain, in order
            chain_kept, chain_gone = chain_kept[taken], chain_gone[taken]
            kept, gone, valid = torch.cat([kept, chain_kept]), torch.cat([gone, chain_gone]), torch.cat([valid, chain_valid])
        kept_local = kept % count
        self._add_into(kept, gone, valid, kept_local)
        kept_slot, gone_slot = torch.where(valid, kept, scratch), torch.where(valid, gone, scratch)
        self.alive.index_fill_(0, gone_slot, False)
        survivor = torch.arange(count, device=kept.device).repeat(self.batch + 1)[: scratch + 1]
        survivor.index_copy_(0, gone_slot, kept_local)
        survivor = self.grid(survivor)
        self.assignment.copy_(survivor.gather(1, self.assignment))
        changed = torch.zeros_like(self.alive).index_fill_(0, torch.cat([kept_slot, gone_slot]), True)
        changed_grid = self.grid(changed)
        nearest, nearest_distance, sizes = self.grid(self.nearest), self.grid(self.nearest_distance), self.grid(self.sizes)
        pointing = (nearest_distance < self.threshold) & changed_grid.gather(1, nearest) & ~changed_grid
        merged = survivor.gather(1, nearest)
        distance = self.sums.gather(2, merged[..., None])[..., 0] / sizes.gather(1, merged) / sizes
        keep = pointing & (distance <= self.grid(self.bound))
        nearest.copy_(torch.where(keep, merged, nearest))
        nearest_distance.copy_(torch.where(keep, distance, nearest_distance))
        self.nearest_distance.index_fill_(0, gone_slot, torch.inf)
        search = changed.index_fill_(0, gone_slot, False)
        search[:-1].bitwise_or_(((pointing & ~keep) | self.grid(self.stale)).view(-1))
        search[-1].fill_(False)
        self.searched.copy_(search.sum())
        rows, found = _first_set(search[:-1], row_slots)
        self.stale.copy_(search).index_fill_(0, torch.where(found, rows, scratch), False)
        self._search(rows, found)

    def _search(self, rows: torch.Tensor, found: torch.Tensor) -> None:
        """Nearest cluster, its distance and the second-nearest distance of flat ``rows`` ``(R,)``
        where ``found`` (``(R,)`` bool) is set; the others write to the scratch row."""
        count = self.count
        scaled = self.sums.view(-1, count).index_select(0, rows).div_(self.grid(self.sizes).index_select(0, rows // count))
        values, indices = scaled.topk(2, dim=1, largest=False)
        values.div_(self.sizes.index_select(0, rows)[:, None])
        slot = torch.where(found, rows, self.batch * count)
        self.nearest_distance.index_copy_(0, slot, values[:, 0])
        self.nearest.index_copy_(0, slot, indices[:, 0])
        self.bound.index_copy_(0, slot, values[:, 1])

    def _absorbable_chains(
        self, kept: torch.Tensor, gone: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clusters that each merging pair would absorb one after another, in this same round.

        A large cluster absorbs the small clusters pointing at it one per round, each being
        its only mutual nearest neighbour at a time. For the merged pair ``G_0 = kept ∪ gone``
        this takes the ``CHAIN_LENGTH`` fresh clusters ``q_1, q_2, ...`` whose nearest is
        ``kept`` or ``gone``, nearest first, and accepts the longest prefix where, for every
        ``k``, ``q_{k+1}`` is the nearest cluster of ``G_k = G_0 ∪ q_1 ∪ ... ∪ q_k`` (over the
        clusters before this round's merges, which by reducibility cannot come closer), lies
        closer than the threshold, and is within its own bound of ``G_k`` (so ``G_k`` is its
        nearest too). Each accepted step is a mutual nearest merge of the sequential process.

        Parameters
        ----------
        kept, gone : torch.Tensor
            ``(M,)`` flat rows of this round's mutual pairs, before they merge.
        valid : torch.Tensor
            ``(M,)`` bool: which slots hold a pair.

        Returns
        -------
        chain_kept, chain_gone, chain_valid : torch.Tensor
            ``(M * L,)`` with ``L = min(CHAIN_LENGTH, K)``: ``chain_gone[a]`` merges into
            ``chain_kept[a]`` (a ``kept`` row) where ``chain_valid[a]``; each pair's entries
            are consecutive, in the order they merge.
        """
        count = self.count
        flat = self.sums.view(-1, count)
        pairs = kept.numel()
        scratch = self.batch * count
        slot = torch.arange(pairs, device=flat.device)
        pair_of = torch.full((scratch + 1,), pairs, dtype=torch.int64, device=flat.device)  # ``pairs``: in no merging pair
        pair_of.index_copy_(0, torch.where(valid, kept, scratch), slot).index_copy_(0, torch.where(valid, gone, scratch), slot)
        first_row = kept - kept % count
        target_rows = first_row[:, None] + torch.arange(count, device=flat.device)  # (M, K): the pair's target
        pointed = pair_of[first_row[:, None] + self.nearest[target_rows]]
        candidate = (
            (pointed == slot[:, None])
            & (pair_of[target_rows] == pairs)
            & (self.nearest_distance[target_rows] < self.threshold)
            & ~self.stale[target_rows]
        )
        sizes = self.sizes
        target_sizes = self.grid(sizes)[kept // count]  # (M, K)
        pair_rows = flat[kept] + flat[gone]  # (M, K): total distances from G_0
        from_pair = torch.where(candidate, pair_rows / target_sizes, torch.inf)  # ∝ d(G_0, q)
        nearest_first, local = from_pair.topk(min(CHAIN_LENGTH, count), dim=1, largest=False)
        present = nearest_first < torch.inf
        members = first_row[:, None] + local  # (M, L) flat rows, nearest first
        member_rows = flat[members].masked_fill_(~present[..., None], 0.0)  # (M, L, K)
        grown = torch.cat([pair_rows[:, None], member_rows[:, :-1]], dim=1).cumsum_(dim=1)
        grown_sizes = torch.cat([(sizes[kept] + sizes[gone])[:, None], (sizes[members] * present)[:, :-1]], dim=1)
        grown_sizes = grown_sizes.cumsum_(dim=1)
        distances = grown.div_(target_sizes[:, None, :]).div_(grown_sizes[..., None])  # d(G_k, .)
        to_next = distances.gather(2, local[..., None])[..., 0]
        accepted = (
            present
            & (to_next <= distances.min(dim=2).values)
            & (to_next < self.threshold)
            & (to_next <= self.bound[members])
        ).cumprod(dim=1)
        return kept[:, None].expand_as(members).reshape(-1), members.view(-1), accepted.view(-1).bool()

    def _add_into(self, kept: torch.Tensor, gone: torch.Tensor, valid: torch.Tensor, kept_local: torch.Tensor) -> None:
        """Add the rows, then the columns, of flat rows ``gone`` into ``kept`` (``(M,)`` each) where
        ``valid``; ``gone``'s columns become ``inf``. The other slots (any rows) add zeros.

        ``kept_local`` is ``kept``'s column within its target.
        """
        count = self.count
        flat = self.sums.view(-1, count)
        use = valid[:, None]
        flat.index_add_(0, kept, torch.where(use, flat.index_select(0, gone), 0.0))
        cells = self.sums.view(-1)
        column = torch.arange(count, device=cells.device) * count
        first_cell = (kept - kept_local) * count + kept_local  # cell (b, 0, i)
        kept_columns = (first_cell[:, None] + column).view(-1)
        gone_columns = first_cell[:, None] + (gone - kept)[:, None] + column
        cells.index_add_(0, kept_columns, torch.where(use, cells[gone_columns], 0.0).view(-1))
        merged_away = torch.zeros(gone_columns.shape, dtype=cells.dtype, device=cells.device).masked_fill_(use, torch.inf)
        cells.index_add_(0, gone_columns.view(-1), merged_away.view(-1))
        self.sizes.index_add_(0, kept, torch.where(valid, self.sizes.index_select(0, gone), 0.0))

    def compact(self, size: int) -> None:
        """Shrink the matrices to ``size``, the largest live count of a target.

        A target with fewer live clusters is padded with merged-away ones, whose columns are
        ``inf`` and whose nearest distance is set to ``inf``.
        """
        batch, count = self.batch, self.count
        alive = self.grid(self.alive)
        counts = alive.sum(dim=1)
        order = torch.argsort((~alive).to(torch.uint8), dim=1, stable=True)[:, :size]
        valid = torch.arange(size, device=order.device) < counts[:, None]
        renumber = (alive.cumsum(dim=1) - 1).clamp_(min=0)
        rows = self.sums.gather(1, order[:, :, None].expand(-1, -1, count))

        def shrunk(state: torch.Tensor, padding) -> torch.Tensor:
            kept = state[:-1].view(batch, count).gather(1, order)
            return torch.cat([kept.view(-1), kept.new_full((1,), padding)])

        nearest = renumber.gather(1, self.grid(self.nearest).gather(1, order))
        self.nearest = torch.cat([nearest.view(-1), nearest.new_zeros(1)])
        self.sizes = shrunk(self.sizes, 1.0)
        self.nearest_distance = shrunk(self.nearest_distance, torch.inf)
        self.bound = shrunk(self.bound, torch.inf)
        self.stale = shrunk(self.stale, False)
        self.assignment = renumber.gather(1, self.assignment)
        self.alive = torch.cat([valid.view(-1), valid.new_zeros(1)])
        self.sums = rows.gather(2, order[:, None, :].expand(-1, size, -1))
        self.grid(self.nearest_distance).masked_fill_(~valid, torch.inf)

    def labels(self) -> torch.Tensor:
        """``(B, N)`` int64 labels ``0..K_b-1`` of the original points."""
        return (self.grid(self.alive).cumsum(dim=1) - 1).gather(1, self.assignment)


def _first_set(flags: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first ``slots`` set entries of ``flags`` ``(M,)`` bool, without a host read.

    Returns
    -------
    indices : torch.Tensor
        ``(slots,)`` int64; 0 in the slots left over.
    found : torch.Tensor
        ``(slots,)`` bool: which slots hold an index.
    """
    position = flags.cumsum(0) - 1
    slot = torch.where(flags & (position < slots), position, slots)
    indices = torch.full((slots + 1,), -1, dtype=torch.int64, device=flags.device)
    indices = indices.index_copy_(0, slot, torch.arange(flags.numel(), device=flags.device))[:-1]
    found = indices >= 0
    return indices.clamp_(min=0), found


class _RoundGraph:
    """A CUDA graph of :meth:`_NearestNeighbourLinkage.merge_round`, captured again whenever its
    arguments or the matrices it works on change.

    Captured on a side stream with the graph's own memory pool and ``thread_local`` capture
    errors, without the device-wide synchronisation and cache release of
    :class:`torch.cuda.graph`, so that the backbone of another thread runs on meanwhile. If a
    capture fails, this process warns once and runs the rounds without graphs (same results).
    """

    unavailable = False
    """Set for the whole process when a capture failed."""

    capture_lock = threading.Lock()
    """One capture at a time in the process (the engine's device threads cluster two batches
    at once on a GPU)."""

    def __init__(self) -> None:
        self.sums = None  # the matrices of the state captured; compaction replaces all its tensors
        self.arguments = None
        self.graph = None

    def replay(self, state: "_NearestNeighbourLinkage", arguments: tuple, rounds: int) -> None:
        """Run ``state.merge_round(*arguments)`` ``rounds`` times on the current stream."""
        if state.sums is not self.sums or arguments != self.arguments:
            self.graph, self.sums, self.arguments = None, state.sums, arguments
            if not _RoundGraph.unavailable:
                self.graph = self._capture(state, arguments)
                rounds -= 1
        for _ in range(rounds):
            if self.graph is None:
                state.merge_round(*arguments)
            else:
                self.graph.replay()

    @staticmethod
    def _capture(state: "_NearestNeighbourLinkage", arguments: tuple) -> torch.cuda.CUDAGraph | None:
        """Run one round eagerly (the warm-up a capture needs), then capture the next; ``None``
        when the capture failed."""
        device = state.sums.device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device, priority=current.priority)
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            state.merge_round(*arguments)
            try:
                with _RoundGraph.capture_lock:
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        state.merge_round(*arguments)
                    finally:
                        graph.capture_end()
            except RuntimeError as error:
                _RoundGraph.unavailable = True
                warnings.warn(f"clustering rounds run without CUDA graphs: capturing one failed ({error})", RuntimeWarning)
                graph = None
        current.wait_stream(side)
        return graph
