"""``python -m labelstudio_backend serve|connect|preannotate ...``: the ``insid3 labelstudio`` commands without the console script."""

from __future__ import annotations

import argparse
import sys

from .commands import register


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as ``insid3 labelstudio`` arguments and run the command; returns the exit code."""
    from insid3_core.backbone import BackboneError
    from insid3_core.cli import UsageError

    parser = argparse.ArgumentParser(prog="python -m labelstudio_backend")
    register(parser.add_subparsers(dest="command", required=True))
    arguments = parser.parse_args(["labelstudio", *(sys.argv[1:] if argv is None else argv)])
    try:
        return arguments.handler(arguments)
    except (UsageError, BackboneError, ValueError) as err:
        print(f"insid3: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
