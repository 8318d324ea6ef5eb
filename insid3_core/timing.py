"""Per-stage wall-clock times of the engine, for benchmarks and profiling."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulate seconds per named stage, synchronising the stage's stream around it.

    Synchronising serialises host and device work, so a timed run is slower than an
    untimed one; use it to see where time goes, not to measure throughput. Stages may run
    in several threads at once (their seconds then add up to more than the wall time). On a
    GPU a stage waits for its own thread's current stream only: a device-wide
    synchronisation would wait for other threads' work, and fails while another thread
    captures a CUDA graph (the clustering does), whatever the capture mode.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @contextmanager
    def stage(self, name: str, device: bool = True):
        """Time the block as stage ``name``; ``device=False`` for a stage of host work only,
        which then does not wait for device work queued on its thread's stream before it."""
        if device:
            self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if device:
                self._synchronize()
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[name] += elapsed
