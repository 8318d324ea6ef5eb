"""The error the web app turns into an HTTP response with a clear message."""

from __future__ import annotations


class BackendError(Exception):
    """A request the backend cannot serve; ``status`` is the HTTP status to answer with.

    Parameters
    ----------
    message : str
        Shown to the Label Studio user as is.
    status : int
        HTTP status code (4xx for the caller's problem, 5xx for ours or an upstream one).
    retry_after : int or None
        Seconds after which the request may succeed (sent as ``Retry-After``), for a 503.
    """

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


def body_too_large(limit: int) -> str:
    """The message of a 413 for a request body above ``limit`` bytes (``INSID3_MAX_REQUEST_BYTES``)."""
    return f"the request body is above INSID3_MAX_REQUEST_BYTES={limit} bytes"
