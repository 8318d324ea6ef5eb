"""Background jobs that prepare a project's references, so no HTTP request outlives Label Studio's timeouts.

Reading a large project's annotations and encoding them can take minutes; ``/setup`` (3 s
timeout in Label Studio) starts that work here and ``/predict`` (100 s) waits for it only a
bounded time. A few daemon threads run the jobs (``concurrent.futures``' pool would hold the
process open at exit until a long job ends), and a key has at most one job waiting: a burst of
webhooks costs no thread and no job more.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future

log = logging.getLogger(__name__)
WORKERS = 2


class Warmups:
    """The latest job per key (a project id), run by ``workers`` daemon threads."""

    def __init__(self, workers: int = WORKERS) -> None:
        self._jobs: dict[Hashable, Future] = {}
        self._waiting: dict[Hashable, list] = {}  # key -> [job] of its queued job, swapped for newer work
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, name=f"insid3-warmup-{i}", daemon=True)
                         for i in range(workers)]

    def start(self, key: Hashable, job: Callable[[], object], replace: bool = False) -> Future:
        """The job pending for ``key``, or ``job`` queued now when none is pending or ``replace`` is set.

        A replacing job takes the place of a queued one (which then runs ``job``), or is queued
        behind a running one; either way it is the one later callers wait for.
        """
        with self._lock:
            current = self._jobs.get(key)
            if current is not None and not current.done():
                if not replace:
                    return current
                holder = self._waiting.get(key)
                if holder is not None:
                    holder[0] = job
                    return current
            future: Future = Future()
            holder = [job]
            self._jobs[key], self._waiting[key] = future, holder
            for worker in self._workers:
                if not worker.is_alive() and worker.ident is None:
                    worker.start()
        self._queue.put((key, future, holder))
        return future

    def running(self) -> list:
        """Keys whose latest job has not finished."""
        with self._lock:
            return [key for key, future in self._jobs.items() if not future.done()]

    def _work(self) -> None:
        while True:
            key, future, holder = self._queue.get()
            with self._lock:
                if self._waiting.get(key) is holder:
                    del self._waiting[key]
                job = holder[0]
            future.set_running_or_notify_cancel()
            try:
                future.set_result(job())
            except BaseException as err:  # handed to whoever waits on the future
                log.warning("preparing references for %s failed: %s", key, getattr(err, "message", err))
                future.set_exception(err)
