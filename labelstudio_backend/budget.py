"""A bound on the pixels of decoded images that all requests hold at once, and giving the memory back.

``INSID3_MAX_PIXELS`` bounds one image; without a bound across requests, four concurrent
98-megapixel tasks held 6.7 GB. A request takes its images' pixels from a :class:`PixelBudget`
through a :class:`Lease` before decoding them and gives them back when it answers; a request that
would exceed the budget waits for others to finish, then gets a 503 with ``Retry-After``.

glibc keeps freed blocks of this size in its arenas (one per thread), so after a large image the
process stays large; :func:`release_memory` asks it to hand free pages back (``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time

from .errors import BackendError

RETRY_AFTER = 10


class PixelBudget:
    """Pixels that may be decoded and held at once, shared by every request.

    Parameters
    ----------
    limit : int
        ``INSID3_MAX_PIXELS_IN_FLIGHT``.
    wait_seconds : float
        ``INSID3_DECODE_WAIT``: how long a request waits for pixels before its 503.
    """

    def __init__(self, limit: int, wait_seconds: float) -> None:
        self.limit = limit
        self.wait_seconds = wait_seconds
        self.used = 0
        self._changed = threading.Condition()

    def take(self, pixels: int, what: str, held: int = 0, wait: float | None = None) -> None:
        """Hold ``pixels`` (``what`` names them in errors), waiting at most ``wait`` seconds (``None``:
        ``wait_seconds``); a 503 :class:`BackendError` when they stay taken, a 413 at once when they
        and the ``held`` pixels of the same request could never fit in the budget."""
        if held + pixels > self.limit:
            raise BackendError(f"{what}: {held + pixels} pixels in one request exceed "
                               f"INSID3_MAX_PIXELS_IN_FLIGHT={self.limit}", 413)
        with self._changed:
            if not self._changed.wait_for(lambda: self.used + pixels <= self.limit,
                                          timeout=self.wait_seconds if wait is None else wait):
                raise BackendError(
                    f"{what}: {pixels} pixels would exceed INSID3_MAX_PIXELS_IN_FLIGHT={self.limit} "
                    f"(images other requests are decoding); retry in {RETRY_AFTER} s", 503, retry_after=RETRY_AFTER)
            self.used += pixels

    def give(self, pixels: int) -> None:
        """Return ``pixels`` taken by :meth:`take`."""
        with self._changed:
            self.used -= pixels
            self._changed.notify_all()


class Lease:
    """The pixels one request holds and the deadline of its downloads; a context manager that
    returns the pixels (and the memory) at exit.

    Parameters
    ----------
    budget : PixelBudget
    seconds : float
        ``INSID3_DOWNLOAD_SECONDS``: all of the request's downloads end within it.
    wait : float or None
        Seconds a :meth:`take` waits for pixels; ``None``: the budget's ``wait_seconds``.
    """

    def __init__(self, budget: PixelBudget, seconds: float = float("inf"), wait: float | None = None) -> None:
        self.budget = budget
        self.wait = wait
        self.pixels = 0
        self.deadline = time.monotonic() + seconds
        self._lock = threading.Lock()  # the request's downloads run in threads of their own

    def take(self, pixels: int, what: str) -> None:
        """Hold ``pixels`` more for this request (see :meth:`PixelBudget.take`); ``what`` names
        them in the error."""
        with self._lock:
            self.budget.take(pixels, what, held=self.pixels, wait=self.wait)
            self.pixels += pixels

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *_) -> None:
        held, self.pixels = self.pixels, 0
        if held:
            self.budget.give(held)
            release_memory()


def release_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
