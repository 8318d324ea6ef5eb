"""``insid3 labelstudio serve|connect|preannotate`` (entry point ``insid3.commands``)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

SERVER_THREADS = 8
SERVED_SETTINGS = "served-engine-settings.json"  # in MODEL_DIR: the engine settings of ``serve``, for ``preannotate``
MACHINE_OPTIONS = ("device", "precision", "batch_size", "workers")  # where it runs, not what it predicts
PREDICTION_SETTINGS = {"instances": str, "negative_label": str, "calibrate": bool, "polygon_tolerance": (int, float)}
"""The backend's own ``INSID3_*`` settings that change what it predicts (and its model version):
``serve`` writes them beside its engine settings (under ``"backend"``), ``preannotate`` reads them."""
ENGINE_UNUSED = ("instance_method",)  # the backend's INSID3_INSTANCES says whether and how to split
MAX_THREADS = 1024  # --threads beyond it would exhaust the process's threads before serving


def register(subparsers) -> None:
    """Add ``labelstudio`` with its ``serve``, ``connect`` and ``preannotate`` sub-commands to ``insid3``'s parser."""
    from insid3_core.settings import EngineSettings

    labelstudio = subparsers.add_parser("labelstudio", help="Label Studio ML backend")
    commands = labelstudio.add_subparsers(dest="labelstudio_command", required=True)

    serve = commands.add_parser("serve", help="serve the ML backend (LABEL_STUDIO_URL, MODEL_DIR, ... from the environment)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument("--threads", type=int, default=SERVER_THREADS,
                       help=f"predictions, trainings and webhooks served at once, in one process sharing the model "
                            f"(default {SERVER_THREADS}); INSID3_MAX_QUEUED_REQUESTS more wait for their turn, and "
                            "/health is always answered")
    EngineSettings.add_arguments(serve, exclude=ENGINE_UNUSED)
    serve.set_defaults(handler=run_serve)

    connect = commands.add_parser("connect", help="connect a running backend to a project: ML backend and webhook")
    connect.add_argument("--project", type=int, required=True, metavar="N", help="Label Studio project id")
    connect.add_argument("--backend-url", required=True, metavar="URL",
                         help="the backend's address as Label Studio reaches it, e.g. http://127.0.0.1:9090")
    connect.set_defaults(handler=run_connect)

    preannotate = commands.add_parser("preannotate", help="push predictions for every task of a project")
    preannotate.add_argument("--project", type=int, required=True, metavar="N", help="Label Studio project id")
    preannotate.add_argument("--no-progress", action="store_true", help="no progress bar")
    EngineSettings.add_arguments(preannotate, exclude=ENGINE_UNUSED)
    preannotate.set_defaults(handler=run_preannotate)


def backend_from_arguments(arguments: argparse.Namespace, settings, serving: bool = False, before_loading=None):
    """The backend for ``settings`` and the parsed engine options (loads the backbone).

    Each engine option comes from its flag, else from the settings the backend serving
    ``MODEL_DIR`` runs with (:data:`SERVED_SETTINGS`, which ``serving`` writes; the options of
    the machine, :data:`MACHINE_OPTIONS`, left out), else from ``INSID3_*``; so do the backend's
    :data:`PREDICTION_SETTINGS` (instances, negative label, calibration, polygon tolerance), which
    have no flags: ``preannotate`` then makes the predictions ``serve`` would, under the same
    model version, without repeating them.
    ``before_loading``: called once all of that is read and checked, before the model loads.
    """
    from insid3_core.backbone import announce_smoke_test
    from insid3_core.io import write_json
    from insid3_core.settings import EngineSettings, SettingsError

    from .build import build_backend, image_fetcher

    fetcher = image_fetcher(settings)  # a bad LABEL_STUDIO_URL or allowlist is named before the model loads
    served, served_backend = ({}, {}) if serving else served_settings(settings.model_dir / SERVED_SETTINGS)
    try:
        EngineSettings(**served)
        settings = dataclasses.replace(settings, **checked_prediction_settings(served_backend))
    except ValueError as err:  # named as the file's, not as a flag or variable the user never gave
        raise SettingsError(f"{settings.model_dir / SERVED_SETTINGS} (written by serve): {err}; start serve again, "
                            "or delete the file") from None
    engine = EngineSettings.from_arguments(arguments, defaults=served)
    if before_loading is not None:
        before_loading()
    segmenter = engine.build()
    if serving:
        write_json(settings.model_dir / SERVED_SETTINGS, {
            **{name: value for name, value in engine.describe().items() if name not in MACHINE_OPTIONS},
            "backend": {name: getattr(settings, name) for name in PREDICTION_SETTINGS}})
    announce_smoke_test(segmenter.backbone)
    settings = dataclasses.replace(settings, batch_size=engine.batch_size, min_instance_patches=engine.min_instance_patches)
    return build_backend(settings, segmenter, engine, fetcher)


def checked_prediction_settings(values: dict) -> dict:
    """``values`` (:data:`PREDICTION_SETTINGS` by name) when each is of its type; else a
    ``ValueError`` naming the first that is not (``Settings`` checks the values themselves)."""
    for name, value in values.items():
        kind = PREDICTION_SETTINGS[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            shown = kind.__name__ if isinstance(kind, type) else "number"
            raise ValueError(f"INSID3_{name.upper()} (backend.{name}) must be a {shown}, got {value!r}")
    return values


def served_settings(path) -> tuple[dict, dict]:
    """``(engine settings, prediction settings)`` a serving backend runs with (empty when none
    was started, or unreadable), as stored: :func:`checked_prediction_settings` checks the latter."""
    from insid3_core.io import json_value
    from insid3_core.settings import EngineSettings

    try:
        stored = json_value(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, {}
    if not isinstance(stored, dict):
        return {}, {}
    backend = stored.get("backend") if isinstance(stored.get("backend"), dict) else {}
    return ({name: value for name, value in stored.items() if name in EngineSettings.names()},
            {name: value for name, value in backend.items() if name in PREDICTION_SETTINGS})


def run_serve(arguments: argparse.Namespace) -> int:
    """Serve the ML backend with waitress (threads in one process: the model is loaded once) until interrupted."""
    from .server import backend_server
    from .settings import Settings

    from insid3_core.cli import UsageError

    if not 1 <= arguments.threads <= MAX_THREADS:
        raise UsageError(f"--threads must be from 1 to {MAX_THREADS}, got {arguments.threads}")
    from insid3_core.io import check_writable_folder

    check_address(arguments.host, arguments.port)
    settings = Settings.from_environment()
    check_writable_folder(settings.model_dir, "MODEL_DIR")  # before the model loads
    if settings.basic_auth is None and not is_loopback(arguments.host):
        print(f"insid3: warning: --host {arguments.host} without BASIC_AUTH_USER and BASIC_AUTH_PASS: whoever "
              f"reaches port {arguments.port} can ask for predictions (images downloaded with LABEL_STUDIO_API_KEY) "
              "and change the references through /webhook; set both, or serve on 127.0.0.1 behind a proxy",
              file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    backend = backend_from_arguments(arguments, settings, serving=True)
    try:  # the port may have been taken while the model loaded
        server = backend_server(backend, arguments.threads, arguments.host, arguments.port)
    except OSError as err:
        raise cannot_listen(arguments.host, arguments.port, err) from None
    server.print_listen("insid3: Label Studio ML backend serving on http://{}:{}")
    server.run()
    return 0


def check_address(host: str, port: int) -> None:
    """A ``UsageError`` naming ``--port`` or ``--host`` unless the backend can listen there: the
    address is bound once, as waitress binds it, before the model loads (waitress would say
    "Invalid host/port specified", or raise "Address already in use", after it)."""
    import socket

    from insid3_core.cli import UsageError

    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be from 1 to 65535, got {port}")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as err:
        raise UsageError(f"--host {host!r} is not an address of this machine to listen on ({err})") from None
    try:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise cannot_listen(host, port, err) from None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to for listening is a loopback one (``127.0.0.1``,
    ``::1``, ``localhost``), which only this machine reaches."""
    import ipaddress
    import socket

    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in found)


def cannot_listen(host: str, port: int, err: OSError):
    """The ``UsageError`` for an address the backend cannot bind (busy, or not this machine's)."""
    from insid3_core.cli import UsageError

    return UsageError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err})")


def api_settings(command: str):
    """The backend's :class:`~labelstudio_backend.settings.Settings`, which ``command`` needs to
    reach the Label Studio API; a ``UsageError`` (exit 2) when they cannot."""
    from insid3_core.cli import UsageError

    from .settings import Settings

    settings = Settings.from_environment()
    if not settings.label_studio_url or not settings.api_key:
        raise UsageError(f"{command} needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    from .images import label_studio_url

    try:
        label_studio_url(settings.label_studio_url)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return settings


def run_connect(arguments: argparse.Namespace) -> int:
    """Connect the backend at ``--backend-url`` to ``--project`` (idempotent); exit 2 on failure."""
    from .api import LabelStudioApi
    from .connect import connect
    from .errors import BackendError

    from insid3_core.cli import UsageError

    if arguments.project < 1:
        raise UsageError(f"--project must be a Label Studio project id (>= 1), got {arguments.project}")
    from .urls import UnsafeURL, parse_url

    try:
        parse_url(arguments.backend_url)
    except UnsafeURL as err:
        raise UsageError(f"--backend-url {arguments.backend_url!r} {err}") from None
    settings = api_settings("connect")
    try:
        made = connect(LabelStudioApi(settings.label_studio_url, settings.api_key), arguments.project,
                       arguments.backend_url, settings.basic_auth)
    except BackendError as err:
        print(f"insid3: error: {err.message}", file=sys.stderr)
        return 2
    print(f"insid3: project {arguments.project}: ML backend {made.ml_backend} "
          f"({'connected' if made.ml_backend_created else 'already connected'}), webhook {made.webhook} "
          f"({'created' if made.webhook_created else 'updated'}), {made.duplicates_removed} duplicate(s) removed",
          file=sys.stderr)
    return 0


def run_preannotate(arguments: argparse.Namespace) -> int:
    """Predict every task of ``--project`` lacking a current prediction; exit 1 when some failed."""
    from .errors import BackendError
    from .preannotate import preannotate

    from insid3_core.cli import UsageError

    if arguments.project < 1:
        raise UsageError(f"--project must be a Label Studio project id (>= 1), got {arguments.project}")
    from .api import LabelStudioApi

    settings = api_settings("preannotate")
    api = LabelStudioApi(settings.label_studio_url, settings.api_key)
    try:  # Label Studio, the key and the project are checked by one call before the model loads
        backend = backend_from_arguments(arguments, settings, before_loading=lambda: api.task_count(arguments.project))
        report = preannotate(backend, arguments.project, backend.settings.batch_size,
                             not arguments.no_progress)
    except BackendError as err:
        print(f"insid3: error: {err.message}", file=sys.stderr)
        return 2
    for failure in report.failures:
        print(f"insid3: {failure}", file=sys.stderr)
    print(f"insid3: model version {report.model_version}: {report.done} task(s) predicted, {report.skipped} already "
          f"had its prediction, {len(report.failures)} failed", file=sys.stderr)
    return 1 if report.failures else 0
