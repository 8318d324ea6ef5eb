"""Settled targets as sorted JSON-lines fragments, and their merge into one COCO document in
bounded memory: how the workers of :mod:`insid3_core.distributed` hand their records to the driver.

Each line of a fragment is the name of the target's mask in JSON
(:func:`~insid3_core.coco.mask_file_name`: ``a.jpg`` and ``a.png`` share ``a.png``), a tab, and
the target's entry in JSON: ``name``,
``status`` (``segmented``, ``skipped``, ``failed``, or ``earlier`` for an earlier document's
record), ``source``, and ``record`` (its annotations.json record) or ``error``. Written here: no
well-kept library merges sorted JSON-lines files into a COCO document without holding it.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .coco import coco_entries, mask_file_name
from .io import atomic_write, left_out_note

MERGE_FAN_IN = 64
"""Fragments merged at once; more are merged in passes."""
SHOWN_FAILURES = 100
"""Failures a summary names one by one; the rest are counted."""


@dataclass
class JobSummary:
    """What a job did, read back from its fragments and its stream.

    Attributes
    ----------
    segmented, skipped, failed : int
    verdicts : collections.Counter
        Quality verdicts of the masks segmented now, per class.
    failures : list of str
        The first :data:`SHOWN_FAILURES` failure messages, each naming its target.
    smoke_test : bool
        Whether the actors ran the bundled test checkpoint.
    left_out : dict of str to dict of str to int
        Per TARGET folder, its files that are not images, by kind
        (:func:`~insid3_core.io.not_image_kind`).
    """

    segmented: int = 0
    skipped: int = 0
    failed: int = 0
    verdicts: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    smoke_test: bool = False
    left_out: dict[str, dict[str, int]] = field(default_factory=dict)


def fragment_file(entries: list[dict]) -> tuple[str, bytes]:
    """``(file name, content)`` of one fragment of settled entries: a line per entry, sorted by
    the name of its mask, that name in JSON, a tab, the entry in JSON (the merge reads the names
    without decoding entries). The file name is unique to the content and the writing process."""
    keyed = ((mask_file_name(entry["name"]), entry) for entry in entries)
    lines = sorted((key, json.dumps(key) + "\t" + json.dumps(entry, separators=(",", ":"))) for key, entry in keyed)
    content = "".join(line + "\n" for _, line in lines).encode("utf-8")
    return f"{hashlib.sha256(content).hexdigest()[:20]}-{os.getpid()}.jsonl", content


def _sorted_lines(path: Path) -> Iterator[tuple[str, str]]:
    """``(mask name, line)`` of a fragment, in its (sorted) order."""
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            yield json.loads(line[:line.index("\t")]), line


def merge_fragments(parts: Path, destination: Path, categories: list[str], info: dict) -> JobSummary:
    """Merge the job's sorted fragments into the COCO document ``destination`` in bounded memory.

    Fragments are merged :data:`MERGE_FAN_IN` at a time (in passes when there are more), each
    mask listed once: a segmented entry before a skipped one before an earlier run's; a failure
    is reported unless the same source also has a record; two sources with a record of one
    mask (``a/x.png`` and ``b/x.jpg``) both fail, neither listed. Ids follow the sorted mask
    names, numbered by :func:`insid3_core.coco.coco_entries` as in
    :func:`insid3_core.coco.coco_document`.
    """
    fragments = sorted(parts.glob("*.jsonl"))
    passes = 0
    while len(fragments) > MERGE_FAN_IN:
        passes += 1
        merged = []
        for start in range(0, len(fragments), MERGE_FAN_IN):
            group = fragments[start:start + MERGE_FAN_IN]
            target = parts / f"pass{passes}-{start:09d}.jsonl"
            with atomic_write(target, "w") as stream:
                stream.writelines(line for _, line in heapq.merge(*map(_sorted_lines, group)))
            for used in group:
                used.unlink()
            merged.append(target)
        fragments = merged
    category_ids = {name: index for index, name in enumerate(dict.fromkeys(categories), start=1)}
    summary = JobSummary()
    images_part, annotations_part = parts / "images.partial", parts / "annotations.partial"
    with open(images_part, "w", encoding="utf-8") as images, open(annotations_part, "w", encoding="utf-8") as notes:
        listed = _listed(heapq.merge(*map(_sorted_lines, fragments)), summary)
        for image, entries in coco_entries(listed, category_ids):
            images.write(("," if image["id"] > 1 else "") + json.dumps(image))
            for entry in entries:
                notes.write(("," if entry["id"] > 1 else "") + json.dumps(entry))
    with atomic_write(destination, "w") as stream:
        stream.write('{"info": ' + json.dumps(info) + ', "images": [')
        with open(images_part, encoding="utf-8") as part:
            shutil.copyfileobj(part, stream)
        stream.write('], "annotations": [')
        with open(annotations_part, encoding="utf-8") as part:
            shutil.copyfileobj(part, stream)
        categories_json = [{"id": index, "name": name} for name, index in category_ids.items()]
        stream.write('], "categories": ' + json.dumps(categories_json) + "}\n")
    return summary


PRIORITY = {"segmented": 0, "skipped": 1, "earlier": 2}


def _listed(lines, summary: JobSummary) -> Iterator[dict]:
    """The record to list of each mask of the merged ``(mask name, line)`` stream, counting what
    :func:`_chosen` decides into ``summary``."""
    for _, group in _grouped(lines):
        record, failures = _chosen(group, summary)
        summary.failures.extend(failures[:max(SHOWN_FAILURES - len(summary.failures), 0)])
        summary.failed += len(failures)
        if record is not None:
            yield record


def _grouped(lines) -> Iterator[tuple[str, list[dict]]]:
    """Consecutive lines of one mask name, decoded."""
    current, group = None, []
    for name, line in lines:
        if name != current and group:
            yield current, group
            group = []
        current = name
        group.append(json.loads(line[line.index("\t") + 1:]))
    if group:
        yield current, group


def _chosen(group: list[dict], summary: JobSummary) -> tuple[dict | None, list[str]]:
    """The record to list for one mask and the failures to report; counts the record's status.

    Two targets of this job with one file stem (``a/x.png``, ``b/x.png``, ``x.jpg``) share an
    output mask: without ``--overwrite`` the second could not place its mask and failed; with
    it, the mask on disk is either's, so neither is listed and both fail. An earlier run's
    record of another name (``x.png`` when ``x.jpg`` is segmented now) goes with its mask.
    """
    sources = list(dict.fromkeys(entry["source"] for entry in group if entry["status"] in ("segmented", "skipped")))
    if len(sources) > 1:
        return None, [f"{source}: shares its output mask {mask_file_name(group[0]['name'])} with "
                      f"{', '.join(other for other in sources if other != source)}; give the targets distinct "
                      "names or separate --out folders" for source in sources]
    records = sorted((entry for entry in group if entry["status"] in PRIORITY), key=lambda e: PRIORITY[e["status"]])
    chosen = records[0] if records else None
    if chosen is not None and chosen["status"] == "segmented":
        summary.segmented += 1
    elif chosen is not None and chosen["status"] == "skipped":
        summary.skipped += 1
    listed_source = None if chosen is None else chosen.get("source")
    failures = {}  # a source's first failure (a batch run again after its actor died fails again)
    for entry in group:
        if entry["status"] == "failed" and entry["source"] != listed_source:
            failures.setdefault(entry["source"], entry["error"])
    return (None if chosen is None else chosen["record"]), list(failures.values())


def earlier_entries(records: dict[str, dict]) -> list[dict]:
    """An earlier annotations.json's records as lowest-priority entries, so masks listed there
    that this job does not touch stay listed."""
    return [{"name": name, "status": "earlier", "source": record["image"].get("source"), "record": record}
            for name, record in records.items()]


def print_summary(summary: JobSummary, out) -> None:
    """The job's counts, the files its folders held that are not images, its quality verdicts and
    failures on stderr."""
    for spec, counts in summary.left_out.items():
        print(left_out_note(spec, counts), file=sys.stderr)
    print(f"insid3: segmented {summary.segmented}, skipped {summary.skipped}, failed {summary.failed} -> {out}",
          file=sys.stderr)
    shown = ", ".join(f"{verdict} {count}" for verdict, count in sorted(summary.verdicts.items()))
    if shown:
        print(f"insid3: quality: {shown}", file=sys.stderr)
    for message in summary.failures:
        print(f"insid3: FAILED {message}", file=sys.stderr)
    if summary.failed > len(summary.failures):
        print(f"insid3: ... and {summary.failed - len(summary.failures)} more failures", file=sys.stderr)
