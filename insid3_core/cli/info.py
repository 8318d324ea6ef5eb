"""``insid3 info``: versions, the device ``auto`` resolves to, the cache and the weights."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

from .. import __version__
from ..backbone import resolve_device
from ..config import SMOKE_TEST_NOTE, cache_dir, env_setting
from . import UsageError


def register(commands) -> None:
    """Add ``info`` to the ``insid3`` sub-commands (entry point ``insid3.commands``)."""
    info = commands.add_parser("info", help="print versions, device and cache location")
    info.add_argument("--device", default=None, help="device to resolve (default auto; INSID3_DEVICE)")
    info.set_defaults(handler=run_info)


def run_info(arguments: argparse.Namespace) -> int:
    import numpy
    import PIL
    import scipy
    import timm
    import torch

    from ..clustering import clustering_method

    device = resolve_device(arguments.device or env_setting("device", "auto"))
    clustering = env_setting("clustering", "auto")
    try:
        resolved = clustering_method(clustering, device)
    except ValueError as err:
        raise UsageError(f"INSID3_CLUSTERING: {err}") from None
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
        "clustering": f"{resolved} ({clustering} on {device.type}; INSID3_CLUSTERING)",
        "cache": str(cache_dir()),
        "weights": env_setting("weights") or f"(none: the {SMOKE_TEST_NOTE})",
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
