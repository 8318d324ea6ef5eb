"""What several commands share: their targets on the command line, and the segmenter they build."""

from __future__ import annotations

import collections
import glob
import sys
from pathlib import Path

from ..backbone import announce_smoke_test
from ..engine import Segmenter
from ..io import IMAGE_EXTENSIONS
from ..settings import EngineSettings
from . import UsageError


def build_segmenter(settings: EngineSettings) -> Segmenter:
    """``settings.build()``, with the smoke-test banner when it runs on the bundled test checkpoint."""
    segmenter = settings.build()
    announce_smoke_test(segmenter.backbone, sys.stderr)
    return segmenter


def resolve_targets(specs: list[str]) -> list[Path]:
    """Expand files, folders (their images, sorted) and glob patterns, without duplicates."""
    found: dict[Path, None] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise UsageError(f"{spec}: folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file():
            files = [path]
        else:
            files = sorted(
                Path(match) for match in glob.glob(str(path), recursive=True)
                if Path(match).is_file() and Path(match).suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise UsageError(f"{spec}: no such file, and no image matches it as a pattern")
        found.update((f.resolve(), None) for f in files)
    by_stem = collections.defaultdict(list)
    for target in found:
        by_stem[target.stem].append(target)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        listed = "; ".join(" and ".join(str(p) for p in paths) for paths in clashes)
        raise UsageError(f"targets share a file stem, so their output masks would collide: {listed}")
    return list(found)
