"""A real Label Studio 1.23 server for the end-to-end tests, and the backend served over HTTP."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
STARTUP_SECONDS = 240


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def label_studio_executable() -> Path | None:
    """``label-studio`` beside the running interpreter, when installed."""
    candidate = Path(sys.executable).parent / "label-studio"
    return candidate if candidate.is_file() else None


class LabelStudio:
    """``label-studio start`` on a free 127.0.0.1 port with a fresh data dir; stopped by :meth:`stop`.

    Attributes
    ----------
    url : str
    files : Path
        Document root of local-files storage.
    session : requests.Session
        Authenticated with the admin's legacy token.
    """

    def __init__(self, data_dir: Path) -> None:
        self.files = data_dir / "files"
        self.files.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = dict(
            os.environ,
            HOME=str(data_dir),
            LABEL_STUDIO_BASE_DATA_DIR=str(data_dir / "data"),
            SECRET_KEY="insid3-tests-fixed-secret-key",
            ML_BLOCK_LOCAL_IP="false",
            SSRF_PROTECTION_ENABLED="false",
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(self.files),
        )
        self.log = open(data_dir / "label-studio.log", "wb")
        self.process = subprocess.Popen(
            [str(label_studio_executable()), "start", "--no-browser", "--internal-host", "127.0.0.1",
             "-p", str(self.port), "--data-dir", str(data_dir / "data"), "--username", "lead@example.com",
             "--password", "insid3-pass", "--user-token", LEGACY_TOKEN, "--enable-legacy-api-token"],
            env=environment, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {LEGACY_TOKEN}"

    def wait_ready(self) -> None:
        """Block until ``/health`` answers and the API accepts the token."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self.process.returncode}; see {self.log.name}")
            try:
                if self.session.get(f"{self.url}/api/projects/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise RuntimeError(f"label-studio did not start within {STARTUP_SECONDS} s; see {self.log.name}")

    def api(self, method: str, path: str, **kwargs):
        """JSON answer of an API call; raises on an HTTP error."""
        response = self.session.request(method, f"{self.url}{path}", timeout=300, **kwargs)
        assert response.status_code < 400, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else None

    @functools.cached_property
    def personal_access_token(self) -> str:
        """The admin's personal access token (a JWT refresh token; Label Studio allows one)."""
        return self.api("POST", "/api/token/")["token"]

    def stop(self) -> None:
        """Stop the server and its children."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


class BackendServer:
    """A backend served by waitress, as ``insid3 labelstudio serve`` serves it, on a free 127.0.0.1 port in a thread."""

    def __init__(self, backend, threads: int = 4) -> None:
        from labelstudio_backend.server import backend_server

        self.server = backend_server(backend, threads, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "BackendServer":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        from waitress import wasyncore

        # closed from the server's own loop thread, keep-alive connections included
        try:
            self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self.server._map))
        except OSError:  # the trigger's raw pipe fd was closed under it (another library's stale close
            # in this test process, seen once after the FiftyOne App tests): close from here instead
            wasyncore.close_all(self.server._map, ignore_all=True)
        self.thread.join(timeout=10)
        self.server.task_dispatcher.shutdown()
