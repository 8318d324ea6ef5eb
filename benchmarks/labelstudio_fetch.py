"""Label Studio backend: the task images of one request, downloaded one after another or at once.

A loopback server stands for Label Studio's file route (or an object store behind it): each
answer waits ``--latency`` seconds, then sends a 1280x960 JPEG (an example scene, upscaled).
In one process, for the same addresses and the same :class:`~labelstudio_backend.images.ImageFetcher`:

(a) baseline: ``fetcher.fetch`` of each address in turn (the backend before ``fetch_all``);
(b) ``fetcher.fetch_all``: up to ``FETCH_THREADS`` downloads and decodes at once.

Prints each one's seconds per request and ``speedup=<a / b>``.

Example::

    python benchmarks/labelstudio_fetch.py --tasks 8 --latency 0.1 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labelstudio_backend.credentials import Credentials  # noqa: E402
from labelstudio_backend.images import FETCH_THREADS, ImageFetcher  # noqa: E402


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=8, help="tasks per request (INSID3_MAX_TASKS_PER_REQUEST)")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds before each answer")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def scene_jpeg() -> bytes:
    scene = sorted((ROOT / "examples" / "targets").glob("*.png"))[0]
    buffer = io.BytesIO()
    Image.open(scene).convert("RGB").resize((1280, 960), Image.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def serve(body: bytes, latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def seconds(function, repeats: int) -> float:
    """The fastest of ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    server = serve(scene_jpeg(), arguments.latency)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    fetcher = ImageFetcher(Credentials(base, "benchmark-key"))
    addresses = [f"{base}/data/upload/1/target_{index:03d}.jpg" for index in range(arguments.tasks)]

    def one_after_another() -> None:
        with fetcher.lease() as lease:
            assert all(fetcher.fetch(address, lease).size == (1280, 960) for address in addresses)

    def at_once() -> None:
        with fetcher.lease() as lease:
            assert all(image.size == (1280, 960) for image in fetcher.fetch_all(addresses, lease))

    try:
        print(f"# {arguments.tasks} tasks of 1280x960 JPEG, {arguments.latency} s latency each, "
              f"FETCH_THREADS={FETCH_THREADS}, best of {arguments.repeats}")
        baseline = seconds(one_after_another, arguments.repeats)
        parallel = seconds(at_once, arguments.repeats)
        print(f"one_after_another seconds={baseline:.3f}")
        print(f"fetch_all seconds={parallel:.3f}")
        print(f"speedup={baseline / parallel:.2f}")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
