"""``insid3 fiftyone install``: put the plugin into FiftyOne's plugins directory, and the zoo
model source ``insid3`` (model ``insid3-dinov3-torch``) into FiftyOne's model zoo directory.

Registered on the ``insid3`` command line through the entry point
``fiftyone = "fiftyone_plugin.commands:register"`` of the group ``insid3.commands``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

from insid3_core.cli import UsageError

SOURCE = Path(__file__).resolve().parent
INSTALL_NAME = "insid3-fiftyone"
ZOO_NAME = "insid3"  # the zoo manifest's name: FiftyOne finds the model in <model zoo dir>/insid3/
IGNORED = ("__pycache__", "*.pyc")


def register(subparsers) -> None:
    """Add ``fiftyone install`` to the ``insid3`` sub-commands (argparse ``add_subparsers()``)."""
    fiftyone = subparsers.add_parser("fiftyone", help="FiftyOne plugin @insid3/fiftyone")
    actions = fiftyone.add_subparsers(dest="fiftyone_command", required=True)
    install = actions.add_parser(
        "install", help="link (or copy) the plugin into FiftyOne's plugins directory",
        description=f"Install the plugin as <plugins dir>/{INSTALL_NAME}, a link to {SOURCE} (or a copy).",
    )
    install.add_argument("--plugins-dir", metavar="DIR",
                         help="FiftyOne plugins directory (default: fo.config.plugins_dir, FIFTYONE_PLUGINS_DIR)")
    install.add_argument("--copy", action="store_true", help="copy the plugin's files instead of linking them")
    install.add_argument("--force", action="store_true",
                         help=f"replace whatever else is installed as <plugins dir>/{INSTALL_NAME} or "
                              f"<model zoo dir>/{ZOO_NAME}")
    install.add_argument("--model-zoo-dir", metavar="DIR",
                         help="FiftyOne model zoo directory for the zoo model insid3-dinov3-torch (default: "
                              "fo.config.model_zoo_dir, FIFTYONE_MODEL_ZOO_DIR)")
    install.set_defaults(handler=run_install)


def run_install(arguments: argparse.Namespace) -> int:
    """Install the plugin and the zoo model source; refuse to replace others unless ``--force``.
    Both folders are checked before either is written, so a bad one installs nothing."""
    from insid3_core.cli import UsageError
    from insid3_core.io import check_writable_folder

    for option, given in (("--plugins-dir", arguments.plugins_dir), ("--model-zoo-dir", arguments.model_zoo_dir)):
        if given is not None and not str(given).strip():
            raise UsageError(f"{option}: an empty name; give a folder")
    arguments.plugins_dir = Path(arguments.plugins_dir or default_plugins_dir()).expanduser()
    zoo_dir = Path(arguments.model_zoo_dir or default_model_zoo_dir()).expanduser()
    check_writable_folder(arguments.plugins_dir, "--plugins-dir (FIFTYONE_PLUGINS_DIR)")
    check_writable_folder(zoo_dir, "--model-zoo-dir (FIFTYONE_MODEL_ZOO_DIR)")
    install_plugin(arguments)
    install_zoo_source(zoo_dir, arguments.force)
    return 0


def install_zoo_source(zoo_dir: Path, force: bool) -> None:
    """Copy the zoo source's files into ``zoo_dir/insid3`` (FiftyOne looks a model up in the folder
    its manifest's ``name`` gives) and mark the model downloaded; again is a no-op."""
    from insid3_core.io import json_value

    from .zoo import MODEL_NAME, SOURCE

    destination = zoo_dir / ZOO_NAME
    manifest = destination / "manifest.json"
    if manifest.is_file() and not force:
        try:
            name = json_value(manifest.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        if name != ZOO_NAME:
            raise UsageError(f"{destination} holds another zoo model source ({manifest}); pass --force to replace it")
    files = [path for path in SOURCE.iterdir() if path.is_file() and path.suffix in (".json", ".py")]
    if destination.is_dir() and all((destination / path.name).is_file() and
                                    filecmp.cmp(path, destination / path.name, shallow=False) for path in files):
        print(f"insid3: zoo model {MODEL_NAME} already installed at {destination}", file=sys.stderr)
        return
    destination.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, destination / path.name)
    (destination / f"{MODEL_NAME}.txt").write_text(  # FiftyOne's "downloaded": the weights come with load_zoo_model
        f"{MODEL_NAME} takes its DINOv3 weights from load_zoo_model(..., weights=PATH)\n", encoding="utf-8")
    print(f"insid3: installed zoo model {MODEL_NAME} at {destination} (foz.load_zoo_model({MODEL_NAME!r}, "
          "references=[...], weights=...))", file=sys.stderr)


def install_plugin(arguments: argparse.Namespace) -> None:
    """Link or copy the plugin into the plugins directory."""
    plugins_dir = arguments.plugins_dir or default_plugins_dir()
    destination = Path(plugins_dir).expanduser() / INSTALL_NAME
    if is_installed(destination, arguments.copy):
        print(f"insid3: @insid3/fiftyone already installed at {destination}", file=sys.stderr)
        return
    if destination.exists() or destination.is_symlink():
        if not arguments.force:
            raise UsageError(f"{destination} already holds a different plugin or version; pass --force to replace it")
        remove(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if arguments.copy:
        shutil.copytree(SOURCE, destination, ignore=shutil.ignore_patterns(*IGNORED))
    else:
        destination.symlink_to(SOURCE, target_is_directory=True)
    print(f"insid3: installed @insid3/fiftyone at {destination} ({'copy' if arguments.copy else 'link'})",
          file=sys.stderr)


def default_model_zoo_dir() -> Path:
    """FiftyOne's configured model zoo directory (``FIFTYONE_MODEL_ZOO_DIR``)."""
    import fiftyone as fo

    return Path(fo.config.model_zoo_dir)


def default_plugins_dir() -> Path:
    """FiftyOne's configured plugins directory."""
    import fiftyone as fo

    return Path(fo.config.plugins_dir)


def is_installed(destination: Path, copy: bool) -> bool:
    """Whether ``destination`` is already this plugin: a link to it, or an identical copy."""
    if not copy:
        return destination.is_symlink() and destination.resolve() == SOURCE
    if destination.is_symlink() or not destination.is_dir():
        return False
    return _same_tree(filecmp.dircmp(SOURCE, destination, ignore=["__pycache__"]))


def _same_tree(comparison: filecmp.dircmp) -> bool:
    if comparison.left_only or comparison.right_only or comparison.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(comparison.left, comparison.right, comparison.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(sub) for sub in comparison.subdirs.values())


def remove(path: Path) -> None:
    """Remove a link, a file or a folder tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)
