"""``insid3 info``: versions, the device and clustering the settings resolve to, the cache and
the weights, read as ``insid3 segment`` reads them (flags, ``--settings``, ``INSID3_*``,
``INSID3_SETTINGS``), so what it reports is what a run would use, refusals included."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform

from .. import __version__
from ..backbone import resolve_device
from ..config import SMOKE_TEST_NOTE, cache_dir
from ..settings import EngineSettings, variable


def register(commands) -> None:
    """Add ``info`` to the ``insid3`` sub-commands (entry point ``insid3.commands``)."""
    info = commands.add_parser("info", help="print versions, device and cache location")
    info.add_argument("--device", default=None, help="device to resolve (default auto; INSID3_DEVICE)")
    info.add_argument("--clustering", default=None, help="clustering to resolve (default auto; INSID3_CLUSTERING)")
    info.add_argument("--settings", metavar="FILE", help="engine options from a JSON file, as segment reads them")
    info.set_defaults(handler=run_info)


def run_info(arguments: argparse.Namespace) -> int:
    import numpy
    import PIL
    import scipy
    import timm
    import torch

    settings = EngineSettings.from_arguments(arguments)
    device = resolve_device(settings.device)
    clustering = settings.clustering_on_device()
    settings_files = [arguments.settings, os.environ.get(variable("settings"))]
    lines = {
        "insid3": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "triton": _version("triton"),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "pillow": PIL.__version__,
        "cuda available": torch.cuda.is_available(),
        "device": str(device),
        "clustering": f"{clustering} ({settings.clustering} on {device.type}; INSID3_CLUSTERING)",
        "settings": ", ".join(path for path in settings_files if path) or "(no file)",
        "cache": str(cache_dir()),
        "weights": settings.weights or settings.backbone or f"(none: the {SMOKE_TEST_NOTE})",
    }
    if torch.cuda.is_available():
        lines["gpu"] = torch.cuda.get_device_name()
    for key, value in lines.items():
        print(f"{key:15} {value}")
    return 0


def _version(distribution: str) -> str:
    """An installed distribution's version, read without importing it (importing triton is slow)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"
