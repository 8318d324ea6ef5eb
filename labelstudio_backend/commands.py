"""``insid3 labelstudio serve`` and ``insid3 labelstudio preannotate`` (entry point ``insid3.commands``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def register(subparsers) -> None:
    """Add ``labelstudio`` with its ``serve`` and ``preannotate`` sub-commands to ``insid3``'s parser."""
    from insid3_core.cli import add_engine_arguments

    labelstudio = subparsers.add_parser("labelstudio", help="Label Studio ML backend")
    commands = labelstudio.add_subparsers(dest="labelstudio_command", required=True)

    serve = commands.add_parser("serve", help="serve the ML backend (LABEL_STUDIO_URL, MODEL_DIR, ... from the environment)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=9090)
    add_engine_arguments(serve)
    serve.set_defaults(handler=run_serve)

    preannotate = commands.add_parser("preannotate", help="push predictions for every task of a project")
    preannotate.add_argument("--project", type=int, required=True, metavar="N", help="Label Studio project id")
    preannotate.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(preannotate)
    preannotate.set_defaults(handler=run_preannotate)


def backend_from_arguments(arguments: argparse.Namespace, settings):
    """The backend for ``settings`` and the parsed engine options (loads the backbone)."""
    from insid3_core.cli import segmenter_from_arguments

    from .build import build_backend

    settings = dataclasses.replace(settings, batch_size=arguments.batch_size)
    return build_backend(settings, segmenter_from_arguments(arguments))


def run_serve(arguments: argparse.Namespace) -> int:
    """Serve the ML backend until interrupted."""
    from .app import create_app
    from .settings import Settings

    app = create_app(backend_from_arguments(arguments, Settings.from_environment()))
    print(f"insid3: Label Studio ML backend on http://{arguments.host}:{arguments.port}", file=sys.stderr)
    app.run(host=arguments.host, port=arguments.port, threaded=True)
    return 0


def run_preannotate(arguments: argparse.Namespace) -> int:
    """Predict every task of ``--project`` lacking a current prediction; exit 1 when some failed."""
    from .errors import BackendError
    from .preannotate import preannotate
    from .settings import Settings

    settings = Settings.from_environment()
    if not settings.label_studio_url or not settings.api_key:
        print("insid3: error: preannotate needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    try:
        version, done, skipped, failures = preannotate(
            backend_from_arguments(arguments, settings), arguments.project, arguments.batch_size, not arguments.no_progress
        )
    except BackendError as err:
        print(f"insid3: error: {err.message}", file=sys.stderr)
        return 2
    for failure in failures:
        print(f"insid3: {failure}", file=sys.stderr)
    print(f"insid3: model version {version}: {done} task(s) predicted, {skipped} already had its prediction, "
          f"{len(failures)} failed", file=sys.stderr)
    return 1 if failures else 0
