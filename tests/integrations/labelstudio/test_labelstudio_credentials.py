"""Personal access tokens exchanged at ``/api/token/refresh/`` of a real HTTP server on 127.0.0.1:
the access token is fetched once and on request, and every way the exchange fails is a 502
naming Label Studio's answer, never the token."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("requests")

from labelstudio_backend.credentials import Credentials  # noqa: E402
from labelstudio_backend.errors import BackendError  # noqa: E402

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"  # the shape of a PAT


@pytest.fixture
def label_studio():
    """``/api/token/refresh/`` answering as ``server.answer`` says: ``(status, body bytes)``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.refreshes.append((self.path, body))
            status, payload = server.answer
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.refreshes, server.answer = [], (200, b'{"access": "first"}')
    server.url = f"http://127.0.0.1:{server.server_address[1]}/"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_personal_access_token_is_exchanged_once_and_again_on_request(label_studio):
    credentials = Credentials(label_studio.url, TOKEN)
    assert credentials.headers() == credentials.headers() == {"Authorization": "Bearer first"}
    label_studio.answer = (200, b'{"access": "second"}')
    assert credentials.headers(refresh=True) == {"Authorization": "Bearer second"}
    assert label_studio.refreshes == [("/api/token/refresh/", {"refresh": TOKEN})] * 2
    assert Credentials(label_studio.url, "0123abcd").headers() == {"Authorization": "Token 0123abcd"}
    assert Credentials(label_studio.url, "").headers() == {}


@pytest.mark.parametrize("answer, words", [
    ((401, b'{"detail": "Token is invalid or expired"}'), "Label Studio refused LABEL_STUDIO_API_KEY (401 at "
                                                          "/api/token/refresh/)"),
    ((200, b"<html>a proxy's page</html>"), "answered without an access token"),
    ((200, b'{"refresh": "x"}'), "answered without an access token"),
    ((200, b'["access"]'), "answered without an access token"),
])
def test_a_failed_exchange_is_a_502_that_never_shows_the_token(label_studio, answer, words):
    label_studio.answer = answer
    with pytest.raises(BackendError) as failed:
        Credentials(label_studio.url, TOKEN).headers()
    assert failed.value.status == 502 and words in failed.value.message and TOKEN not in failed.value.message


def test_a_label_studio_that_does_not_answer_is_named():
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with pytest.raises(BackendError) as failed:
        Credentials(f"http://127.0.0.1:{port}", TOKEN).headers()
    assert failed.value.status == 502 and f"cannot reach Label Studio at http://127.0.0.1:{port}" in failed.value.message
    assert TOKEN not in failed.value.message
