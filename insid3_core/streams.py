"""A CUDA stream per worker thread, so that a thread's device work overlaps the backbone's.

The batch engine runs matching, clustering and aggregation of one batch in a worker thread
while the main thread sends the next batch through the backbone. On a GPU the two would
still run one after the other on the default stream; on their own streams the clustering's
many small kernels and host synchronisations overlap the backbone's large ones. The worker's
stream has a high priority: the clustering's short kernels, each waiting for the one before,
then start as soon as a multiprocessor frees up instead of queueing behind all the blocks of
the backbone's large kernel running at the time. On other devices these helpers do nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch

WORKER_PRIORITY = -1
"""CUDA stream priority of worker threads (lower is higher; the default stream has 0)."""

_local = threading.local()


def device_threads(device: torch.device) -> int:
    """Worker threads that match and cluster batches beside the backbone.

    Two on a GPU: a batch's clustering is a chain of short kernels, each waiting for the one
    before, which leaves the GPU room for a second batch's chain. One elsewhere, where scipy's
    clustering holds the GIL.
    """
    return 2 if device.type == "cuda" else 1


def ready_marker(tensor: torch.Tensor) -> torch.cuda.Event | None:
    """An event marking when ``tensor``, just computed on the current stream, is ready.

    ``None`` for a tensor that is not on a CUDA device.
    """
    if tensor.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(tensor.device))
    return event


@contextlib.contextmanager
def worker_stream(ready: torch.cuda.Event | None, tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Run the block on this thread's own high-priority CUDA stream, after ``ready``.

    ``tensors`` (made on another stream and read in the block; CPU tensors are skipped) are
    recorded on this stream, so that the caching allocator does not hand their memory out
    again while the block's kernels may still read it; the first must be on the GPU. Without
    ``ready`` (not on a GPU) the block runs as is.
    """
    if ready is None:
        yield
        return
    tensors = [tensor for tensor in tensors if tensor.device.type == "cuda"]
    device = tensors[0].device
    streams = _local.__dict__.setdefault("streams", {})
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device, priority=WORKER_PRIORITY)
    stream.wait_event(ready)
    for tensor in tensors:
        tensor.record_stream(stream)
    with torch.cuda.stream(stream):
        yield
