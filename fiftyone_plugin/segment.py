"""Segmenting a FiftyOne collection: labels, quality attributes and failure tags written back."""

from __future__ import annotations

import collections
import re

TAG_PREFIX = "insid3:"
FAILURES = ("too_small", "too_large", "fragmented", "empty", "unreadable")
DECISIONS = ("approved", "rejected")  # a curator's review of the masks (fiftyone_plugin.curation)
WRITE_EVERY = 32  # samples per database write


class OutputProblem(ValueError):
    """The output field cannot be written; the message is meant for the App user."""


def failure_tag(field: str, category: str, label: str | None = None) -> str:
    """Sample tag of a failure category of the masks in ``field``, e.g. ``insid3:pred:too_small``,
    or of one class's, e.g. ``insid3:pred:car:empty``."""
    return f"{TAG_PREFIX}{field}:" + (category if label is None else f"{label}:{category}")


def failure_tags(field: str, category: str) -> list[str]:
    """The tags marking ``category`` for ``field``: :func:`failure_tag`'s, and the
    ``insid3:<category>`` of earlier versions (which named no field), so old tags stay readable."""
    return [failure_tag(field, category), TAG_PREFIX + category]


def is_field_tag(tag: str, field: str) -> bool:
    """Whether ``tag`` is a :func:`failure_tag` of ``field`` (of the whole mask or of one class)
    or a review decision on it: a tag about masks that a new run replaces."""
    return tag.startswith(f"{TAG_PREFIX}{field}:") and tag.rsplit(":", 1)[-1] in FAILURES + DECISIONS


def default_output_field(dataset, base: str = "insid3") -> str:
    """``base``, or ``base_2``, ``base_3``... whichever is the first new field of ``dataset`` (a
    frame field of a video dataset)."""
    from .video import label_schema

    schema = label_schema(dataset)
    name, number = base, 1
    while name in schema:
        number += 1
        name = f"{base}_{number}"
    return name


def check_field_name(name: str) -> None:
    """Raise :class:`OutputProblem` unless ``name`` can be a new field: letters, digits and ``_``,
    a letter first."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name or ""):
        raise OutputProblem(f"'{name}' is not a valid field name (letters, digits, '_'; a letter first)")


def check_output_field(dataset, output_field: str, reference_field: str, overwrite: bool, kind=None) -> None:
    """Raise :class:`OutputProblem` unless labels of ``kind`` may be written to ``output_field``.

    A new top-level field is always fine; an existing one only with ``overwrite`` and when it
    holds labels of ``kind`` (``fo.Segmentation`` by default, or ``fo.Detections``); the
    references' own field never.
    """
    import fiftyone as fo

    kind = kind or fo.Segmentation
    check_field_name(output_field)
    if output_field == reference_field:
        raise OutputProblem(f"'{output_field}' holds the reference masks; choose another output field")
    field = dataset.get_field_schema().get(output_field)
    if field is None:
        return
    if not overwrite:
        raise OutputProblem(f"Field '{output_field}' already exists; tick overwrite to replace its values")
    if getattr(field, "document_type", None) is not kind:
        raise OutputProblem(f"Field '{output_field}' exists and does not hold {kind.__name__} labels")


def segment_collection(segmenter, classes: dict, dataset, targets, outputs, batch_size: int,
                       counts: collections.Counter, predictions=None):
    """Segment every sample of ``targets`` in one pass for all classes, writing as it goes.

    Parameters
    ----------
    segmenter : insid3_core.Segmenter
    classes : insid3_core.References
        The encoded references of each class, in the order of ``outputs.classes``.
    dataset : fiftyone.core.collections.SampleCollection
        The dataset, or the frames view of a video dataset (see :mod:`fiftyone_plugin.video`).
    targets : fiftyone.core.collections.SampleCollection
        Samples (frames) of ``dataset`` to segment.
    outputs : fiftyone_plugin.labels.Outputs
        Fields and labels to write: a ``Segmentation`` and/or ``Detections`` per target, with
        ``score``, ``verdict``, ``area_ratio``, ``components`` and ``largest_component_ratio``
        (``None`` for an unreadable target).
    batch_size : int
    counts : collections.Counter
        Incremented per verdict (and ``unreadable``).
    predictions : callable or None
        ``predictions(paths)`` yielding ``(path, Prediction or InputError)`` in any order (a Ray
        cluster's, :func:`insid3_core.distributed.iter_predictions`); ``None``: ``segmenter``'s.

    Yields
    ------
    (int, int)
        Targets done, targets in all.

    Each target also loses its earlier failure tags and review decisions of the run's first
    field ``F`` and gets
    ``insid3:F:<category>`` when its mask is not ``ok`` and, with several classes,
    ``insid3:F:<label>:<category>`` for each class
    whose own mask is not ``ok``. On a video's frames these tags are the tags of the frame's
    label (an unreadable frame, which has none, tags its video), and a run drops the earlier tags
    and decisions of the videos it works on. The ``Segmentation`` field gets ``outputs.mask_targets`` at
    the end (or loses the mask targets of an earlier run when there are none).
    """
    ids, paths = targets.values(["id", "filepath"])
    if dataset._root_dataset.media_type == "video":
        _untag_field(dataset._root_dataset.select(targets.distinct("sample_id")), outputs.fields[0])
    samples_of = collections.defaultdict(collections.deque)  # unreadable targets may come out early
    for sample_id, path in zip(ids, paths):
        samples_of[path].append(sample_id)
    pending: list[tuple[str, object]] = []
    results = predictions(paths) if predictions else segmenter.iter_segment(classes, paths, batch_size)
    for done, (path, result) in enumerate(results, start=1):
        pending.append((samples_of[path].popleft(), result))
        if len(pending) == WRITE_EVERY or done == len(ids):
            _write(dataset, outputs, pending, segmenter.quality, counts)
            pending = []
        yield done, len(ids)
    root = dataset._root_dataset  # a frames view writes through to its video dataset's frames
    prefix = "frames." if root.media_type == "video" else ""
    if prefix:
        root.add_dynamic_frame_fields(fields=outputs.fields)
    else:
        root.add_dynamic_sample_fields(fields=outputs.fields)
    if outputs.segmentation_field:
        others = {name: targets for name, targets in root.mask_targets.items()
                  if name != prefix + outputs.segmentation_field}
        root.mask_targets = {**others, **({prefix + outputs.segmentation_field: outputs.mask_targets}
                                          if outputs.mask_targets else {})}


def _write(dataset, outputs, results, thresholds, counts) -> None:
    from insid3_core import InputError

    from .labels import sample_labels

    labels = {name: {} for name in outputs.fields}
    field = outputs.fields[0]  # the one the failure tags name
    on_frames = dataset._root_dataset.media_type == "video"
    failed = collections.defaultdict(list)
    for sample_id, result in results:
        if isinstance(result, InputError):
            written, category = dict.fromkeys(outputs.fields), "unreadable"
        else:
            written, category = sample_labels(result, outputs, sample_id, thresholds)
        for name, label in written.items():
            labels[name][sample_id] = label
        counts[category] += 1
        tags = [failure_tag(field, category)] if category != "ok" else []
        if outputs.multiclass and not isinstance(result, InputError):
            tags += [failure_tag(field, class_result.quality.verdict, label)
                     for (label, _), class_result in zip(outputs.classes, result.classes.values())
                     if class_result.quality.verdict != "ok"]
        if on_frames and written[field] is not None:
            _tag_label(written[field], tags)
        else:
            for tag in tags:
                failed[tag].append(sample_id)
    for name, values in labels.items():
        dataset.set_values(name, values, key_field="id")
    if on_frames:  # an unreadable frame tags its video (the video's earlier tags went at the start)
        for tag, frame_ids in failed.items():
            dataset._root_dataset.select(dataset.select(frame_ids).distinct("sample_id")).tag_samples(tag)
        return
    written = dataset.select([sample_id for sample_id, _ in results])
    _untag_field(written, field)
    for tag, sample_ids in failed.items():
        dataset.select(sample_ids).tag_samples(tag)


def _untag_field(samples, field: str) -> None:
    """Drop the failure tags and review decisions of ``field`` from ``samples``."""
    samples.untag_samples([tag for tag in samples.distinct("tags") if is_field_tag(tag, field)])


def _tag_label(label, tags: list[str]) -> None:
    """Give a video frame's label (a ``Segmentation``, or each ``Detection`` of a ``Detections``)
    its failure ``tags`` as label tags: a frames view's sample tags would stay in FiftyOne's
    generated frames dataset, unseen on the video's frames."""
    for holder in label.detections if hasattr(label, "detections") else [label]:
        holder.tags = list(tags)
