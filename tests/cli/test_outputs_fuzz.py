"""Fuzzing (hypothesis, bounded for CI) of what a rerun of ``insid3 segment`` reads back from its
``--out``: an earlier annotations.json and the records output masks carry, each with one value
anywhere replaced by any JSON value. The document is refused with a :class:`UsageError` naming
it, or taken whole and written again; a record is taken, or ignored (the mask's pixels rebuild
it); never a bare Python error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from fuzzing import FUZZ, json_values
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from insid3_core.cli import UsageError
from insid3_core.cli.segment import earlier_records, parse_document
from insid3_core.coco import coco_document, mask_record, records_from_document
from insid3_core.outputs import RECORD_KEY, RUN_DESCRIPTION, carried_record

CATEGORIES = ["cat", "dog"]
LABELS = np.zeros((6, 8), np.uint8)
LABELS[1:3, 1:4], LABELS[3:5, 4:7] = 1, 2
RECORDS = {name: mask_record(name, LABELS, CATEGORIES) for name in ("a.png", "b.png")}
DOCUMENT = coco_document(RECORDS, CATEGORIES, {"description": RUN_DESCRIPTION, "runs": {"0123456789ab": {}}})
PATH = Path("out/annotations.json")


def places(value, at=()) -> list[tuple]:
    """The key paths of every value inside ``value``, ``value`` itself included."""
    inside = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [at, *(place for key, child in inside for place in places(child, (*at, key)))]


def replaced(value, at: tuple, new):
    """A deep copy of ``value`` with the value at key path ``at`` replaced by ``new``."""
    if not at:
        return new
    copy = json.loads(json.dumps(value))
    parent = copy
    for key in at[:-1]:
        parent = parent[key]
    parent[at[-1]] = new
    return copy


@st.composite
def mutated(draw, value):
    return replaced(value, draw(st.sampled_from(places(value))), draw(json_values))


def reassembled(records: dict, info: dict) -> dict:
    """What a rerun writes back: this run's categories, then the earlier records in a COCO document
    (which must serialise)."""
    document = coco_document(records, CATEGORIES, info)
    json.dumps(document)
    return document


@FUZZ
@given(document=mutated(DOCUMENT))
@example(document=replaced(DOCUMENT, ("categories", 0, "name"), ["a", "list"]))
@example(document=replaced(DOCUMENT, ("images", 0, "file_name"), None))
@example(document=replaced(DOCUMENT, ("images",), {"file_name": "a.png"}))
@example(document=replaced(DOCUMENT, ("annotations", 0), "an annotation"))
def test_an_edited_annotations_file_is_refused_by_name_or_written_again(document):
    try:
        parsed = parse_document(json.dumps(document).encode(), PATH, overwrite=False)
        records = earlier_records(parsed, CATEGORIES, PATH, overwrite=False)
    except UsageError as err:
        assert str(PATH) in str(err)
        return
    written = reassembled(records, {**parsed["info"], "runs": dict(parsed["info"].get("runs", {}))})
    assert records_from_document(written) == records


@FUZZ
@given(record=mutated(RECORDS["a.png"]))
@example(record=replaced(RECORDS["a.png"], ("annotations", 0, "category"), ["a", "list"]))
@example(record=replaced(RECORDS["a.png"], ("annotations", 0), "an annotation"))
def test_an_edited_carried_record_is_taken_or_ignored(record):
    info = PngInfo()
    info.add_text(RECORD_KEY, json.dumps(record))
    png = io.BytesIO()
    Image.fromarray(LABELS).save(png, "PNG", pnginfo=info)
    png.seek(0)
    carried = carried_record(png)
    if carried is not None:
        reassembled({"a.png": carried}, {"description": RUN_DESCRIPTION})
