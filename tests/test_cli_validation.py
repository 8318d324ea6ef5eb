"""Bad values on the command line: exit 2 with one message naming the option or file, before any
work, never a traceback."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import insid3_core.cli
from conftest import EXAMPLES
from insid3_core.backbone import BUNDLED_CHECKPOINT
from test_cli import segment

TARGET = EXAMPLES / "targets" / "scene_01.png"


def refused(capsys, *arguments) -> str:
    assert segment(*arguments) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("insid3: error:") == 1
    return err


@pytest.mark.parametrize(("option", "value", "words"), [
    ("--merge-threshold", "nan", "merge_threshold must be a finite number"),
    ("--merge-threshold", "inf", "merge_threshold must be a finite number"),
    ("--tau", "nan", "tau must lie in (-1, 1)"),
    ("--min-area-ratio", "nan", "min_area_ratio"),
    ("--max-area-ratio", "inf", "max_area_ratio"),
    ("--image-size", "1600000", "use at most about"),
])
def test_numbers_must_be_finite_and_fit(tmp_path, capsys, option, value, words):
    """``--merge-threshold nan`` gave empty masks and exit 0; ``--image-size 1600000`` tried to allocate 7.7 TB."""
    err = refused(capsys, "--out", tmp_path / "out", option, value, TARGET)
    assert words in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    def no_backbone(*_, **__):
        raise AssertionError("the backbone was loaded before --out was checked")

    monkeypatch.setattr(insid3_core.cli, "load_backbone", no_backbone)
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
