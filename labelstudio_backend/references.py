"""Reference (image, mask) pairs per label: a configured folder and annotations cached on disk.

Both use one layout: a sub-folder per label (URL-quoted name) holding ``<stem>.<ext>`` images
and ``<stem>_mask.png`` masks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
from PIL import Image

from insid3_core.io import IMAGE_EXTENSIONS, atomic_write, json_value, write_json, write_mask_png

MASK_SUFFIX = "_mask"
STAMPS = "stamps.json"
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
    return _content_digest(str(path), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _content_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """SHA-256 of ``path``'s content; ``size`` and ``mtime_ns`` only key the cache."""
    return hashlib.sha256(Path(path).read_bytes()).digest()


def label_folder(label: str) -> str:
    """Folder name of ``label``: URL-quoted, a leading dot too (no ``.``/``..``/hidden folders)."""
    quoted = quote(label, safe="")
    return "%2E" + quoted[1:] if quoted.startswith(".") else quoted


class AnnotationStore:
    """References made from one project's annotations, cached under ``root``.

    Beside the pairs, ``root/stamps.json`` maps each cached annotation id to the stamp of the
    content it was made from, so that an unchanged annotation is not downloaded again. Writes
    (:meth:`put`, :meth:`remove`) are serialised: a project's sync caches its annotations from
    several threads.

    Parameters
    ----------
    root : Path
        ``MODEL_DIR/projects/<project id>/references``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._writing = threading.RLock()

    def pairs(self) -> Pairs:
        """The cached pairs per label."""
        return scan_folder(self.root)

    def put(self, annotation_id: int, image: Image.Image, masks: dict[str, np.ndarray], stamp: str) -> None:
        """Replace annotation ``annotation_id``'s references by ``masks`` (label -> ``(H, W)`` bool) on ``image``."""
        with self._writing:
            self.remove(annotation_id)
            stem = _stem(annotation_id)
            for label, mask in masks.items():
                folder = self.root / label_folder(label)
                with atomic_write(folder / f"{stem}.png") as handle:
                    image.save(handle, format="PNG")
                write_mask_png(folder / f"{stem}{MASK_SUFFIX}.png", mask)
            self._write_stamps({**self._stamps(), str(int(annotation_id)): stamp})

    def remove(self, annotation_id: int) -> bool:
        """Drop annotation ``annotation_id``'s references; ``True`` when there were any."""
        stem = _stem(annotation_id)
        removed = False
        with self._writing:
            for path in self.root.glob(f"*/{stem}.png"):
                path.unlink()
                path.with_name(f"{stem}{MASK_SUFFIX}.png").unlink(missing_ok=True)
                removed = True
            stamps = self._stamps()
            if stamps.pop(str(int(annotation_id)), None) is not None:
                self._write_stamps(stamps)
        return removed

    def stamp(self, annotation_id: int) -> str | None:
        """The stamp annotation ``annotation_id``'s cached references were made from, if cached."""
        return self._stamps().get(str(int(annotation_id)))

    def version(self) -> str:
        """Digest of the cached annotations (their ids and stamps), read without opening any image."""
        stamps = self._stamps()
        present = sorted((identifier, stamps.get(str(identifier), "")) for identifier in self.annotation_ids())
        return hashlib.sha256(json.dumps(present).encode()).hexdigest()[:12]

    def annotation_ids(self) -> set[int]:
        """Ids of the annotations with cached references."""
        prefix = "annotation-"
        return {
            int(path.stem[len(prefix):])
            for path in self.root.glob(f"*/{prefix}*.png")
            if not path.stem.endswith(MASK_SUFFIX)
        }

    def _stamps(self) -> dict[str, str]:
        try:
            return json_value((self.root / STAMPS).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _write_stamps(self, stamps: dict[str, str]) -> None:
        write_json(self.root / STAMPS, stamps)


def _stem(annotation_id: int) -> str:
    return f"annotation-{int(annotation_id)}"
