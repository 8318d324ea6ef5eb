"""Bad values on the command line: exit 2 with one message naming the option or file, before any
work, never a traceback."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import insid3_core.backbone
from conftest import EXAMPLES
from insid3_core.backbone import BUNDLED_CHECKPOINT
from test_cli import segment

TARGET = EXAMPLES / "targets" / "scene_01.png"


def refused(capsys, *arguments) -> str:
    try:
        code = segment(*arguments)
    except SystemExit as exit:  # argparse's own refusal
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    return err


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--merge-threshold", "nan", "argument --merge-threshold: value='nan' is not a finite number"),
    ("--merge-threshold", "inf", "argument --merge-threshold: value='inf' is not a finite number"),
    ("--tau", "nan", "argument --tau: value='nan' is not a finite number"),
    ("--tau", "2", "tau must lie in (-1, 1)"),
    ("--min-area-ratio", "nan", "argument --min-area-ratio: value='nan' is not a finite number"),
    ("--max-area-ratio", "inf", "argument --max-area-ratio: value='inf' is not a finite number"),
    ("--image-size", "1600000", "use at most about"),
])
def test_numbers_must_be_finite_and_fit(tmp_path, capsys, option, value, words):
    """``--merge-threshold nan`` gave empty masks and exit 0; ``--image-size 1600000`` tried to allocate 7.7 TB."""
    err = refused(capsys, "--out", tmp_path / "out", option, value, TARGET)
    assert words in err
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("INSID3_MERGE_THRESHOLD", "nan", "INSID3_MERGE_THRESHOLD='nan' is not a finite number"),
    ("INSID3_MAX_COMPONENTS", "abc", "INSID3_MAX_COMPONENTS='abc' is not an integer"),
    ("INSID3_MAX_AREA_RATIO", "2", "max_area_ratio"),
])
def test_environment_defaults_are_checked_like_options(tmp_path, capsys, monkeypatch, variable, value, words):
    """A bad INSID3_* value was a traceback while the parser was built; the quality ones were ignored."""
    monkeypatch.setenv(variable, value)
    assert words in refused(capsys, "--out", tmp_path / "out", TARGET)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    def no_backbone(*_, **__):
        raise AssertionError("the backbone was loaded before --out was checked")

    monkeypatch.setattr(insid3_core.backbone, "load_backbone", no_backbone)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    assert "is a file, not a folder" in refused(capsys, "--out", a_file, TARGET)
    assert "cannot write there" in refused(capsys, "--out", a_file / "below", TARGET)
    assert "cannot write there" in refused(capsys, "--out", "/proc/insid3-out", TARGET)
    assert a_file.read_text() == "keep me"


def test_a_garbage_basis_is_named(tmp_path, capsys):
    garbage = tmp_path / "basis.npy"
    garbage.write_bytes(b"this is not an array")
    assert f"{garbage}: not a readable NumPy .npy array" in refused(capsys, "--out", tmp_path / "o", "--basis", garbage, TARGET)
    np.save(garbage, np.full((96, 16), np.nan, np.float32))
    assert "NaN or infinite" in refused(capsys, "--out", tmp_path / "o", "--basis", garbage, TARGET)


@pytest.mark.parametrize(("sidecar", "words"), [
    ('"a JSON string"', "must hold a JSON object"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"num_heads": "three"}', "num_heads must be a positive integer"),
    ("{not json", "invalid JSON"),
])
def test_a_bad_sidecar_is_named(tmp_path, capsys, sidecar, words):
    weights = tmp_path / "tiny.pth"
    shutil.copy(BUNDLED_CHECKPOINT, weights)
    (tmp_path / "tiny.json").write_text(sidecar)
    err = refused(capsys, "--out", tmp_path / "o", "--weights", weights, TARGET)
    assert str(tmp_path / "tiny.json") in err and words in err


def test_a_checkpoint_missing_its_blocks_is_named(tmp_path, capsys):
    """It said "max() arg is an empty sequence"."""
    import torch

    state = {key: value for key, value in torch.load(BUNDLED_CHECKPOINT, weights_only=True).items()
             if not key.startswith("blocks.")}
    weights = tmp_path / "tiny.pth"
    torch.save(state, weights)
    shutil.copy(BUNDLED_CHECKPOINT.with_suffix(".json"), tmp_path / "tiny.json")
    err = refused(capsys, "--out", tmp_path / "o", "--weights", weights, TARGET)
    assert f"{weights}: not a DINOv3 checkpoint" in err and "no transformer blocks" in err
