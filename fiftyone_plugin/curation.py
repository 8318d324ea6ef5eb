"""Reviewing a predicted mask field: what it holds, the views a curator opens, and the decisions
they take (approve, reject, copy the approved masks into a ground-truth field).

Functions over FiftyOne collections, so that the review panel (:mod:`fiftyone_plugin.panel`) and
Python users share them. A sample's review decision is a tag naming the field,
``insid3:<field>:approved`` or ``insid3:<field>:rejected``; a new run over the sample drops it
(:func:`fiftyone_plugin.segment.is_field_tag`), since the decision was about the old masks.

A video dataset's predictions are frame fields, named ``frames.<field>`` here: verdicts,
scores and classes count frames, and their views hold the videos with only the matching frames;
decisions are the videos' (a tag naming ``<field>``, as the run's tags do), and copying the
approved masks fills ``frames.<ground truth>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field

from insid3_core.quality import VERDICTS

from .segment import DECISIONS, check_field_name, failure_tag, failure_tags

BINS = 10


def decision_tag(field: str, decision: str) -> str:
    """Sample tag of a review decision on ``field``'s masks, e.g. ``insid3:pred:approved``."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got '{decision}'")
    return failure_tag(tag_field(field), decision)


def tag_field(field: str) -> str:
    """``field``'s own name, which tags and the frame schema give it: a video's ``frames.<field>`` is ``<field>``."""
    return field.removeprefix(FRAMES)


@dataclass(frozen=True)
class ClassSummary:
    """One class of a field: samples where it was found, and those whose mask of it failed.

    Attributes
    ----------
    label : str
    found : int
        Samples with a nonempty mask (multi-class ``Segmentation``) or an instance of the class.
    failed : int
        Samples whose mask of the class is judged other than ``ok`` (multi-class
        ``Segmentation`` only; 0 for instances).
    """

    label: str
    found: int
    failed: int = 0


@dataclass(frozen=True)
class FieldSummary:
    """What a curator sees first of a predicted field.

    Attributes
    ----------
    field : str
    kind : str
        ``"Segmentation"`` or ``"Detections"``.
    predicted : int
        Samples with a label in the field.
    verdicts : dict
        Samples per verdict (:data:`VERDICTS`, and ``unreadable``).
    decisions : dict
        Samples per review decision (:data:`DECISIONS`, and ``unreviewed`` of the predicted).
    classes : list of ClassSummary
        Per class, when the field holds several.
    histogram : dict
        ``{"edges": [BINS + 1 floats], "counts": [BINS ints]}`` of the scores in [0, 1].
    """

    field: str
    kind: str
    predicted: int
    verdicts: dict
    decisions: dict
    classes: list = dataclass_field(default_factory=list)
    histogram: dict = dataclass_field(default_factory=dict)


FRAMES = "frames."


def is_frame_field(field: str) -> bool:
    """Whether ``field`` is a video dataset's frame field (``frames.<field>``)."""
    return field.startswith(FRAMES)


def predicted_fields(dataset) -> list[str]:
    """The dataset's ``Segmentation`` and ``Detections`` fields (a video dataset's frame fields,
    as ``frames.<field>``), those insid3 wrote first (in the order it wrote them, the last one
    last), then the others by name."""
    import fiftyone as fo

    schema = dataset.get_frame_field_schema if dataset.media_type == "video" else dataset.get_field_schema
    fields = [_prefixed(dataset, name)
              for name in sorted(schema(embedded_doc_type=(fo.Segmentation, fo.Detections)) or {})]
    made = _written(dataset, fields)
    return made + [name for name in fields if name not in made]


def default_field(dataset) -> str | None:
    """The field insid3 wrote last, else ``insid3`` when present, else the first mask field."""
    fields = predicted_fields(dataset)
    made = _written(dataset, fields)
    default = _prefixed(dataset, "insid3")
    return made[-1] if made else default if default in fields else next(iter(fields), None)


def summarize(collection, field: str) -> FieldSummary:
    """Count what ``field`` holds in ``collection``: verdicts, decisions, classes and scores.

    One aggregation round trip for the counts and the histogram.
    """
    import fiftyone as fo

    kind = _kind(collection, field)
    verdicts, tags, histogram, predicted = collection.aggregate([
        fo.CountValues(f"{field}.verdict"), fo.CountValues("tags"),
        fo.HistogramValues(f"{field}.score", bins=BINS, range=[0.0, 1.0]), fo.Count(field),
    ])
    samples = len(collection.exists(field)) if is_frame_field(field) else predicted  # decisions: the videos'
    counts, edges, _ = histogram
    by_verdict = {verdict: int(verdicts.get(verdict, 0)) for verdict in VERDICTS}
    by_verdict["unreadable"] = sum(int(tags.get(tag, 0)) for tag in failure_tags(tag_field(field), "unreadable"))
    decisions = {decision: int(tags.get(decision_tag(field, decision), 0)) for decision in DECISIONS}
    decisions["unreviewed"] = max(samples - sum(decisions.values()), 0)
    return FieldSummary(field, kind, predicted, by_verdict, decisions, class_summaries(collection, field, kind),
                        {"edges": [round(float(edge), 3) for edge in edges], "counts": [int(c) for c in counts]})


def class_summaries(collection, field: str, kind: str) -> list[ClassSummary]:
    """Per class of ``field`` (its detections' labels, or a multi-class ``Segmentation``'s
    ``classes``), when there are several; else ``[]``."""
    import fiftyone as fo

    if kind == "Detections":
        labels = sorted(collection.distinct(f"{field}.detections.label"))
        if len(labels) < 2:
            return []
        return [ClassSummary(label, len(class_view(collection, field, label))) for label in labels]
    keys = class_keys(collection, field)
    if len(keys) < 2:
        return []
    counted = collection.aggregate([fo.CountValues(f"{field}.classes.{key}.verdict") for key in keys])
    return [ClassSummary(key, sum(n for verdict, n in verdicts.items() if verdict not in (None, "empty")),
                         sum(n for verdict, n in verdicts.items() if verdict not in (None, "ok")))
            for key, verdicts in zip(keys, counted)]


def class_keys(collection, field: str) -> list[str]:
    """The class keys of a multi-class ``Segmentation`` field's ``classes`` attribute (one
    sample's is enough: a run writes every class for every target)."""
    from fiftyone import ViewField as F

    found = _matching(collection, field, lambda label: F(f"{label}.classes") != None)  # noqa: E711
    values = found.limit(1).values(f"{field}.classes")
    if is_frame_field(field):  # per video, a list of its frames' values
        values = [frame for frames in values for frame in frames]
    first = next((value for value in values if value), None)
    return sorted(first) if first else []


def verdict_view(collection, field: str, verdict: str):
    """Samples whose mask in ``field`` is judged ``verdict`` (``unreadable``: by their tag)."""
    from fiftyone import ViewField as F

    if verdict == "unreadable":
        return collection.match_tags(failure_tags(tag_field(field), verdict))
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)} or unreadable, got '{verdict}'")
    return _matching(collection, field, lambda label: F(f"{label}.verdict") == verdict)


def decision_view(collection, field: str, decision: str):
    """Samples carrying a review decision on ``field`` (``unreviewed``: predicted, neither)."""
    if decision == "unreviewed":
        return collection.exists(field).match_tags([decision_tag(field, d) for d in DECISIONS], bool=False)
    return collection.match_tags(decision_tag(field, decision))


def class_view(collection, field: str, label: str, failed: bool = False):
    """Samples where class ``label`` was found in ``field`` (only its instances shown), or with
    ``failed``, those whose mask of it is judged other than ``ok``."""
    from fiftyone import ViewField as F

    from .labels import class_key

    if _kind(collection, field) == "Detections":
        return collection.filter_labels(field, F("label") == label)

    def judged(name: str):
        verdict = F(f"{name}.classes.{class_key(label)}.verdict")
        return (verdict != None) & (verdict != ("ok" if failed else "empty"))  # noqa: E711

    return _matching(collection, field, judged)


def score_view(collection, field: str, low: float = 0.0, high: float = 1.0):
    """Samples whose ``field`` score is in ``[low, high)`` (``high`` 1.0 includes 1.0)."""
    from fiftyone import ViewField as F

    def scored(name: str):
        score = F(f"{name}.score")
        return (score >= low) & (score <= high if high >= 1.0 else score < high)

    return _matching(collection, field, scored)


def decide(samples, field: str, decision: str) -> int:
    """Tag the samples of ``samples`` that have a label in ``field`` with ``decision`` (and drop
    the opposite one); return how many were tagged."""
    tag = decision_tag(field, decision)
    _kind(samples, field)  # a ValueError for a field that holds no predictions
    predicted = samples.exists(field)
    predicted.untag_samples([decision_tag(field, other) for other in DECISIONS if other != decision])
    predicted.tag_samples(tag)
    return len(predicted)


@dataclass(frozen=True)
class CopyResult:
    """What :func:`copy_approved` did.

    Attributes
    ----------
    copied : int
        Approved samples (of videos: frames) whose label now fills the ground-truth field.
    kept : int
        Approved samples (frames) whose ground truth was kept (it existed and ``replace`` was off).
    """

    copied: int
    kept: int


def copy_approved(dataset, field: str, target_field: str, replace: bool = False) -> CopyResult:
    """Copy the labels of the samples approved for ``field`` into ``target_field``.

    The copies hold their masks in the database (``mask``), not a ``mask_path``: a later run
    rewrites the prediction's mask files, and the ground truth must not change with them. The
    field's mask targets come along. Existing ground truth stays unless ``replace``.

    Raises
    ------
    ValueError
        ``target_field`` is not a field name, is ``field`` itself, holds another label type, or
        has mask targets and ``field`` other ones (or none).
    """
    check_field_name(target_field)
    if target_field == tag_field(field):
        raise ValueError(f"'{target_field}' is the predicted field itself; choose a ground-truth field")
    kind = _kind(dataset, field)
    frames = is_frame_field(field)
    target_path = FRAMES + target_field if frames else target_field
    existing = _field_type(dataset, target_path)
    if existing is not None and getattr(getattr(existing, "document_type", None), "__name__", None) != kind:
        raise ValueError(f"field '{target_path}' does not hold {kind} labels")
    targets, theirs = dataset.mask_targets.get(field), dataset.mask_targets.get(target_path)
    if theirs and theirs != targets:
        raise ValueError(f"field '{target_path}' has other mask targets than '{field}' ({theirs} against "
                         f"{targets or 'none'}): its masks' values would not mean the same; choose another "
                         "ground-truth field")
    approved = decision_view(dataset, field, "approved").exists(field)
    if frames:
        copied, kept = _copy_frames(approved, field, target_path, existing is not None, replace)
    else:
        ids, labels = approved.values(["id", field])
        present = approved.values(target_field) if existing is not None else [None] * len(ids)
        copies = {sample_id: _inline_copy(label) for sample_id, label, current in zip(ids, labels, present)
                  if replace or current is None}
        if copies:
            dataset.set_values(target_field, copies, key_field="id", dynamic=True)
        copied, kept = len(copies), len(ids) - len(copies)
    if targets and target_path not in dataset.mask_targets:
        dataset.mask_targets = {**dataset.mask_targets, target_path: targets}
        dataset.save()
    return CopyResult(copied, kept)


def _copy_frames(videos, field: str, target_path: str, exists: bool, replace: bool) -> tuple[int, int]:
    """:func:`copy_approved` of the frames of ``videos``: ``(frames copied, frames kept)``."""
    labels = videos.values(field)  # per video, its frames' labels in frame order
    present = videos.values(target_path) if exists else [[None] * len(frames) for frames in labels]
    copied = kept = 0
    values = []
    for frame_labels, frame_present in zip(labels, present):
        row = []
        for label, current in zip(frame_labels, frame_present):
            take = label is not None and (replace or current is None)
            row.append(_inline_copy(label) if take else current)
            copied += take
            kept += label is not None and not take
        values.append(row)
    if copied:
        videos.set_values(target_path, values, dynamic=True)
    return copied, kept


def run_description(dataset, field: str) -> str:
    """Markdown of how ``field`` was made (``dataset.info["insid3"][field]``): the weights, the
    references per class and the settings given (unset ones left out); a line saying so when
    insid3 did not write it."""
    made = ((dataset.info or {}).get("insid3") or {}).get(tag_field(field))
    if not made:
        return f"`{field}` was not written by insid3: no run settings to show."
    weights = made.get("weights_id") or "none"
    lines = [f"**{made.get('backbone', '?')}**, weights `{weights}`, insid3 {made.get('version', '?')}"]
    if made.get("smoke_test"):
        lines[0] += " (smoke-test weights: the masks carry no semantics)"
    lines += ["", "| class | references |", "|---|---|"]
    lines += [f"| {label} | {', '.join(names)} |" for label, names in (made.get("references") or {}).items()]
    lines += ["", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in sorted((made.get("settings") or {}).items())
              if value is not None]
    return "\n".join(lines)


def _kind(collection, field: str) -> str:
    """``"Segmentation"`` or ``"Detections"``: the labels of ``field``; a ``ValueError`` otherwise."""
    kind = getattr(_field_type(collection, field), "document_type", None)
    if getattr(kind, "__name__", None) not in ("Segmentation", "Detections"):
        dataset = collection._root_dataset.name
        raise ValueError(f"'{field}' is no Segmentation or Detections field of dataset '{dataset}'")
    return kind.__name__


def _field_type(collection, field: str):
    """The schema entry of ``field`` (of a frame field, in the frame schema), or ``None``."""
    if is_frame_field(field):
        return (collection.get_frame_field_schema() or {}).get(tag_field(field))
    return collection.get_field_schema().get(field)


def _written(dataset, fields: list[str]) -> list[str]:
    """The fields of ``fields`` insid3 wrote (``dataset.info["insid3"]``), in the order it wrote them."""
    made = (_prefixed(dataset, name) for name in ((dataset.info or {}).get("insid3") or {}))
    return [name for name in made if name in fields]


def _prefixed(dataset, name: str) -> str:
    """``name`` of a run's field as :func:`predicted_fields` lists it (``frames.<name>`` on videos)."""
    return FRAMES + name if dataset.media_type == "video" else name


def _matching(collection, field: str, condition):
    """The samples whose label in ``field`` meets ``condition`` (the label's path to a
    ``ViewExpression``); of a frame field, the videos holding such frames, with those only."""
    if is_frame_field(field):
        return collection.match_frames(condition(tag_field(field)))
    return collection.match(condition(field))


def _inline_copy(label):
    """A copy of a ``Segmentation`` or ``Detections`` with every mask read into ``mask``."""
    copy = label.copy()
    for holder in getattr(copy, "detections", None) or [copy]:
        if getattr(holder, "mask_path", None):
            holder.import_mask(update=True)
    return copy
