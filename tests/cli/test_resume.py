"""Outputs a killed or shared run leaves behind: masks and annotations.json stay a consistent pair,
stale temporaries are cleaned, scores survive a rebuild, files respect the umask, an unusable
positional-basis cache is computed again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import insid3_core.cli.segment
from data import EXAMPLES
from insid3_core.cli import main
from test_cli import FAST, REFERENCE, segment


@pytest.fixture
def targets(tmp_path):
    folder = tmp_path / "targets"
    shutil.copytree(EXAMPLES / "targets", folder)
    return folder


def annotations(out):
    return json.loads((out / "annotations.json").read_text())


def by_file(document) -> dict[str, list[dict]]:
    names = {image["id"]: image["file_name"] for image in document["images"]}
    found: dict[str, list[dict]] = {}
    for entry in document["annotations"]:
        found.setdefault(names[entry["image_id"]], []).append(
            {key: value for key, value in entry.items() if key not in ("id", "image_id")})
    return found


def test_a_target_sharing_a_stem_with_a_done_one_is_refused_not_given_its_mask(tmp_path, targets, capsys):
    """a.jpg after a.png into one --out: "already have their mask", a.png's mask listed as a.jpg's."""
    from PIL import Image

    other = tmp_path / "other"
    other.mkdir()
    Image.open(targets / "scene_01.png").convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(other / "scene_01.jpg")
    out = tmp_path / "out"
    assert segment("--out", out, targets / "scene_01.png") == 0
    before = (out / "annotations.json").read_bytes()
    capsys.readouterr()
    assert segment("--out", out, other / "scene_01.jpg") == 2
    assert "the mask of scene_01.png, not of scene_01.jpg" in capsys.readouterr().err
    assert (out / "annotations.json").read_bytes() == before
    assert segment("--out", out, other / "scene_01.jpg", "--overwrite") == 0
    assert [image["file_name"] for image in annotations(out)["images"]] == ["scene_01.jpg"]


def test_a_mask_whose_record_was_lost_is_rebuilt_with_its_score(tmp_path, targets):
    """A kill after a mask's write but before annotations.json's left the mask unlisted; its
    entry came back with ``score: null``."""
    out = tmp_path / "out"
    assert segment("--out", out, targets) == 0
    complete = by_file(annotations(out))
    document = annotations(out)
    lost = next(image["id"] for image in document["images"] if image["file_name"] == "scene_02.png")
    document["annotations"] = [entry for entry in document["annotations"] if entry["image_id"] != lost]
    document["images"] = [image for image in document["images"] if image["id"] != lost]
    (out / "annotations.json").write_text(json.dumps(document))
    assert segment("--out", out, targets) == 0
    rebuilt = by_file(annotations(out))
    assert rebuilt["scene_02.png"] == complete["scene_02.png"]
    assert all(entry["score"] is not None for entries in rebuilt.values() for entry in entries)


def test_annotations_never_list_a_mask_not_yet_written(tmp_path, targets, monkeypatch):
    """Masks are written in threads; annotations.json, written every batch, listed masks still queued."""
    out = tmp_path / "out"
    write_mask, write_json = insid3_core.cli.segment.write_output_mask, insid3_core.cli.segment.write_json
    checked = []

    def slow_write(path, *arguments):
        time.sleep(0.3)
        write_mask(path, *arguments)

    def checking_write_json(path, document):
        missing = [image["file_name"] for image in document["images"] if not (out / image["file_name"]).is_file()]
        checked.append(missing)
        write_json(path, document)

    monkeypatch.setattr(insid3_core.cli.segment, "write_output_mask", slow_write)
    monkeypatch.setattr(insid3_core.cli.segment, "write_json", checking_write_json)
    assert segment("--out", out, targets) == 0
    assert len(checked) >= 3 and all(missing == [] for missing in checked)
    assert len(annotations(out)["images"]) == 8


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, targets):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".annotations.json.1a2b3c4d5e6f.tmp", out / ".scene_01.png.ffee00112233.tmp"]
    for path in stale:
        path.write_bytes(b"")
    unrelated = [out / ".notes.txt.tmp", out / ".annotations.json.my-backup.tmp", out / ".scene_01.png.draft.tmp"]
    for path in unrelated:
        path.write_text("mine")
    assert segment("--out", out, targets) == 0
    assert not any(path.exists() for path in stale) and all(path.read_text() == "mine" for path in unrelated)
    assert sorted(out.glob(".*.tmp")) == sorted(unrelated)


def test_a_target_of_a_name_as_long_as_the_file_system_allows_is_segmented(tmp_path, targets):
    """Its mask's temporary name (``.<name>.<12 hex>.tmp``) would pass 255 characters: it is cut."""
    long_name = targets / ("a" * 245 + ".png")
    (targets / "scene_01.png").rename(long_name)
    out = tmp_path / "out"
    assert segment("--out", out, targets) == 0
    assert (out / long_name.name).is_file() and len(annotations(out)["images"]) == 8
    assert not list(out.glob(".*.tmp"))


def test_outputs_respect_the_umask(tmp_path, targets):
    """Every output was 0600 whatever the umask (tempfile.mkstemp)."""
    out = tmp_path / "out"
    previous = os.umask(0o022)
    try:
        assert segment("--out", out, targets) == 0
    finally:
        os.umask(previous)
    modes = {stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert modes == {0o644}


def test_an_unusable_cache_entry_is_computed_again(tmp_path):
    """A damaged or foreign cache file (another user's, another version's) is named and recomputed."""
    from insid3_core import TEST_CHECKPOINT, load_backbone
    from insid3_core.debias import positional_directions

    backbone = load_backbone(TEST_CHECKPOINT, device="cpu")
    cache = tmp_path / "cache"
    first = positional_directions(backbone, 64, cache)
    (entry,) = cache.iterdir()
    for damage in (lambda: entry.write_bytes(b"not numpy"), lambda: np.save(entry, np.zeros((3, 3), np.float32))):
        damage()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = positional_directions(backbone, 64, cache)
        assert any(str(entry) in str(warning.message) for warning in caught)
        assert np.array_equal(again.numpy(), first.numpy())


def test_kill_9_then_resume_gives_a_consistent_output(tmp_path, targets):
    """A real ``kill -9`` as soon as the first mask is written; the rerun completes the folder."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "insid3_core.cli", "segment", "--ref", *REFERENCE, *FAST,
               "--batch-size", "1", "--out", str(out), str(targets)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("scene_*.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if (out / "annotations.json").is_file():
        listed = [image["file_name"] for image in annotations(out)["images"]]
        assert all((out / name).is_file() for name in listed)
    assert main(["segment", "--ref", *REFERENCE, *FAST, "--out", str(out), str(targets)]) == 0
    document = annotations(out)
    assert sorted(image["file_name"] for image in document["images"]) == sorted(p.name for p in targets.iterdir())
    assert all(entry["score"] is not None for entry in document["annotations"])
    assert not list(out.glob(".*.tmp"))


def test_each_mask_keeps_the_settings_of_the_run_that_made_it(tmp_path, targets):
    """A resumed run at --tau 0.8 that skipped everything claimed tau 0.8 for masks made at 0.6."""
    out = tmp_path / "out"
    first = targets / "scene_01.png"
    assert segment("--out", out, "--tau", "0.6", first) == 0
    assert segment("--out", out, "--tau", "0.8", targets) == 0
    document = annotations(out)
    runs = document["info"]["runs"]
    made = {image["file_name"]: runs[image["run"]]["settings"]["tau"] for image in document["images"]}
    assert made["scene_01.png"] == 0.6 and {made[name] for name in made if name != "scene_01.png"} == {0.8}
    assert document["info"]["settings"]["tau"] == 0.8 and len(runs) == 2


def test_an_output_from_another_source_is_not_skipped(tmp_path, targets, capsys):
    out = tmp_path / "out"
    assert segment("--out", out, targets / "scene_01.png") == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(targets / "scene_02.png", elsewhere / "scene_01.png")
    assert segment("--out", out, elsewhere / "scene_01.png") == 2
    assert "made from" in capsys.readouterr().err
    (targets / "scene_01.png").write_bytes((targets / "scene_03.png").read_bytes())  # same file, changed
    assert segment("--out", out, targets / "scene_01.png") == 2
    assert segment("--out", out, "--overwrite", targets / "scene_01.png") == 0


def test_single_and_multi_class_runs_do_not_mix_in_one_folder(tmp_path, targets, capsys):
    out = tmp_path / "out"
    assert segment("--out", out, targets / "scene_01.png") == 0
    mask = str(EXAMPLES / "reference" / "disks_mask.png")
    two_classes = ["--class-ref", "disk", str(EXAMPLES / "reference" / "disks.png"), mask]
    assert segment("--out", out, *two_classes, targets / "scene_02.png") == 2
    assert "holds masks of 'object'" in capsys.readouterr().err
