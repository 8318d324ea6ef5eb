"""Segmenting a FiftyOne collection: labels, quality attributes and failure tags written back."""

from __future__ import annotations

import collections
import os
import re

import numpy as np

TAG_PREFIX = "insid3:"
FAILURES = ("too_small", "too_large", "fragmented", "empty", "unreadable")
WRITE_EVERY = 32  # samples per database write


class OutputProblem(ValueError):
    """The output field cannot be written; the message is meant for the App user."""


def failure_tag(category: str) -> str:
    """Sample tag of a failure category, e.g. ``insid3:too_small``."""
    return TAG_PREFIX + category


def default_output_field(dataset, base: str = "insid3") -> str:
    """``base``, or ``base_2``, ``base_3``... whichever is the first new field of ``dataset``."""
    schema = dataset.get_field_schema()
    name, number = base, 1
    while name in schema:
        number += 1
        name = f"{base}_{number}"
    return name


def check_output_field(dataset, output_field: str, reference_field: str, overwrite: bool) -> None:
    """Raise :class:`OutputProblem` unless predictions may be written to ``output_field``.

    A new top-level field is always fine; an existing one only with ``overwrite`` and when it
    holds ``Segmentation`` labels; the references' own field never.
    """
    import fiftyone as fo

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", output_field or ""):
        raise OutputProblem(f"'{output_field}' is not a valid field name (letters, digits, '_'; a letter first)")
    if output_field == reference_field:
        raise OutputProblem(f"'{output_field}' holds the reference masks; choose another output field")
    field = dataset.get_field_schema().get(output_field)
    if field is None:
        return
    if not overwrite:
        raise OutputProblem(f"Field '{output_field}' already exists; tick overwrite to replace its values")
    if getattr(field, "document_type", None) is not fo.Segmentation:
        raise OutputProblem(f"Field '{output_field}' exists and does not hold Segmentation labels")


def segment_collection(segmenter, references, dataset, targets, output_field: str, batch_size: int,
                       mask_dir: str | None, counts: collections.Counter):
    """Segment every sample of ``targets``, writing as it goes; yields ``(done, total)``.

    Parameters
    ----------
    segmenter : insid3_core.Segmenter
    references : insid3_core.ReferenceSet
    dataset : fiftyone.core.dataset.Dataset
    targets : fiftyone.core.collections.SampleCollection
        Samples of ``dataset`` to segment.
    output_field : str
        Receives a ``Segmentation`` per target with ``score``, ``verdict``, ``area_ratio``,
        ``components`` and ``largest_component_ratio`` (``None`` for an unreadable target).
    batch_size : int
    mask_dir : str or None
        Folder for ``<output_field>/<sample id>.png`` mask files (0/255, referenced by
        ``mask_path``); ``None`` stores the masks inline.
    counts : collections.Counter
        Incremented per verdict (and ``unreadable``).

    Each target also loses its earlier failure tags and gets ``insid3:<category>`` when its
    mask is not ``ok``.
    """
    ids, paths = targets.values(["id", "filepath"])
    samples_of = collections.defaultdict(collections.deque)  # unreadable targets may come out early
    for sample_id, path in zip(ids, paths):
        samples_of[path].append(sample_id)
    pending: list[tuple[str, object]] = []
    for done, (path, result) in enumerate(segmenter.iter_segment(references, paths, batch_size), start=1):
        pending.append((samples_of[path].popleft(), result))
        if len(pending) == WRITE_EVERY or done == len(ids):
            _write(dataset, output_field, pending, mask_dir, counts)
            pending = []
        yield done, len(ids)
    dataset.add_dynamic_sample_fields(fields=output_field)


def _write(dataset, output_field, results, mask_dir, counts) -> None:
    from insid3_core import InputError

    labels, failed = {}, collections.defaultdict(list)
    for sample_id, result in results:
        if isinstance(result, InputError):
            labels[sample_id] = None
            category = "unreadable"
        else:
            labels[sample_id] = _label(result, mask_dir and os.path.join(mask_dir, output_field, f"{sample_id}.png"))
            category = result.quality.verdict
        counts[category] += 1
        if category != "ok":
            failed[category].append(sample_id)
    dataset.set_values(output_field, labels, key_field="id")
    dataset.select(list(labels)).untag_samples([failure_tag(category) for category in FAILURES])
    for category, sample_ids in failed.items():
        dataset.select(sample_ids).tag_samples(failure_tag(category))


def _label(result, mask_path: str | None):
    import fiftyone as fo

    attributes = dict(score=result.score, **result.quality.as_dict())
    if mask_path is None:
        return fo.Segmentation(mask=np.where(result.mask, 255, 0).astype(np.uint8), **attributes)
    from insid3_core.io import write_mask_png

    write_mask_png(mask_path, result.mask)
    return fo.Segmentation(mask_path=mask_path, **attributes)
