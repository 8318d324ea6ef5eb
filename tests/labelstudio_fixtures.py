"""Shared pieces of the Label Studio backend tests: a small segmenter, a static file server, configs."""

from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TARGETS = sorted((EXAMPLES / "targets").glob("*.png"))
IMAGE_SIZE = 128
SVD_COMPONENTS = 16
LABEL = "Disk"
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


def small_segmenter(backbone):
    """A fast segmenter on the bundled test backbone."""
    from insid3_core import EngineConfig, Segmenter

    return Segmenter(backbone, EngineConfig(image_size=IMAGE_SIZE, svd_components=SVD_COMPONENTS))


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
    def log_message(self, *_) -> None:
        pass


def iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two bool masks (1 when both are empty)."""
    union = np.logical_or(first, second).sum()
    return 1.0 if union == 0 else float(np.logical_and(first, second).sum() / union)
