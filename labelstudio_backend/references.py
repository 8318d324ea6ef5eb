"""Reference (image, mask) pairs per label: a configured folder and annotations cached on disk.

Both use one layout: a sub-folder per label (URL-quoted name) holding ``<stem>.<ext>`` images
and ``<stem>_mask.png`` masks.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
from PIL import Image

from insid3_core.io import IMAGE_EXTENSIONS, atomic_write

MASK_SUFFIX = "_mask"
Pairs = dict[str, list[tuple[Path, Path]]]


def scan_folder(folder: Path | None) -> Pairs:
    """Reference pairs per label found under ``folder`` (none when it is ``None`` or missing).

    An image is used when ``<stem>_mask.png`` lies beside it; pairs are sorted by file name.
    """
    pairs: Pairs = {}
    if folder is None or not folder.is_dir():
        return pairs
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = []
        for image in sorted(label_dir.iterdir()):
            mask = image.with_name(f"{image.stem}{MASK_SUFFIX}.png")
            is_image = image.suffix.lower() in IMAGE_EXTENSIONS and not image.stem.endswith(MASK_SUFFIX)
            if is_image and mask.is_file():
                found.append((image, mask))
        if found:
            pairs.setdefault(unquote(label_dir.name), []).extend(found)
    return pairs


def merge(*sources: Pairs) -> Pairs:
    """Union of several label -> pairs maps."""
    merged: Pairs = {}
    for source in sources:
        for label, pairs in source.items():
            merged.setdefault(label, []).extend(pairs)
    return merged


def pool_version(pairs: Pairs) -> str:
    """Short digest of every label, file name and file content of a reference pool."""
    digest = hashlib.sha256()
    for label in sorted(pairs):
        for image, mask in sorted(pairs[label]):
            digest.update(label.encode() + b"\0" + image.name.encode() + b"\0")
            digest.update(file_digest(image) + file_digest(mask))
    return digest.hexdigest()[:12]


def file_digest(path: Path) -> bytes:
    """SHA-256 of a file's content, remembered while its size and modification time stay the same."""
    status = path.stat()
    key = (str(path), status.st_size, status.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes()).digest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int, int], bytes] = {}


class AnnotationStore:
    """References made from one project's annotations, cached under ``root``.

    Parameters
    ----------
    root : Path
        ``MODEL_DIR/projects/<project id>/references``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def pairs(self) -> Pairs:
        """The cached pairs per label."""
        return scan_folder(self.root)

    def put(self, annotation_id: int, image: Image.Image, masks: dict[str, np.ndarray]) -> None:
        """Replace annotation ``annotation_id``'s references by ``masks`` (label -> bool mask) on ``image``."""
        self.remove(annotation_id)
        stem = _stem(annotation_id)
        for label, mask in masks.items():
            folder = self.root / quote(label, safe="")
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(folder / f"{stem}.png") as handle:
                image.save(handle, format="PNG")
            with atomic_write(folder / f"{stem}{MASK_SUFFIX}.png") as handle:
                Image.fromarray(mask.astype(np.uint8) * 255).save(handle, format="PNG")

    def remove(self, annotation_id: int) -> bool:
        """Drop annotation ``annotation_id``'s references; ``True`` when there were any."""
        stem = _stem(annotation_id)
        removed = False
        for path in self.root.glob(f"*/{stem}.png"):
            path.unlink()
            path.with_name(f"{stem}{MASK_SUFFIX}.png").unlink(missing_ok=True)
            removed = True
        return removed

    def annotation_ids(self) -> set[int]:
        """Ids of the annotations with cached references."""
        prefix = "annotation-"
        return {
            int(path.stem[len(prefix):])
            for path in self.root.glob(f"*/{prefix}*.png")
            if not path.stem.endswith(MASK_SUFFIX)
        }

    def clear(self) -> None:
        """Forget every cached reference."""
        shutil.rmtree(self.root, ignore_errors=True)


def _stem(annotation_id: int) -> str:
    return f"annotation-{int(annotation_id)}"
