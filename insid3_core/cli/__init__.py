"""The ``insid3`` command line: ``main`` and the parser; each command is a module of this package
(``segment``, ``calibrate``, ``info``, ``eval``, ``match``) or of an integration, registered through the
``insid3.commands`` entry points (a function adding its sub-parser to ``insid3``'s)."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from .. import __version__
from ..backbone import BackboneError
from ..io import InputError
from ..settings import out_of_memory_message


class UsageError(Exception):
    """A problem with the command's arguments or files, reported without a traceback (exit 2)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``insid3`` console script; returns the exit code."""
    try:
        arguments = build_parser().parse_args(argv)
        return arguments.handler(arguments)
    except (UsageError, InputError, BackboneError, ValueError) as err:  # SettingsError is a ValueError
        print(f"insid3: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:
        if message := out_of_memory_message(err):
            print(f"insid3: error: {message}; the outputs written so far are complete and "
                  "listed (run again to resume)", file=sys.stderr)
            return 2
        if "home directory" not in str(err):  # pathlib's expanduser of "~name/..." for a user this machine lacks
            raise
        print(f"insid3: error: a path or INSID3_CACHE_DIR starting with '~' names no home directory here "
              f"({err})", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or a folder gone while writing, after the checks up front
        print(f"insid3: error: {err.filename or ''}: {err.strerror or err}; the outputs written before it are "
              "complete (run again to resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("insid3: interrupted; the outputs written so far are complete and listed (run again to resume)",
              file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """``insid3``'s parser with every command of the ``insid3.commands`` entry points."""
    parser = argparse.ArgumentParser(prog="insid3", description="Segment images by example (INSID3, DINOv3).")
    parser.add_argument("--version", action="version", version=f"insid3 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for entry in sorted(entry_points(group="insid3.commands"), key=lambda entry: ORDER.get(entry.name, len(ORDER))):
        entry.load()(commands)
    return parser


ORDER = {"segment": 0, "calibrate": 1, "match": 2, "eval": 3, "info": 4}  # built-in commands first in the help
