"""``insid3 calibrate`` end to end, and ``--settings`` / ``INSID3_SETTINGS`` applying its choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from insid3_core.cli import main
from insid3_core.io import load_mask
from insid3_core.metrics import mask_iou
from insid3_core.settings import EngineSettings, SettingsError
from scenes import ringed_scene

FAST = ["--image-size", "256", "--svd-components", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> list[tuple[str, str]]:
    """Four two-texture scenes as image and mask files."""
    folder = tmp_path_factory.mktemp("ringed")
    pairs = []
    for seed in range(4):
        image, mask = ringed_scene(seed)
        image.save(folder / f"ringed_{seed}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"ringed_{seed}_mask.png")
        pairs.append((str(folder / f"ringed_{seed}.png"), str(folder / f"ringed_{seed}_mask.png")))
    return pairs


def ref_flags(pairs) -> list[str]:
    return [part for image, mask in pairs for part in ("--ref", image, mask)]


@pytest.fixture(scope="module")
def calibrated(references, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    assert main(["calibrate", *ref_flags(references), "--out", str(out), *FAST]) == 0
    return out


def test_calibrate_writes_the_chosen_settings_a_report_and_a_plot(calibrated, references):
    document = json.loads((calibrated / "calibration.json").read_text())
    assert set(document) >= {"settings", "default_score", "best_score", "grid", "references"}
    assert document["defaults"] == {"image_size": 256, "tau": 0.6, "merge_threshold": 0.2, "svd_components": 16,
                                    "refinement": "bilinear"}
    assert document["best_score"] > document["default_score"]
    assert document["settings"] != document["defaults"]
    assert len(document["grid"]) == 48 and all(set(p) == {"settings", "score"} for p in document["grid"])
    assert [(r["image"], r["mask"]) for r in document["references"]] == references
    assert all(set(r) == {"image", "mask", "class", "iou_default", "iou_best", "flag"} for r in document["references"])
    report = (calibrated / "calibration.md").read_text()
    assert "| tau | 0.6 |" in report and "![score against tau and merge threshold](calibration.png)" in report
    with Image.open(calibrated / "calibration.png") as plot:
        assert plot.format == "PNG" and plot.width > 600


def test_the_reported_ious_are_reproduced_by_insid3_segment(calibrated, references, tmp_path):
    """Each left-out reference, segmented by ``insid3 segment`` from the others with the chosen
    settings file, has the IoU the calibration reported."""
    document = json.loads((calibrated / "calibration.json").read_text())
    for index, (image, mask) in enumerate(references[:2]):
        out = tmp_path / f"episode_{index}"
        others = references[:index] + references[index + 1:]
        assert main(["segment", image, *ref_flags(others), "--out", str(out), "--device", "cpu",
                     "--settings", str(calibrated / "calibration.json")]) == 0
        predicted = load_mask(out / f"ringed_{index}.png")
        assert mask_iou(predicted, load_mask(mask)) == document["references"][index]["iou_best"]
        run = json.loads((out / "annotations.json").read_text())["info"]["settings"]
        assert {name: run[name] for name in document["settings"]} == document["settings"]


def test_an_earlier_calibration_is_kept_unless_overwrite(calibrated, references, capsys):
    before = (calibrated / "calibration.json").read_bytes()
    assert main(["calibrate", *ref_flags(references), "--out", str(calibrated), *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (calibrated / "calibration.json").read_bytes() == before


def test_calibration_outputs_never_replace_a_reference(references, tmp_path, capsys):
    """A reference image named like an output in --out stays, --overwrite or not."""
    out = tmp_path / "out"
    out.mkdir()
    image, mask = references[0]
    (out / "calibration.png").write_bytes(Path(image).read_bytes())
    pairs = [(str(out / "calibration.png"), mask), *references[1:]]
    assert main(["calibrate", *ref_flags(pairs), "--out", str(out), *FAST, "--overwrite"]) == 2
    assert "would overwrite an input file" in capsys.readouterr().err
    assert (out / "calibration.png").read_bytes() == Path(image).read_bytes()
    (out / "calibration.md").mkdir()
    assert main(["calibrate", *ref_flags(references), "--out", str(out), *FAST, "--overwrite"]) == 2
    assert "is a folder where an output file goes" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--grid", "gamma=1"], "--grid 'gamma=1': expected NAME=V1,V2,..."),
    (["--grid", "tau=2"], "tau must lie in (-1, 1)"),
    (["--settings", "missing.json"], "--settings missing.json: cannot read it"),
    (["--grid", "tau=0.5", "--grid", "tau=0.6"], "--grid tau is given twice"),
    (["--basis", "{basis}", "--grid", "svd_components=8,16"],
     "calibration grid: svd_components cannot vary with a --basis file"),
])
def test_bad_options_exit_2_with_a_message(references, tmp_path, capsys, extra, message):
    basis = tmp_path / "basis.npy"  # 16 orthonormal columns of the tiny checkpoint's width
    np.save(basis, np.linalg.qr(np.random.default_rng(0).normal(size=(96, 16)))[0].astype(np.float32))
    extra = [argument.format(basis=basis) for argument in extra]
    assert main(["calibrate", *ref_flags(references), "--out", str(tmp_path / "out"), *FAST, *extra]) == 2
    assert message in capsys.readouterr().err


def test_one_reference_image_exits_2_before_the_backbone_loads(references, tmp_path, capsys):
    assert main(["calibrate", *ref_flags(references[:1]), "--out", str(tmp_path / "out"), *FAST]) == 2
    error = capsys.readouterr().err
    assert "at least two images" in error
    assert "SMOKE TEST" not in error and "calibrate:" not in error, "no banner, no progress bar: nothing loaded"


def test_a_bad_reference_mask_is_refused_before_the_backbone_loads(references, tmp_path, capsys):
    blank = tmp_path / "blank.png"
    Image.new("L", Image.open(references[0][0]).size).save(blank)
    pairs = references[:2] + [(references[2][0], str(blank))]
    assert main(["calibrate", *ref_flags(pairs), "--out", str(tmp_path / "out"), *FAST]) == 2
    error = capsys.readouterr().err
    assert f"{blank}: reference mask is empty" in error and "SMOKE TEST" not in error


def test_flags_and_variables_win_over_settings_files(tmp_path, monkeypatch):
    """flag > --settings file > INSID3_<NAME> > INSID3_SETTINGS file > default."""
    import argparse

    chosen = tmp_path / "calibration.json"
    chosen.write_text(json.dumps({"settings": {"tau": 0.8, "merge_threshold": 0.1, "svd_components": 24}}))
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"tau": 0.7, "merge_threshold": 0.3, "refinement": "guided"}))
    parser = argparse.ArgumentParser()
    EngineSettings.add_arguments(parser)
    monkeypatch.setenv("INSID3_SETTINGS", str(shared))
    monkeypatch.setenv("INSID3_MERGE_THRESHOLD", "0.25")
    assert (EngineSettings.from_env().tau, EngineSettings.from_env().merge_threshold) == (0.7, 0.25)
    assert EngineSettings.from_env().refinement == "guided"
    settings = EngineSettings.from_arguments(parser.parse_args(["--settings", str(chosen), "--svd-components", "8"]))
    assert (settings.tau, settings.merge_threshold, settings.svd_components, settings.refinement) == (0.8, 0.1, 8, "guided")


def test_paths_in_a_settings_file_are_read_beside_it(tmp_path, monkeypatch):
    """``INSID3_SETTINGS`` read by a server started anywhere: a relative ``weights``/``basis`` that
    is beside the file is that one; one that is not stays as given (the working directory's, or a
    Hugging Face repo id)."""
    import numpy as np

    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "weights.pth").write_bytes(b"")
    np.save(project / "basis.npy", np.eye(4)[:, :2])
    shared = project / "insid3.json"
    shared.write_text(json.dumps({"weights": "models/weights.pth", "basis": "basis.npy"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("INSID3_SETTINGS", str(shared))
    settings = EngineSettings.from_env()
    assert (settings.weights, settings.basis) == (str(project / "models" / "weights.pth"), str(project / "basis.npy"))
    shared.write_text(json.dumps({"weights": "facebook/dinov3-vitl16-pretrain-lvd1689m", "basis": "here.npy"}))
    np.save(elsewhere / "here.npy", np.eye(4)[:, :2])
    settings = EngineSettings.from_env()
    assert (settings.weights, settings.basis) == ("facebook/dinov3-vitl16-pretrain-lvd1689m", "here.npy")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON document"),
    ("[1, 2]", "expected a JSON object of engine options, got list"),
    ('{"tau": 0.7, "gamma": 1}', "unknown engine option(s) gamma"),
    ('{"settings": {"tau": "high"}}', "tau (--tau, INSID3_TAU) must be a finite number"),
])
def test_a_bad_settings_file_is_named_in_the_error(tmp_path, monkeypatch, content, message):
    path = tmp_path / "settings.json"
    path.write_text(content)
    monkeypatch.setenv("INSID3_SETTINGS", str(path))
    with pytest.raises(SettingsError) as raised:
        EngineSettings.from_env()
    assert str(raised.value).startswith(f"INSID3_SETTINGS {path}: ") and message in str(raised.value)


def test_label_references_are_calibrated_per_class(tmp_path):
    """--label-ref masks of two classes on three images: each image is scored on both classes."""
    from scenes import scene

    refs = []
    for index in range(3):
        image, masks = scene(disks=[(80 + 30 * index, 90, 40)], squares=[(200, 120 + 20 * index, 60)], seed=20 + index)
        labels = np.where(masks["disks"], 1, np.where(masks["squares"], 2, 0)).astype(np.uint8)
        image.save(tmp_path / f"scene_{index}.png")
        Image.fromarray(labels).save(tmp_path / f"scene_{index}_labels.png")
        refs += ["--label-ref", str(tmp_path / f"scene_{index}.png"), str(tmp_path / f"scene_{index}_labels.png")]
    out = tmp_path / "out"
    assert main(["calibrate", *refs, "--class-name", "1=disk", "--class-name", "2=square", "--out", str(out),
                 *FAST, "--grid", "svd_components=16"]) == 0
    document = json.loads((out / "calibration.json").read_text())
    assert [(r["class"], r["mask"]) for r in document["references"]] == [
        ("disk", str(tmp_path / f"scene_{i}_labels.png value 1")) for i in range(3)] + [
        ("square", str(tmp_path / f"scene_{i}_labels.png value 2")) for i in range(3)]
    assert all(r["iou_best"] is not None for r in document["references"])
    assert len(document["grid"]) == 16
