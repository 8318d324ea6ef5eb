"""The waitress server of ``insid3 labelstudio serve``, whose own answers are JSON like the app's.

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

from .errors import body_too_large


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


def backend_server(app, **options):
    """``waitress.create_server(app, **options)`` (one server per address ``host`` resolves to),
    its connections :class:`JSONErrorChannel`; not yet serving (``run()`` serves)."""
    listeners = {}
    server = create_server(app, map=listeners, **options)
    for listener in listeners.values():
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = JSONErrorChannel
    return server
