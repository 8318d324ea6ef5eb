"""What several commands share: their references and targets on the command line, and the
segmenter they build."""

from __future__ import annotations

import argparse
import collections
import fnmatch
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backbone import announce_smoke_test
from ..coco import mask_file_name
from ..engine import Segmenter
from ..io import IMAGE_EXTENSIONS, broken_link, folder_images, label_masks, left_out_note, target_path
from ..settings import EngineSettings
from . import UsageError


def build_segmenter(settings: EngineSettings) -> Segmenter:
    """``settings.build()``, with the smoke-test banner when it runs on the bundled test checkpoint."""
    segmenter = settings.build()
    announce_smoke_test(segmenter.backbone, sys.stderr)
    return segmenter


def resolve_targets(specs: list[str]) -> list[Path]:
    """Expand files, folders (their images, sorted) and glob patterns into absolute paths, each once
    (:func:`~insid3_core.io.target_path`: links keep their own names, so two links to one image
    are two targets; a folder's broken links are kept, to be reported)."""
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = folder_targets(spec, path)
        elif path.is_file():
            files = [Path(os.path.abspath(path))]
        elif broken_link(path):
            raise UsageError(broken_link(path))
        elif path.exists():
            raise UsageError(f"{spec}: not a regular file (a pipe or device)")
        else:
            files = [f for f in map(target_path, sorted(map(Path, glob.glob(str(path), recursive=True)))) if f]
            if not files:
                raise UsageError(f"{spec}: no such file, and no image matches it as a pattern")
        found.update((f, None) for f in files)
    return list(found)


def check_mask_names(targets: list[Path]) -> None:
    """Refuse targets sharing a file stem (``a.png`` and ``a.jpg``): their masks, ``a.png``, would collide."""
    by_stem = collections.defaultdict(list)
    for target in targets:
        by_stem[mask_file_name(target.name)].append(target)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        listed = "; ".join(" and ".join(str(p) for p in paths) for paths in clashes)
        raise UsageError(f"targets share a file stem, so their output masks would collide: {listed}")


def relisting_target(out: Path, specs: list[str], mask_names) -> str | None:
    """The TARGET of ``specs`` that would list masks named ``mask_names`` written into the local
    folder ``out`` as targets of the next run (the folder itself, or a pattern in or above it
    whose file part matches them: ``*.jpg`` lists no mask), or ``None``."""
    for spec in specs:
        if listed_output_folder(str(out), [spec]) and (
            not glob.has_magic(spec) or any(fnmatch.fnmatch(name, os.path.basename(spec)) for name in mask_names)
        ):
            return spec
    return None


def listed_output_folder(out: str, specs: list[str]) -> str | None:
    """The TARGET of ``specs`` that lists the local folder ``out`` (the folder itself, a pattern
    in it, or a ``**`` pattern above it), or ``None``. ``insid3 segment --ray`` streams its
    listing while it writes, so there a mask could be listed as a target, or with ``--overwrite``
    replace an image of the same stem; the single machine lists everything before it writes."""
    folder = os.path.realpath(out)
    for spec in specs:
        if "://" in spec and not spec.startswith("file://"):
            continue
        path = os.path.expanduser(spec.removeprefix("file://"))
        if not glob.has_magic(path):
            if os.path.isdir(path) and os.path.realpath(path) == folder:
                return spec
            continue
        if "**" in path:
            parts = Path(path).parts
            fixed = os.path.join(os.curdir, *parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part))])
            if (folder + os.sep).startswith(os.path.realpath(fixed).rstrip(os.sep) + os.sep):
                return spec
        elif folder in {os.path.realpath(match) for match in glob.glob(os.path.dirname(path) or os.curdir)}:
            return spec
    return None


def folder_targets(spec: str, folder: Path) -> list[Path]:
    """The images of ``folder`` (given as ``spec``), sorted; its other files (hidden ones aside)
    are counted on stderr by extension (:func:`~insid3_core.io.folder_images`,
    :func:`~insid3_core.io.left_out_note`)."""
    left_out = collections.Counter()
    files = list(folder_images(sorted(folder.iterdir()), left_out))
    if left_out:
        print(left_out_note(spec, left_out), file=sys.stderr)
    if not files:
        folders = sum(1 for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        searched = (f"; its {folders} folder(s) are not searched: give them, or a pattern such as "
                    f"'{Path(spec) / '**' / '*.jpg'}'") if folders else ""
        raise UsageError(f"{spec}: folder holds no image ({', '.join(IMAGE_EXTENSIONS)}){searched}")
    return files


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ref``, ``--class-ref``, ``--label-ref`` (with ``--class-name``), ``--negative`` and ``--category``."""
    parser.add_argument("--ref", nargs=2, action="append", default=[], metavar=("IMAGE", "MASK"),
                        help="a reference image and its mask (repeat for several shots), class --category")
    parser.add_argument("--class-ref", nargs=3, action="append", default=[], metavar=("NAME", "IMAGE", "MASK"),
                        help="a reference of class NAME (repeat; several classes are segmented in one pass)")
    parser.add_argument("--label-ref", nargs=2, action="append", default=[], metavar=("IMAGE", "MASK"),
                        help="a reference whose greyscale or palette MASK holds several classes: each value "
                             "but 0 and 255 (void) is a class, named by --class-name or by its value")
    parser.add_argument("--class-name", action="append", default=[], metavar="VALUE=NAME",
                        help="name of a --label-ref class value (repeat)")
    parser.add_argument("--negative", nargs=2, action="append", default=[], metavar=("IMAGE", "MASK"),
                        help="a negative reference: MASK marks a region that is NOT the concept (repeat)")
    parser.add_argument("--category", default="object", help="category name of --ref references")


@dataclass(frozen=True)
class ReferenceClasses:
    """The references of the command line.

    Attributes
    ----------
    classes : dict
        Class name -> ``(image path, mask path or (H, W) bool array)`` pairs.
    mask_names : list of str
        Each pair's mask as the user named it (``MASK`` or ``MASK value V``), in the order of ``classes``.
    """

    classes: dict[str, list[tuple[Path, Path | np.ndarray]]]
    mask_names: list[str]


def reference_classes(arguments: argparse.Namespace) -> ReferenceClasses:
    """Reference pairs by class name: ``--ref`` under ``--category``, each ``--class-ref``, then the
    classes of each ``--label-ref`` mask (as ``(H, W)`` bool arrays)."""
    classes: dict[str, list[tuple[Path, Path | np.ndarray, str]]] = {}
    if arguments.ref:
        if not arguments.category.strip():
            raise UsageError("--category: an empty name; give the class of the --ref references a name")
        classes[arguments.category] = [(Path(image), Path(mask), mask) for image, mask in arguments.ref]
    for name, image, mask in arguments.class_ref:
        if not name.strip():
            raise UsageError(f"--class-ref '' {image} {mask}: an empty class name; name the class")
        classes.setdefault(name, []).append((Path(image), Path(mask), mask))
    names = class_names(arguments.class_name)
    if names and not arguments.label_ref:
        raise UsageError("--class-name names the values of --label-ref masks: give --label-ref IMAGE MASK too")
    found = set()
    for image, mask in arguments.label_ref:
        for value, class_mask in label_masks(mask).items():
            found.add(value)
            classes.setdefault(names.get(value, str(value)), []).append((Path(image), class_mask, f"{mask} value {value}"))
    positives = {(os.path.realpath(image), os.path.realpath(mask)) for pairs in classes.values()
                 for image, mask, _ in pairs if isinstance(mask, Path)}
    for image, mask in arguments.negative:
        if (os.path.realpath(image), os.path.realpath(mask)) in positives:
            raise UsageError(f"--negative {image} {mask} is also a positive reference: it would cancel itself")
    unused = sorted(set(names) - found)
    if unused:
        raise UsageError(f"--class-name {unused[0]}={names[unused[0]]}: no --label-ref mask holds the value {unused[0]} "
                         f"(they hold {', '.join(map(str, sorted(found))) or 'none'})")
    if not classes:
        raise UsageError("give at least one reference: --ref IMAGE MASK, --class-ref NAME IMAGE MASK "
                         "or --label-ref IMAGE MASK")
    if len(classes) > 255:
        raise UsageError(f"{len(classes)} classes do not fit an 8-bit label map (255 at most)")
    return ReferenceClasses({name: [(image, mask) for image, mask, _ in pairs] for name, pairs in classes.items()},
                            [shown for pairs in classes.values() for _, _, shown in pairs])


def class_names(specs: list[str]) -> dict[int, str]:
    """``VALUE=NAME`` options as ``{value: name}``."""
    names = {}
    for spec in specs:
        value, separator, name = spec.partition("=")
        if not separator or not value.strip().isdigit() or not name.strip():
            raise UsageError(f"--class-name {spec!r}: expected VALUE=NAME, e.g. 3=car")
        if int(value) in names:
            raise UsageError(f"--class-name {spec!r}: value {int(value)} is already named {names[int(value)]!r}")
        names[int(value)] = name
    return names


def settings_files(arguments: argparse.Namespace) -> list[Path]:
    """The engine settings files a command reads (``--settings``, ``INSID3_SETTINGS``), resolved:
    inputs its outputs must not replace."""
    given = [getattr(arguments, "settings", None), os.environ.get("INSID3_SETTINGS")]
    return [Path(os.path.realpath(Path(path).expanduser())) for path in given if path]


def reference_files(arguments: argparse.Namespace) -> list[Path]:
    """Every image and mask file the reference options name, resolved."""
    given = [*(p for pair in arguments.ref + arguments.label_ref + arguments.negative for p in pair),
             *(p for _, image, mask in arguments.class_ref for p in (image, mask))]
    return [Path(os.path.realpath(Path(p).expanduser())) for p in given]  # a link loop stays a path, refused on reading
