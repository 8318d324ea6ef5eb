"""The waitress server of ``insid3 labelstudio serve``: its threads and bounds, and its own
answers in JSON like the app's.

waitress answers some requests before the app sees them: a declared body above
``max_request_body_size`` (``INSID3_MAX_REQUEST_BYTES``), a malformed request line, headers or
chunked body. Its answer is text/plain, and waitress has no option for that body; here its
channel's ``error_task_class`` writes the ``{"error": message}`` every other answer of the
backend has (:mod:`labelstudio_backend.app`), so Label Studio and scripts read one format.
"""

from __future__ import annotations

import json

from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from .app import create_app
from .errors import body_too_large
from .turns import Turns

CONNECTIONS_BEYOND_THREADS = 64  # open connections waitress keeps beyond its threads (idle keep-alives, /health)
IDLE_SECONDS = 20  # a connection that sent no complete request for this long is closed (waitress: 120)


class JSONErrorTask(ErrorTask):
    """waitress's refusal of a request as ``{"error": message}`` (the connection then closes, as waitress does)."""

    def execute(self):
        error = self.request.error
        message = body_too_large(self.channel.server.adj.max_request_body_size) if error.code == 413 \
            else f"{error.reason}: {error.body}"
        body = json.dumps({"error": message}).encode("utf-8")
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JSONErrorChannel(HTTPChannel):
    """waitress's connection, its refusals written by :class:`JSONErrorTask`."""

    error_task_class = JSONErrorTask


def backend_server(backend, threads: int, host: str, port: int):
    """The waitress server of ``backend`` on ``host:port`` (one listener per address ``host``
    resolves to), not yet serving (``run()`` serves): ``threads`` work requests at once,
    ``INSID3_MAX_QUEUED_REQUESTS`` waiting, and a thread beyond them for ``/health`` and
    refusals; its connections are :class:`JSONErrorChannel`."""
    settings = backend.settings
    turns = Turns(threads, settings.max_queued_requests, settings.queue_wait)
    served_at_once = threads + settings.max_queued_requests + 1
    listeners = {}
    server = create_server(create_app(backend, turns), map=listeners, host=host, port=port, threads=served_at_once,
                           connection_limit=served_at_once + CONNECTIONS_BEYOND_THREADS, ident="insid3",
                           max_request_body_size=settings.max_request_bytes, channel_timeout=IDLE_SECONDS,
                           cleanup_interval=5)
    for listener in listeners.values():
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = JSONErrorChannel
    return server
