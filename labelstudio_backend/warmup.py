"""Background jobs that prepare a project's references, so no HTTP request outlives Label Studio's timeouts.

Reading a large project's annotations and encoding them can take minutes; ``/setup`` (3 s
timeout in Label Studio) starts that work here and ``/predict`` (100 s) waits for it only a
bounded time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future

log = logging.getLogger(__name__)


class Warmups:
    """The latest job per key (a project id), each run in its own daemon thread."""

    def __init__(self) -> None:
        self._jobs: dict[Hashable, Future] = {}
        self._lock = threading.Lock()

    def start(self, key: Hashable, job: Callable[[], object], replace: bool = False) -> Future:
        """The job running for ``key``, or ``job`` started now when none runs or ``replace`` is set.

        A replacing job runs beside the one it replaces (the backend's locks serialise their
        effects) and is the one later callers wait for.
        """
        with self._lock:
            current = self._jobs.get(key)
            if current is not None and not current.done() and not replace:
                return current
            future: Future = Future()
            self._jobs[key] = future
        threading.Thread(target=_run, args=(future, job, key), name=f"insid3-warmup-{key}", daemon=True).start()
        return future

    def running(self) -> list:
        """Keys whose latest job has not finished."""
        with self._lock:
            return [key for key, future in self._jobs.items() if not future.done()]


def _run(future: Future, job: Callable[[], object], key: Hashable) -> None:
    future.set_running_or_notify_cancel()
    try:
        future.set_result(job())
    except BaseException as err:  # handed to whoever waits on the future
        log.warning("preparing references for %s failed: %s", key, getattr(err, "message", err))
        future.set_exception(err)
