"""Shared pieces of the Label Studio backend tests: a small segmenter, a static file server, configs."""

from __future__ import annotations

import functools
import io
import time
import urllib.parse
import shutil
import ssl
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from data import EXAMPLES

TARGETS = sorted((EXAMPLES / "targets").glob("*.png"))
IMAGE_SIZE = 128
SVD_COMPONENTS = 16
LABEL = "Disk"
UPLOADS = "/data/upload"
"""Label Studio's route of uploaded files: task images on its origin are fetched below it."""
BRUSH_CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="{LABEL}" background="#ff0000"/>
    <Label value="Other" background="#0000ff"/>
  </BrushLabels>
</View>"""
CHOICES_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="choice" toName="image"><Choice value="A"/></Choices>
</View>"""


def insid3_parser():
    """A parser shaped like ``insid3``'s, with the ``labelstudio`` commands registered as the entry point would."""
    import argparse

    from labelstudio_backend.commands import register

    parser = argparse.ArgumentParser(prog="insid3")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def small_segmenter(backbone, quality=None):
    """A fast segmenter on the bundled test backbone (``quality``: its ``QualityThresholds``)."""
    from insid3_core import EngineConfig, Segmenter
    from insid3_core.quality import QualityThresholds

    return Segmenter(backbone, EngineConfig(image_size=IMAGE_SIZE, svd_components=SVD_COMPONENTS),
                     quality or QualityThresholds())


def verdict_segmenter(backbone):
    """A small segmenter whose thresholds give, with :func:`reference_folder`'s reference, every verdict on
    :func:`verdict_images`: ok, too_large (scene_04), too_small (scene_08), fragmented (tiled), empty (blank)."""
    from insid3_core.quality import QualityThresholds

    return small_segmenter(backbone, QualityThresholds(min_area_ratio=0.03, max_area_ratio=0.2, max_components=1))


def blank_image(path: Path) -> Path:
    """A uniform grey image: nothing in it matches a reference, so its mask is empty."""
    Image.new("RGB", (200, 150), (128, 128, 128)).save(path)
    return path


def tiled_image(path: Path) -> Path:
    """``scene_01`` beside its mirror image: the object found twice, a mask of two components."""
    with Image.open(TARGETS[0]) as scene:
        scene = scene.convert("RGB")
        tiled = Image.new("RGB", (scene.width * 2, scene.height))
        tiled.paste(scene, (0, 0))
        tiled.paste(scene.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (scene.width, 0))
    tiled.save(path)
    return path


def verdict_images(folder: Path) -> list[Path]:
    """The example targets, a tiled scene and a blank image, copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = [Path(shutil.copy(path, folder / path.name)) for path in TARGETS]
    return copies + [tiled_image(folder / "tiled.png"), blank_image(folder / "blank.png")]


def brush_region(mask: np.ndarray, label: str = LABEL) -> dict:
    """A Label Studio ``brushlabels`` result region painting ``mask`` with ``label``."""
    from labelstudio_backend.rle import mask_to_rle

    return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": mask.shape[1],
            "original_height": mask.shape[0], "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def two_disk_scenes(folder: Path, count: int = 1) -> list[Path]:
    """``count`` scenes of two separated striped disks and a checkered square, ``two_disks_<i>.png`` in ``folder``."""
    from scenes import scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image, _ = scene((384, 320), disks=[(100, 160, 60), (290, 170, 60)], squares=[(170, 10, 50)], seed=3 + index)
        paths.append(folder / f"two_disks_{index}.png")
        image.save(paths[-1])
    return paths


def scene_reference_folder(root: Path) -> Path:
    """``root/<LABEL>/`` (a striped disk) and ``root/Other/`` (a checkered square): one scene's two labels."""
    from scenes import scene

    from insid3_core.io import write_mask_png

    image, masks = scene((384, 320), disks=[(150, 160, 80)], squares=[(280, 20, 80)], seed=9)
    for label, mask in ((LABEL, masks["disks"]), ("Other", masks["squares"])):
        (root / label).mkdir(parents=True)
        image.save(root / label / "scene.png")
        write_mask_png(root / label / "scene_mask.png", mask)
    return root


def reference_folder(root: Path) -> Path:
    """``root/<LABEL>/disks.png`` and ``disks_mask.png``: the example reference as a reference folder."""
    folder = root / LABEL
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLES / "reference" / "disks.png", folder / "disks.png")
    shutil.copy(EXAMPLES / "reference" / "disks_mask.png", folder / "disks_mask.png")
    return root


class StaticServer:
    """Serve ``directory`` on a free 127.0.0.1 port in a thread (a stand-in for an image host)."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StaticServer":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    """Files of the directory, at their path or below :data:`UPLOADS` (as Label Studio serves uploads)."""

    def translate_path(self, path: str) -> str:
        return super().translate_path(path.removeprefix(UPLOADS))

    def log_message(self, *_) -> None:
        pass


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


class Listener:
    """An HTTP server on ``host`` recording every request (the routes also below :data:`UPLOADS`):
    ``/x.png`` an image, ``/to?<location>`` a
    302 to that location (sent as is), ``/drip`` 1000 bytes one every 50 ms, ``/slow-headers`` its
    headers one byte every 50 ms, ``/status?<code>`` that status with a body, ``/unsized?<n>``
    ``n`` bytes with no ``Content-Length`` (the body ends where the connection does), ``/text`` a
    200 that is not an image, ``/together?<n>&...`` the image once ``n`` such requests are in
    (a 503 when they are not within 5 s), ``/late?<seconds>&...`` the image after ``seconds``.
    With a server ``context`` it speaks https."""

    def __init__(self, host: str, context: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.host_headers: list[str | None] = []
        self.dripped = 0
        self.barriers: dict[int, threading.Barrier] = {}
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def send_image(self):
                body = png_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                listener.requests.append((self.path, self.headers.get("Authorization")))
                listener.host_headers.append(self.headers.get("Host"))
                path = self.path.removeprefix(UPLOADS)
                if path.startswith("/to?"):
                    self.send_response(302)
                    self.send_header("Location", urllib.parse.unquote(path[4:]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.drip(b"x" * 1000)
                elif path == "/slow-headers":
                    self.drip(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Padding: " + b"p" * 1000 + b"\r\n\r\n")
                elif path.startswith("/status?"):
                    body = b"<html>internal details of the image server</html>"
                    self.send_response(int(path[8:].split("&")[0]))
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif path.startswith("/unsized?"):
                    self.send_response(200)
                    self.end_headers()
                    try:
                        self.wfile.write(b"x" * int(path[9:]))
                    except OSError:
                        pass
                elif path.startswith("/together?"):
                    parties = int(path[10:].split("&")[0])
                    try:
                        listener.barriers.setdefault(parties, threading.Barrier(parties, timeout=5)).wait()
                    except threading.BrokenBarrierError:
                        self.send_response(503)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_image()
                elif path.startswith("/late?"):
                    time.sleep(float(path[6:].split("&")[0]))
                    self.send_image()
                elif path == "/text":
                    body = b"not an image"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_image()

            def drip(self, data: bytes) -> None:
                try:
                    for byte in data:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        listener.dripped += 1
                        time.sleep(0.05)
                except OSError:
                    pass

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.authority = f"{host}:{self.server.server_address[1]}"
        self.url = f"{'https' if context else 'http'}://{self.authority}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def self_signed_certificate(folder: Path, name: str) -> Path:
    """A PEM file holding a key and a self-signed certificate for the DNS name ``name`` (valid a day)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    path = folder / f"{name}.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
                     + certificate.public_bytes(serialization.Encoding.PEM))
    return path
