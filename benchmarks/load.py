"""Concurrent ``/predict`` requests against ``insid3 labelstudio serve`` on loopback.

Starts the backend as its own process (the bundled test checkpoint unless ``--weights``), an image
host in this process serving the example targets (or one generated image of ``--megapixels``),
then sends ``--requests`` predictions at once, each of one task, while a thread asks ``/health``
every 50 ms. Prints latency percentiles, statuses, the slowest ``/health`` answer, and the
server's RSS before, at its peak and after; the last line is the p50 under load as a ratio of
one request alone, measured first in the same run.

    python benchmarks/load.py --requests 200
    python benchmarks/load.py --requests 4 --megapixels 98   # the pixel budget at work
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Disk"/></BrushLabels></View>"""


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *_):
        pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def image_folder(folder: Path, megapixels: float) -> list[str]:
    """Served file names: the example targets, or one JPEG of ``megapixels``."""
    if not megapixels:
        for path in (ROOT / "examples" / "targets").glob("*.png"):
            shutil.copy(path, folder / path.name)
        return sorted(path.name for path in folder.glob("*.png"))
    side = int((megapixels * 1e6) ** 0.5)
    with Image.open(ROOT / "examples" / "targets" / "scene_01.png") as scene:
        tile = np.asarray(scene.convert("RGB"))
    rows, columns = side // tile.shape[0] + 1, side // tile.shape[1] + 1
    Image.fromarray(np.tile(tile, (rows, columns, 1))[:side, :side]).save(folder / "big.jpg", quality=85)
    return ["big.jpg"]


def start_backend(arguments, workdir: Path, image_host: str) -> tuple[subprocess.Popen, str]:
    references = workdir / "references" / "Disk"
    references.mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "reference" / "disks.png", references / "disks.png")
    shutil.copy(ROOT / "examples" / "reference" / "disks_mask.png", references / "disks_mask.png")
    port = free_port()
    environment = {**os.environ, "LABEL_STUDIO_URL": image_host, "MODEL_DIR": str(workdir / "model"),
                   "INSID3_REFERENCE_DIR": str(workdir / "references"), "LABEL_STUDIO_API_KEY": ""}
    command = [sys.executable, "-m", "labelstudio_backend", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--threads", str(arguments.threads), "--image-size", str(arguments.image_size), "--device", "cpu"]
    if arguments.weights:
        command += ["--weights", arguments.weights]
    log = open(workdir / "backend.log", "w")
    process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the backend exited: {(workdir / 'backend.log').read_text()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return process, url
        except requests.RequestException:
            time.sleep(0.5)
    raise SystemExit("the backend did not answer /health within 300 s")


def predict(url: str, image: str) -> tuple[float, int]:
    started = time.perf_counter()
    body = {"tasks": [{"id": 1, "data": {"image": f"/data/upload/{image}"}}], "project": "1.1", "label_config": CONFIG}
    try:
        status = requests.post(url + "/predict", json=body, timeout=600).status_code
    except requests.RequestException:
        status = 0
    return time.perf_counter() - started, status


class Watch:
    """``/health`` every 50 ms and the server's peak RSS, in a thread, until stopped."""

    def __init__(self, url: str, process: psutil.Process) -> None:
        self.url, self.process = url, process
        self.slowest_health, self.health_failures, self.peak_rss = 0.0, 0, process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.is_set():
            started = time.perf_counter()
            try:
                if requests.get(self.url + "/health", timeout=10).status_code != 200:
                    self.health_failures += 1
            except requests.RequestException:
                self.health_failures += 1
            self.slowest_health = max(self.slowest_health, time.perf_counter() - started)
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            self.done.wait(0.05)


def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(values, share)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8, help="serve --threads")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--megapixels", type=float, default=0, help="serve one generated image this large")
    parser.add_argument("--alone", type=int, default=5, help="requests sent one by one first (the baseline)")
    parser.add_argument("--waves", type=int, default=2, help="rounds of --requests (memory that grows each wave leaks)")
    parser.add_argument("--weights", help="a DINOv3 checkpoint (default: the bundled test checkpoint)")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        uploads = workdir / "data" / "upload"  # Label Studio's route of uploaded files
        uploads.mkdir(parents=True)
        images = image_folder(uploads, arguments.megapixels)
        host = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(workdir)))
        threading.Thread(target=host.serve_forever, daemon=True).start()
        process, url = start_backend(arguments, workdir, f"http://127.0.0.1:{host.server_address[1]}")
        try:
            server = psutil.Process(process.pid)
            alone = [predict(url, images[i % len(images)]) for i in range(arguments.alone + 1)][1:]  # first warms up
            waves = [wave(url, server, images, arguments.requests) for _ in range(arguments.waves)]
        finally:
            process.terminate()
            process.wait(timeout=30)
            host.shutdown()

    alone_p50 = statistics.median(seconds for seconds, _ in alone) if alone else float("nan")
    print(f"{arguments.requests} concurrent /predict per wave, one task each, serve --threads {arguments.threads}, "
          f"{'examples' if not arguments.megapixels else f'{arguments.megapixels:g} MP JPEG'}, image size "
          f"{arguments.image_size}; one request alone: p50 {alone_p50:.3f} s")
    print("| wave | p50 | p95 | p99 | max | statuses | errors | slowest /health | RSS before | RSS peak | RSS after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for number, row in enumerate(waves, 1):
        print(f"| {number} | " + " | ".join(row["cells"]) + " |")
    errors = sum(row["errors"] for row in waves)
    print(f"p50_vs_alone={waves[-1]['p50'] / alone_p50:.1f} alone_p50={alone_p50:.3f}s errors={errors}")


def wave(url: str, server: psutil.Process, images: list[str], count: int) -> dict:
    """``count`` predictions at once while :class:`Watch` runs; the table cells of the wave."""
    rss_before = server.memory_info().rss
    watch = Watch(url, server)
    watch.thread.start()
    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda i: predict(url, images[i % len(images)]), range(count)))
    time.sleep(1.0)
    watch.done.set()
    watch.thread.join()
    rss_after = server.memory_info().rss
    latencies = [seconds for seconds, status in results if status == 200]
    statuses: dict[int, int] = {}
    for _, status in results:
        statuses[status] = statuses.get(status, 0) + 1
    errors = count - statuses.get(200, 0)
    mib = 2**20
    cells = [f"{percentile(latencies, share):.2f} s" for share in (50, 95, 99)] + [
        f"{max(latencies, default=float('nan')):.2f} s", str(dict(sorted(statuses.items()))), str(errors),
        f"{watch.slowest_health * 1000:.0f} ms ({watch.health_failures} failed)",
        f"{rss_before / mib:.0f} MiB", f"{watch.peak_rss / mib:.0f} MiB", f"{rss_after / mib:.0f} MiB"]
    return {"cells": cells, "errors": errors, "p50": percentile(latencies, 50)}


if __name__ == "__main__":
    main()
