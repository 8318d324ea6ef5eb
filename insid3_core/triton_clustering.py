"""Average linkage of every target of a batch in one Triton launch: the nearest-neighbour chain.

One program clusters one target (Murtagh 1983; Müllner 2011, the algorithm scipy and fastcluster
run for average linkage). The ``(N, N)`` float64 distances come from one matmul and stay in GPU
memory; the program grows a chain of nearest neighbours (each step one row argmin over the
active clusters, preferring the chain's previous cluster on a tie), merges a reciprocal pair
with a Lance-Williams update of one row and one column (``(n_a d_a + n_b d_b) / (n_a + n_b)``,
scipy's formula and precision), and retires the whole chain when its top's nearest distance is
at or above ``1 - tau``: by reducibility none of its clusters merges again. No host round trip.

Written by hand because no library clusters on the GPU this way: scipy and fastcluster run on
the CPU, and cuML's agglomerative clustering offers single linkage only. Triton's interpreter
(``TRITON_INTERPRET=1``) runs the same kernel on the CPU, which is how the tests check it
against scipy.

The distances are float64, scipy's precision, so every Lance-Williams update rounds as scipy's
does and a merge height next to ``1 - tau`` falls on the same side of it. Two things keep it so
once compiled for a GPU, where the interpreter cannot show a difference: the threshold reaches the
kernel as a float64 tensor (Triton passes a Python float as float32: 0.4 would become
0.4000000059604645), and the launch turns off floating-point fusion (ptxas would otherwise fuse
``n_a d_a + n_b d_b`` into one FMA, which rounds once where scipy rounds twice). Float32 distances gave
the same partitions on the 312 targets tried (the example scenes' features at 192 px, random
targets of 8-59 patches, three tau each) but are not exact by construction; float64 costs
``8 N^2`` bytes per target (2 GiB at N = 16 384, where batches are chunked by memory).
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK_LIMIT = 2048
"""Most distances one step of a program reads at once (float64 registers of its warps)."""


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (importing triton is slow, and ``TRITON_INTERPRET``
    must be read when the kernel is defined)."""
    import triton
    import triton.language as tl

    @triton.jit
    def average_linkage(distances, sizes, active, chain, parent, count, threshold_pointer, BLOCK: tl.constexpr):
        target = tl.program_id(0).to(tl.int64)
        threshold = tl.load(threshold_pointer)
        stride = count.to(tl.int64)  # row offsets in int64: N * N passes 2**31 above 46 340 patches
        distances += target * count * count
        sizes += target * count
        active += target * count
        chain += target * count
        parent += target * count
        offsets = tl.arange(0, BLOCK)
        remaining = count  # active clusters: neither merged into another nor retired
        top = 0  # chain length
        start = 0  # no active cluster lies below it
        while remaining > 1:
            if top == 0:
                while tl.load(active + start) == 0:
                    start += 1
                tl.store(chain, start)
                top = 1
                tl.debug_barrier()
            a = tl.load(chain + top - 1)
            previous = tl.load(chain + top - 2, mask=top >= 2, other=-1)
            best = tl.full((), float("inf"), tl.float64)
            nearest = a
            for block in range(0, count, BLOCK):
                columns = block + offsets
                inside = columns < count
                alive = tl.load(active + columns, mask=inside, other=0) != 0
                values = tl.load(distances + a * stride + columns, mask=inside & alive & (columns != a),
                                 other=float("inf"))
                low = tl.min(values, axis=0)
                first = tl.min(tl.where(values == low, columns, count), axis=0)
                better = low < best
                nearest = tl.where(better, first, nearest)
                best = tl.where(better, low, best)
            if previous >= 0:
                if tl.load(distances + a * stride + previous) == best:
                    nearest = previous
            if best >= threshold:  # also when no other cluster is active (best is inf)
                for position in range(0, top):
                    tl.store(active + tl.load(chain + position), 0)
                remaining -= top
                top = 0
            elif nearest == previous:
                keep = tl.minimum(a, previous)
                gone = tl.maximum(a, previous)
                size_a = tl.load(sizes + a)
                size_b = tl.load(sizes + previous)
                total = size_a + size_b
                for block in range(0, count, BLOCK):
                    columns = block + offsets
                    inside = columns < count
                    alive = tl.load(active + columns, mask=inside, other=0) != 0
                    row_a = tl.load(distances + a * stride + columns, mask=inside, other=0.0)
                    row_b = tl.load(distances + previous * stride + columns, mask=inside, other=0.0)
                    merged = (size_a * row_a + size_b * row_b) / total
                    tl.store(distances + keep * stride + columns, merged, mask=inside & alive)
                    tl.store(distances + columns * stride + keep, merged, mask=inside & alive)
                tl.store(active + gone, 0)
                tl.store(sizes + keep, total)
                tl.store(parent + gone, keep)
                remaining -= 1
                top -= 2
            else:
                tl.store(chain + top, nearest)
                top += 1
            tl.debug_barrier()

    return average_linkage


def triton_average_linkage(distances: torch.Tensor, threshold: float) -> torch.Tensor:
    """Average-linkage partition of each target, merging while the distance is below ``threshold``.

    Parameters
    ----------
    distances : torch.Tensor
        ``(B, N, N)`` float64 symmetric distances, contiguous; overwritten (the kernel's
        workspace).
    threshold : float
        ``1 - tau``.

    Returns
    -------
    torch.Tensor
        ``(B, N)`` int64 labels ``0..K_b-1`` on the distances' device.
    """
    batch, count = distances.shape[:2]
    device = distances.device
    if count < 2:
        return torch.zeros(batch, count, dtype=torch.int64, device=device)
    if distances.dtype != torch.float64 or not distances.is_contiguous():
        raise ValueError("the Triton clustering needs contiguous float64 distances")
    sizes = torch.ones(batch, count, dtype=torch.float64, device=device)
    active = torch.ones(batch, count, dtype=torch.int32, device=device)
    chain = torch.zeros(batch, count, dtype=torch.int32, device=device)
    parent = torch.arange(count, dtype=torch.int32, device=device).repeat(batch, 1)
    limit = torch.full((1,), threshold, dtype=torch.float64, device=device)  # a fill: no host copy, no sync
    _kernel()[(batch,)](distances, sizes, active, chain, parent, count, limit, **launch_options(count))
    return _labels(parent.long())


def launch_options(count: int) -> dict:
    """The kernel's block, warps and compiler options for targets of ``count`` patches: a block
    of the next power of two up to :data:`BLOCK_LIMIT`, and no floating-point fusion."""
    block = min(BLOCK_LIMIT, 1 << (count - 1).bit_length())
    return {"BLOCK": block, "num_warps": 8 if block >= 1024 else 4, "enable_fp_fusion": False}


def _labels(parent: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` labels ``0..K-1`` numbered by each cluster's smallest patch, from the ``(B, N)``
    parent of each patch (a merged cluster's parent is the cluster it went into; roots point at
    themselves), without a host read: pointer doubling reaches every root in ``log2 N`` steps."""
    roots = parent
    for _ in range(math.ceil(math.log2(parent.shape[1])) + 1):
        roots = roots.gather(1, roots)
    present = torch.zeros_like(roots).scatter_(1, roots, 1)
    return (present.cumsum(1) - 1).gather(1, roots)
