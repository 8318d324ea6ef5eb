"""Turns for the work routes, so a full house never takes the thread that answers ``/health``.

waitress serves requests on a fixed pool of threads in arrival order; when every thread holds a
request that waits (a slow image, the model), ``/health`` waits too and Label Studio marks the
backend as down. The server therefore runs more threads than the work it allows: ``running``
work requests at once, ``waiting`` more waiting for a turn (a thread each, idle), and one more
request beyond those is refused at once with a 503, which keeps a thread free to answer the
routes that do no work.
"""

from __future__ import annotations

import threading

from .errors import BackendError

RETRY_AFTER = 5


class Turns:
    """At most ``running`` work requests at once, ``waiting`` more in line for ``wait`` seconds at most.

    Parameters
    ----------
    running : int
        Work requests served at once (``serve --threads``).
    waiting : int
        ``INSID3_MAX_QUEUED_REQUESTS``: requests waiting for a turn.
    wait : float
        ``INSID3_QUEUE_WAIT``: seconds a request waits for its turn before its 503.
    """

    def __init__(self, running: int, waiting: int, wait: float) -> None:
        self.running, self.waiting, self.wait = running, waiting, wait
        self._turns = threading.BoundedSemaphore(running)
        self._lock = threading.Lock()
        self._inside = 0

    def take(self) -> None:
        """Wait for a turn; a 503 :class:`BackendError` when the line is full or the wait too long."""
        with self._lock:
            if self._inside >= self.running + self.waiting:
                raise BackendError(f"insid3 is busy ({self.running} requests running, {self.waiting} waiting); "
                                   f"retry in {RETRY_AFTER} s", 503, retry_after=RETRY_AFTER)
            self._inside += 1
        if not self._turns.acquire(timeout=self.wait):
            self._leave()
            raise BackendError(f"insid3 is busy: no turn within INSID3_QUEUE_WAIT={self.wait:g} s; "
                               f"retry in {RETRY_AFTER} s", 503, retry_after=RETRY_AFTER)

    def give_back(self) -> None:
        """End a turn taken by :meth:`take`."""
        self._turns.release()
        self._leave()

    def _leave(self) -> None:
        with self._lock:
            self._inside -= 1
