"""The output masks of ``insid3 segment``: PNGs that carry their annotations.json record, and the
description of the run that made them.

Shared by the single-machine command (:mod:`insid3_core.cli.segment`) and the Ray Data job
(:mod:`insid3_core.distributed`), so both write the same bytes and the same records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .coco import mask_record
from .io import InputError, atomic_write, json_value, label_png, load_mask

RECORD_KEY = "insid3-record"
"""PNG text chunk of an output mask holding its annotations.json record, so the pair stays whole
when a run is killed between writing a mask and the annotations that list it."""


def write_output_mask(path: Path, label_map: np.ndarray, classes: int, record: dict, source: str,
                      source_sha256: str) -> None:
    """Write :func:`output_mask_png` to ``path``, atomically."""
    with atomic_write(path) as stream:
        stream.write(output_mask_png(label_map, classes, record, source, source_sha256))


def output_mask_png(label_map: np.ndarray, classes: int, record: dict, source: str, source_sha256: str) -> bytes:
    """One class: 0/255 mask. Several: 8-bit label map, ``i + 1`` for the ``i``-th class. The
    target's record, with the ``source`` image and its digest added, travels in the PNG (see
    :data:`RECORD_KEY`)."""
    record["image"].update(source=str(source), source_sha256=source_sha256)
    text = {RECORD_KEY: json.dumps(record, separators=(",", ":"))}
    labels = np.where(label_map > 0, 255, 0) if classes == 1 else label_map
    return label_png(labels.astype(np.uint8), text)


def carried_record(path) -> dict | None:
    """The record an output mask carries (:data:`RECORD_KEY`); ``None`` when it has none, the file
    is unreadable or the record is not one insid3 writes (an image object, and annotations that
    are objects naming their category). ``path``: a path or a binary stream."""
    try:
        with Image.open(path) as image:
            carried = json_value(image.text.get(RECORD_KEY, "null"))
    except (OSError, ValueError):
        return None
    if isinstance(carried, dict) and isinstance(carried.get("image"), dict) and \
            isinstance(carried.get("annotations"), list) and \
            all(isinstance(entry, dict) and isinstance(entry.get("category"), str) for entry in carried["annotations"]):
        return carried
    return None


def written_record(path: str | Path, file_name: str, categories: Sequence[str], data: bytes | None = None) -> dict:
    """The record of the output mask at ``path`` (``data``: its content, read from an object
    store): the one it carries, else one rebuilt from its pixels (a mask drawn by hand, saved
    again by an image editor, which drops PNG text, or written by an older insid3: no score).

    Raises :class:`~insid3_core.io.InputError` naming ``path`` when the mask cannot be read, is
    not an 8-bit label map where several categories are written, or carries the record of
    another target (``a.png``'s mask is ``a.jpg``'s output too: the two share a stem).
    """
    carried = carried_record(path if data is None else BytesIO(data))
    if carried is not None:
        made_for = carried["image"].get("file_name")
        if made_for == file_name:
            return carried
        if isinstance(made_for, str) and made_for:
            raise InputError(f"{path}: the mask of {made_for}, not of {file_name} (their names share a stem); "
                             "--overwrite redoes it, or choose another --out")
    return mask_record(file_name, written_labels(path, len(categories), data), categories)


def written_labels(path: str | Path, classes: int, data: bytes | None = None) -> np.ndarray:
    """The ``(H, W)`` uint8 labels of the output mask at ``path`` (``data``: its content).

    One class: any foreground (see :func:`insid3_core.io.load_mask`) as 255. Several: the
    stored values of an 8-bit label map.
    """
    source = None if data is None else BytesIO(data)
    if classes == 1:
        try:
            return load_mask(path, source=source).astype(np.uint8) * 255
        except InputError as err:
            raise InputError(f"existing output mask {err}; remove it or pass --overwrite") from None
    try:
        with Image.open(path if source is None else source) as image:
            mode, labels = image.mode, np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: existing output mask is unreadable ({err}); remove it or pass --overwrite") from err
    if mode not in ("L", "P"):
        raise InputError(f"{path}: existing output is an image of mode {mode}, not an 8-bit label map; "
                         "remove it or pass --overwrite")
    return labels


RUN_DESCRIPTION = "insid3 segment"
"""``info.description`` of every annotations.json insid3 writes: how a rerun knows its own file."""


def run_description(settings, backbone, svd_components: int, references: dict[str, list[str]],
                    negatives: list[str], instances: str | None) -> tuple[str, dict]:
    """``(run id, run)``: what annotations.json's ``info.runs`` records of a run, and the 12-digit
    id each image entry names it by (a digest of the run, so equal runs share it).

    Parameters
    ----------
    settings : insid3_core.settings.EngineSettings
    backbone : insid3_core.Backbone
    svd_components : int
        Columns of the positional basis actually used.
    references : dict of str to list of str
        Each class's reference names.
    negatives : list of str
    instances : str or None
        The instance method, when one annotation per instance is written.
    """
    run = {
        "description": RUN_DESCRIPTION,
        "version": __version__,
        "backbone": backbone.name,
        "weights": backbone.identity,
        "smoke_test": backbone.is_smoke_test,
        "settings": {**settings.describe(), "svd_components": int(svd_components)},
        "references": references,
        "negatives": negatives,
        "instances": instances,
    }
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:12], run
