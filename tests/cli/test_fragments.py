"""The sorted fragments of ``insid3 segment --ray`` merged into one annotations.json: in passes
when there are more than the fan-in, each name once, by the priority the workers' outcomes have."""

from __future__ import annotations

import json
import random

import numpy as np

from insid3_core import fragments
from insid3_core.coco import coco_document, mask_record
from insid3_core.fragments import fragment_file, merge_fragments

INFO = {"description": "insid3 segment", "run": "r1"}


def record(name: str, seed: int, categories=("object",)) -> dict:
    """A record as the workers settle it: a random ``(6, 5)`` mask of ``name``."""
    labels = np.random.default_rng(seed).integers(0, 2, (6, 5)).astype(np.uint8) * 255
    return mask_record(name, labels, list(categories))


def entry(name: str, status: str, source: str, **fields) -> dict:
    return {"name": name, "status": status, "source": source, **fields}


def merged(tmp_path, groups: list[list[dict]], categories=("object",)):
    parts = tmp_path / "parts"
    parts.mkdir()
    for index, group in enumerate(groups):  # each from its own writer, as Ray's processes are
        name, content = fragment_file(group)
        (parts / f"{index:03d}-{name}").write_bytes(content)
    destination = tmp_path / "annotations.json"
    summary = merge_fragments(parts, destination, list(categories), INFO)
    return summary, json.loads(destination.read_text()), parts


def test_many_fragments_merge_in_passes_into_the_single_machines_document(tmp_path, monkeypatch):
    """60 targets over 25 fragments merged 3 at a time (two passes, then the final merge), a
    retried batch's fragment written twice, earlier records kept where this job did not touch
    them: the document :func:`coco_document` makes of the same records."""
    monkeypatch.setattr(fragments, "MERGE_FAN_IN", 3)
    names = [f"target_{index:03d}.png" for index in range(60)]
    segmented = [entry(name, "segmented", f"/data/{name}", record=record(name, index))
                 for index, name in enumerate(names[:50])]
    skipped = [entry(name, "skipped", f"/data/{name}", record=record(name, 100 + index))
               for index, name in enumerate(names[50:55])]
    earlier = [entry(name, "earlier", f"/old/{name}", record=record(name, 200 + index))
               for index, name in enumerate(names[45:])]  # 45-49 segmented again, 50-54 skipped
    shuffled = segmented + skipped + earlier
    random.Random(0).shuffle(shuffled)
    groups = [shuffled[start:start + 3] for start in range(0, len(shuffled), 3)]
    groups.append(groups[4])  # a batch Ray ran again on a restarted actor
    summary, document, parts = merged(tmp_path, groups)

    expected = {e["name"]: e["record"] for e in earlier}
    expected.update((e["name"], e["record"]) for e in segmented + skipped)
    assert document == json.loads(json.dumps(coco_document(expected, ["object"], INFO)))
    assert (summary.segmented, summary.skipped, summary.failed) == (50, 5, 0)
    assert len(groups) == 25 and list(parts.glob("pass2-*.jsonl")) and not list(parts.glob("pass3-*.jsonl"))


def test_the_merge_keeps_one_record_a_name_and_reports_what_failed(tmp_path):
    """A failure whose source is listed anyway (a retry that worked) is not reported; two
    sources of one file name share an output mask, so neither is listed and both fail."""
    done = record("a.png", 1)
    groups = [
        [entry("a.png", "failed", "/data/a.png", error="/data/a.png: worker died"),
         entry("b.png", "failed", "/data/b.png", error="/data/b.png: unreadable")],
        [entry("a.png", "segmented", "/data/a.png", record=done),
         entry("c.png", "segmented", "/one/c.png", record=record("c.png", 2))],
        [entry("c.png", "skipped", "/two/c.png", record=record("c.png", 3)),
         entry("d.png", "earlier", "/old/d.png", record=record("d.png", 4, ("object", "old class")))],
    ]
    summary, document, _ = merged(tmp_path, groups)
    assert [image["file_name"] for image in document["images"]] == ["a.png", "d.png"]
    assert summary.failures == [
        "/data/b.png: unreadable",
        "/one/c.png: shares its output mask c.png with /two/c.png; give the targets distinct names or separate "
        "--out folders",
        "/two/c.png: shares its output mask c.png with /one/c.png; give the targets distinct names or separate "
        "--out folders",
    ]
    assert (summary.segmented, summary.skipped, summary.failed) == (1, 0, 3)
    assert document["categories"] == [{"id": 1, "name": "object"}, {"id": 2, "name": "old class"}], \
        "an earlier run's category is appended, as coco_document does"


def test_records_are_merged_by_the_name_of_their_mask(tmp_path):
    """``a.jpg`` and ``a.png`` share the mask ``a.png``: a segmented ``a.jpg`` takes the place of an
    earlier ``a.png`` record; the order is the masks' (``a.k.png`` before ``a.png``), as
    :func:`coco_document` sorts; two targets failing with one message are both counted."""
    jpg, other = record("a.jpg", 1), record("a.k.png", 2)
    shared = "/out/b.png: another target's mask is there"
    groups = [
        [entry("a.jpg", "segmented", "/data/a.jpg", record=jpg),
         entry("b.png", "failed", "/data/b.png", error=shared)],
        [entry("a.png", "earlier", "/old/a.png", record=record("a.png", 3)),
         entry("a.k.png", "segmented", "/data/a.k.png", record=other),
         entry("b.jpg", "failed", "/data/b.jpg", error=shared)],
    ]
    summary, document, _ = merged(tmp_path, groups)
    assert [image["file_name"] for image in document["images"]] == ["a.k.png", "a.jpg"]
    assert document == json.loads(json.dumps(coco_document({"a.jpg": jpg, "a.k.png": other}, ["object"], INFO)))
    assert (summary.segmented, summary.skipped, summary.failed) == (2, 0, 2)
