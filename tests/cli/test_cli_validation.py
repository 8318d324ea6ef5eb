"""Bad values on the command line: exit 2 with one message naming the option or file, before any
work, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import insid3_core.backbone
from data import EXAMPLES
from insid3_core.backbone import BUNDLED_CHECKPOINT
from insid3_core.cli import main
from test_cli import FAST, segment

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
    ("--tau", "2", "tau (--tau, INSID3_TAU) must lie in (-1, 1)"),
    ("--min-area-ratio", "nan", "argument --min-area-ratio: value='nan' is not a finite number"),
    ("--max-area-ratio", "inf", "argument --max-area-ratio: value='inf' is not a finite number"),
    ("--image-size", "1600000", "use at most about"),
    ("--image-size", "16", "exceeds the 1 directions of a 16px grid: lower svd_components (--svd-components)"),
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
    for write in (lambda: np.save(garbage, np.array([{"an": "object"}], dtype=object), allow_pickle=True),
                  lambda: garbage.write_text("[1, 2]")):  # an object array; a file NumPy would try to unpickle
        write()
        error = refused(capsys, "--out", tmp_path / "o", "--basis", garbage, TARGET)
        assert "one of Python objects; insid3 reads arrays only" in error and "allow_pickle" not in error, \
            "never a hint to unpickle a file a user was given"
    np.save(garbage, np.full((96, 16), np.nan, np.float32))
    assert "NaN or infinite" in refused(capsys, "--out", tmp_path / "o", "--basis", garbage, TARGET)
    np.save(garbage, np.ones((96, 16), np.float32))
    assert "not orthonormal" in refused(capsys, "--out", tmp_path / "o", "--basis", garbage, TARGET)


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


@pytest.mark.parametrize("content", [b"[]", b"null", b"\xff\xfe not utf-8", b'{"images": 3}'])
def test_an_annotations_file_that_is_not_ours_is_named(tmp_path, capsys, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "annotations.json").write_bytes(content)
    err = refused(capsys, "--out", out, TARGET)
    assert f"{out / 'annotations.json'}: existing file is not an insid3 COCO document" in err
    assert (out / "annotations.json").read_bytes() == content


def test_another_tools_coco_file_is_kept(tmp_path, capsys):
    """A COCO file insid3 did not write (its info says so) is neither rewritten nor merged into."""
    out = tmp_path / "out"
    out.mkdir()
    theirs = b'{"info": {"description": "my labels"}, "images": [], "annotations": [], "categories": [], "licenses": []}'
    (out / "annotations.json").write_bytes(theirs)
    err = refused(capsys, "--out", out, TARGET)
    assert "another tool wrote it" in err and (out / "annotations.json").read_bytes() == theirs
    assert segment("--out", out, "--overwrite", TARGET) == 0  # asked: replaced


@pytest.mark.parametrize(("arguments", "words"), [
    (["--out", ""], "--out: an empty name"),
    (["--actors", "-1"], "give --ray too"),
    (["--ray", ""], "--ray: an empty address"),
    (["--ray", "local", "--cpus-per-actor", "inf"], "--cpus-per-actor must be a number > 0"),
    (["--ray", "local", "--gpus-per-actor", "nan"], "--gpus-per-actor must be a number >= 0"),
])
def test_output_and_cluster_options_are_checked_first(tmp_path, capsys, monkeypatch, arguments, words):
    monkeypatch.chdir(tmp_path)
    if "--out" not in arguments:
        arguments = ["--out", tmp_path / "out", *arguments]
    assert words in refused(capsys, *arguments, TARGET)
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_a_folder_or_a_wrong_size_mask_in_the_way_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "annotations.json").mkdir(parents=True)
    assert "is a folder where the annotations file goes" in refused(capsys, "--out", out, TARGET)
    (out / "annotations.json").rmdir()
    small = np.zeros((18, 24), dtype=np.uint8)
    Image.fromarray(small).save(out / TARGET.name)
    err = refused(capsys, "--out", out, TARGET)
    assert f"{out / TARGET.name} (24x18, the target is 520x400)" in err


def test_reference_options_that_contradict_themselves(tmp_path, capsys):
    reference = [str(EXAMPLES / "reference" / "disks.png"), str(EXAMPLES / "reference" / "disks_mask.png")]
    assert "--category: an empty name" in refused(capsys, "--out", tmp_path / "o", "--category", "", TARGET)
    assert "it would cancel itself" in refused(capsys, "--out", tmp_path / "o", "--negative", *reference, TARGET)


def test_a_label_map_of_another_size_is_named_by_its_mask(tmp_path, capsys):
    labels = tmp_path / "labels.png"
    Image.fromarray(np.ones((18, 24), dtype=np.uint8)).save(labels)
    code = main(["segment", "--label-ref", str(EXAMPLES / "reference" / "disks.png"), str(labels),
                 "--out", str(tmp_path / "o"), *FAST, str(TARGET)])
    err = capsys.readouterr().err
    assert code == 2 and f"{labels} value 1: mask is 24x18" in err


def test_a_reference_behind_a_link_loop_is_named(tmp_path, capsys):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    code = main(["segment", "--ref", str(tmp_path / "a.png"), str(EXAMPLES / "reference" / "disks_mask.png"),
                 "--out", str(tmp_path / "out"), *FAST, str(TARGET)])
    err = capsys.readouterr().err
    assert code == 2 and "a.png" in err and "Traceback" not in err


def test_ctrl_c_exits_130_with_one_line_and_consistent_outputs(tmp_path, capsys, monkeypatch):
    import json

    import insid3_core.cli.segment

    targets = tmp_path / "targets"
    shutil.copytree(EXAMPLES / "targets", targets)
    record = insid3_core.cli.segment.result_record
    calls = []

    def interrupted(*arguments, **keywords):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return record(*arguments, **keywords)

    monkeypatch.setattr(insid3_core.cli.segment, "result_record", interrupted)
    out = tmp_path / "out"
    assert segment("--out", out, "--batch-size", "1", targets) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("insid3: interrupted") and "Traceback" not in "\n".join(err)
    listed = sorted(image["file_name"] for image in json.loads((out / "annotations.json").read_text())["images"])
    assert listed == sorted(path.name for path in out.glob("*.png")) and len(listed) == 3
    monkeypatch.setattr(insid3_core.cli.segment, "result_record", record)
    assert segment("--out", out, targets) == 0
    assert len(json.loads((out / "annotations.json").read_text())["images"]) == 8


@pytest.mark.parametrize(("arguments", "words"), [
    (["--workers", "-1"], "workers (--workers, INSID3_WORKERS) must be >= 0, got -1"),
    (["--device", "gpu"], "device 'gpu' is none of auto, cpu, cuda, cuda:N, mps"),
    (["--batch-size", "0"], "must be >= 1, got 0"),
])
def test_engine_options_out_of_range(tmp_path, capsys, arguments, words):
    assert words in refused(capsys, "--out", tmp_path / "out", *arguments, TARGET)


def test_weights_that_are_not_a_checkpoint(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my weights are elsewhere\n")
    assert f"{notes}: not a PyTorch checkpoint" in refused(capsys, "--out", tmp_path / "out", "--weights", notes, TARGET)


def test_reference_errors_come_before_the_backbone_loads(tmp_path, capsys, monkeypatch):
    def no_backbone(*_, **__):
        raise AssertionError("the backbone was loaded before the references were checked")

    monkeypatch.setattr(insid3_core.backbone, "load_backbone", no_backbone)
    small = tmp_path / "small_mask.png"
    from PIL import Image

    Image.new("L", (10, 10), 255).save(small)
    err = refused(capsys, "--out", tmp_path / "out", "--ref", EXAMPLES / "reference" / "disks.png", small, TARGET)
    assert "mask is 10x10 but its image is" in err
    swapped = [EXAMPLES / "reference" / "disks_mask.png", EXAMPLES / "reference" / "disks.png"]
    err = refused(capsys, "--out", tmp_path / "out", "--ref", *swapped, TARGET)
    assert f"{swapped[1]}: more than 4096 distinct colours: a photograph, not a mask" in err


def test_nothing_is_loaded_when_every_target_is_done(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert segment("--out", out, TARGET) == 0
    monkeypatch.setattr(insid3_core.backbone, "load_backbone",
                        lambda *_, **__: pytest.fail("a backbone was loaded with nothing to segment"))
    assert segment("--out", out, TARGET) == 0
    assert "nothing to segment" in capsys.readouterr().err


def test_a_failed_target_is_named_once(tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert segment("--out", tmp_path / "out", broken, TARGET) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("insid3: FAILED")]
    assert line.count(str(broken)) == 1


def test_match_takes_no_option_it_does_not_use(tmp_path, capsys):
    from insid3_core.cli import main

    with pytest.raises(SystemExit) as refused_exit:
        main(["match", "--ref", str(TARGET), "points.json", "--out", str(tmp_path / "m.json"), "--tau", "0.7", str(TARGET)])
    assert refused_exit.value.code == 2 and "unrecognized arguments: --tau" in capsys.readouterr().err


def test_eval_without_its_extra_says_so_before_any_episode(tmp_path, capsys, monkeypatch):
    import importlib.util

    from insid3_core.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "matplotlib" else real(name, *rest))
    assert main(["eval", "folder", str(tmp_path / "none"), "--out", str(tmp_path / "report")]) == 2
    assert "pip install 'insid3[eval]'" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_an_unusable_earlier_annotations_file_is_named(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    document = out / "annotations.json"
    document.write_text('{"info": {"description": "insid3 segment", "runs": 5}, "images": [], "annotations": [],'
                        ' "categories": []}')
    assert "info.runs is not an object" in refused(capsys, "--out", out, TARGET)
    document.write_text('{"info": {"description": "insid3 segment"}, "images": [{"id": 1}], "annotations": [],'
                        ' "categories": []}')
    assert "an entry lacks the key" in refused(capsys, "--out", out, TARGET)
    document.unlink()
    document.mkdir()
    assert "is a folder where the annotations file goes" in refused(capsys, "--out", out, TARGET)


def test_a_folder_where_a_mask_goes_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "out" / "scene_01.png").mkdir(parents=True)
    assert "is a folder where a mask goes" in refused(capsys, "--out", tmp_path / "out", "--overwrite", TARGET)


def test_a_pipe_given_as_an_image_is_refused_not_waited_on(tmp_path, capsys):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    message = refused(capsys, "--out", tmp_path / "out", TARGET, "--negative", pipe, EXAMPLES / "reference" / "disks_mask.png")
    assert f"{pipe}: not a regular file" in message
    assert f"{pipe}: not a regular file (a pipe or device)" in refused(capsys, "--out", tmp_path / "out", pipe)
    assert f"{tmp_path}: not a regular file" in refused(capsys, "--out", tmp_path / "out", "--basis", tmp_path, TARGET)


def test_huge_integers_in_a_settings_file_are_named(tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text('{"tau": ' + "9" * 400 + "}")
    assert "must be a finite number" in refused(capsys, "--out", tmp_path / "out", "--settings", settings, TARGET)


def test_a_quoted_home_folder_is_the_folder_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert segment("--out", "~/masks", TARGET) == 0
    assert (tmp_path / "home" / "masks" / "scene_01.png").is_file() and not (tmp_path / "~").exists()


def test_match_options_are_checked_before_the_backbone_and_never_replace_the_settings(tmp_path, capsys):
    points = tmp_path / "points.json"
    points.write_text('[{"name": "a", "x": 10, "y": 10}]')
    settings = tmp_path / "settings.json"
    settings.write_text('{"tau": 0.6}')
    base = ["match", "--ref", str(EXAMPLES / "reference" / "disks.png"), str(points), *FAST, str(TARGET)]
    for option, value, words in (("--window", "2", "--window must be an odd number of patches from 1 to 255"),
                                 ("--window", "99999999999999999999", "--window must be an odd number"),
                                 ("--temperature", "0", "--temperature must be > 0")):
        assert main([*base, "--out", str(tmp_path / "m.json"), option, value]) == 2
        assert words in capsys.readouterr().err
    assert main([*base, "--out", str(settings), "--overwrite", "--settings", str(settings)]) == 2
    assert "would overwrite an input file" in capsys.readouterr().err and settings.read_text() == '{"tau": 0.6}'


def test_an_empty_class_name_is_refused(tmp_path, capsys):
    image, mask = EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png"
    try:
        code = main(["segment", "--class-ref", " ", str(image), str(mask), *FAST, "--out", str(tmp_path / "o"),
                     str(TARGET)])
    except SystemExit as exit:
        code = exit.code
    assert code == 2 and "an empty class name" in capsys.readouterr().err


def test_a_home_folder_of_no_user_is_named(tmp_path, capsys):
    assert "names no home directory" in refused(capsys, "--out", "~no-such-user-insid3/x", TARGET)


def small_files(tmp_path) -> dict:
    """Settings, points and class-list files no reader should trip on: name -> (path, words)."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\n")
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)
    return {"deep": (deep, "nested too deeply to be read"), "device": (Path("/dev/zero"), "not a regular file"),
            "pipe": (pipe, "not a regular file"), "binary": (binary, "utf-8")}


@pytest.mark.parametrize("kind", ["deep", "device", "pipe", "binary"])
def test_settings_points_and_class_lists_that_cannot_be_read_are_named(tmp_path, capsys, monkeypatch, kind):
    """A deeply nested JSON document was a RecursionError traceback; /dev/zero filled the memory and
    a FIFO blocked the read for ever. Each is refused, naming the file, with exit 2."""
    from test_eval import write_folder

    path, words = small_files(tmp_path)[kind]
    err = refused(capsys, "--out", tmp_path / "out", "--settings", path, TARGET)
    assert f"--settings {path}:" in err and words in err.lower()
    monkeypatch.setenv("INSID3_SETTINGS", str(path))
    assert f"{path}:" in refused(capsys, "--out", tmp_path / "out", TARGET)
    monkeypatch.delenv("INSID3_SETTINGS")
    assert main(["match", "--ref", str(EXAMPLES / "reference" / "disks.png"), str(path), "--out",
                 str(tmp_path / "m.json"), *FAST, str(TARGET)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and words in err.lower() and "Traceback" not in err
    if kind != "deep":  # a class list is lines of text, not JSON
        write_folder(tmp_path / "data", per_class=2)
        assert main(["eval", "folder", str(tmp_path / "data"), "--classes", str(path), "--out", str(tmp_path / "e"),
                     *FAST]) == 2
        err = capsys.readouterr().err
        assert f"{path}:" in err and words in err.lower() and "Traceback" not in err


def test_deeply_nested_json_in_outputs_and_weights_is_named(tmp_path, capsys):
    """An earlier annotations.json, a Hugging Face config.json and a mask's carried record, each
    nested 100 000 deep: named (or, for the record, ignored), never a RecursionError."""
    from insid3_core.outputs import RECORD_KEY, carried_record
    from PIL.PngImagePlugin import PngInfo

    out = tmp_path / "out"
    out.mkdir()
    (out / "annotations.json").write_text("[" * 100_000)
    err = refused(capsys, "--out", out, TARGET)
    assert "existing file is not an insid3 COCO document" in err and "nested too deeply" in err
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 100_000)
    assert "config.json is not readable JSON (nested too deeply" in refused(
        capsys, "--out", tmp_path / "o", "--weights", folder, TARGET)
    info = PngInfo()
    info.add_text(RECORD_KEY, "[" * 100_000)
    Image.new("L", (4, 4)).save(tmp_path / "mask.png", pnginfo=info)
    assert carried_record(tmp_path / "mask.png") is None


@pytest.mark.parametrize(("entry", "field", "value", "words"), [
    ("images", "file_name", None, "an image's file_name is a NoneType, not a string"),
    ("categories", "name", ["a", "list"], "a category's name is a list, not a string"),
])
def test_an_entry_without_a_name_string_is_named(tmp_path, capsys, entry, field, value, words):
    """``"file_name": null`` was a TypeError traceback when the records were sorted, a category
    named by a list one when the categories were gathered."""
    out = tmp_path / "out"
    assert segment("--out", out, TARGET) == 0
    document = json.loads((out / "annotations.json").read_text())
    document[entry][0][field] = value
    (out / "annotations.json").write_text(json.dumps(document))
    err = refused(capsys, "--out", out, TARGET, EXAMPLES / "targets" / "scene_02.png")
    assert words in err


def test_eval_refuses_to_write_into_its_dataset(tmp_path, capsys):
    """``--out ROOT`` made figures/ and masks/ classes of the dataset: the next run read them as one."""
    from test_eval import write_folder

    root = tmp_path / "data"
    write_folder(root, per_class=2)
    before = sorted(root.rglob("*"))
    for out in (root, root / "red", root / "new" / "report"):
        assert main(["eval", "folder", str(root), "--out", str(out), "--save-masks", *FAST]) == 2
        assert "is inside the dataset" in capsys.readouterr().err
    assert sorted(root.rglob("*")) == before


@pytest.mark.parametrize("annotations", [
    [{"segmentation": {}}], ["not an object"], [{"category": ["a", "list"]}], [{"category": None}],
])
def test_a_done_mask_carrying_a_malformed_record_gets_one_rebuilt_from_its_pixels(tmp_path, annotations):
    """A mask whose carried record lists an annotation without a category name (edited, or written
    by another tool) was a KeyError or TypeError traceback when annotations.json was assembled."""
    from insid3_core.outputs import RECORD_KEY
    from PIL.PngImagePlugin import PngInfo

    out = tmp_path / "out"
    assert segment("--out", out, TARGET) == 0
    expected = json.loads((out / "annotations.json").read_text())
    mask = out / "scene_01.png"
    with Image.open(mask) as image:
        record, pixels = json.loads(image.text[RECORD_KEY]), np.asarray(image)
    info = PngInfo()
    info.add_text(RECORD_KEY, json.dumps({**record, "annotations": annotations}))
    Image.fromarray(pixels).save(mask, pnginfo=info)
    (out / "annotations.json").unlink()  # as when a run is killed between the mask and the annotations
    assert segment("--out", out, TARGET) == 0
    document = json.loads((out / "annotations.json").read_text())
    assert [a["category_id"] for a in document["annotations"]] == [a["category_id"] for a in expected["annotations"]]
    assert [a["segmentation"] for a in document["annotations"]] == [a["segmentation"]
                                                                  for a in expected["annotations"]]


def test_a_folder_of_folders_says_they_are_not_searched(tmp_path, capsys):
    (tmp_path / "shoot" / "day1").mkdir(parents=True)
    (tmp_path / "shoot" / ".cache").mkdir()
    shutil.copy(TARGET, tmp_path / "shoot" / "day1")
    (tmp_path / "empty").mkdir()

    err = refused(capsys, "--out", tmp_path / "out", tmp_path / "shoot")
    assert f"its 1 folder(s) are not searched: give them, or a pattern such as '{tmp_path / 'shoot' / '**' / '*.jpg'}'" in err
    assert "not searched" not in refused(capsys, "--out", tmp_path / "out", tmp_path / "empty")


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_writes(tmp_path, capsys):
    """Two runs merging into one annotations.json would each drop the other's entries."""
    from insid3_core.io import WRITER_LOCK, writer_lock

    out = tmp_path / "out"
    out.mkdir()
    with writer_lock(out, "--out"):
        err = refused(capsys, "--out", out, TARGET)
        assert f"--out {out}: another insid3 run (pid {os.getpid()}) is writing there; wait for it" in err
        err = refused(capsys, "--out", out, "--ray", "local", TARGET)
        assert "another insid3 run" in err, "the Ray driver takes the folder's lock too, before Ray starts"
    assert not (out / "annotations.json").exists()
    assert segment("--out", out, TARGET) == 0, "free again once the first run is over"

    precious = tmp_path / "precious.txt"
    precious.write_text("kept")
    (out / WRITER_LOCK).unlink()
    (out / WRITER_LOCK).symlink_to(precious)
    err = refused(capsys, "--out", out, "--overwrite", TARGET)
    assert f"cannot open its lock file {WRITER_LOCK} (a link); remove it" in err
    assert precious.read_text() == "kept", "a planted link is not followed"


@pytest.mark.parametrize("listing", ["{data}", "file://{data}", "{data}/*.jpg", "{root}/*/*.jpg", "{root}/**/*.jpg"])
def test_a_ray_job_writing_into_a_folder_it_lists_is_refused_before_ray_starts(tmp_path, capsys, listing):
    """With --ray the listing streams while masks are written: a.jpg's mask could be listed as a
    target, or with --overwrite replace the image a.png; the single machine lists everything first."""
    data = tmp_path / "root" / "data"
    data.mkdir(parents=True)
    shutil.copy(TARGET, data / "a.jpg")
    spec = listing.format(data=data, root=tmp_path / "root")

    err = refused(capsys, "--out", data, "--ray", "local", "--overwrite", spec)
    assert f"--out {data}: TARGET {spec} lists that folder; with --ray the masks written there could be listed" in err
    assert sorted(path.name for path in data.iterdir()) == ["a.jpg"]
    from insid3_core.cli.common import listed_output_folder

    assert listed_output_folder(str(tmp_path / "elsewhere"), [spec]) is None
    assert listed_output_folder(str(data / "masks"), [spec]) == (spec if "**" in spec else None)


@pytest.mark.parametrize("listing", ["{data}", "{data}/*", "{root}/*/*", "{root}/**/*.*"])
def test_writing_the_masks_into_a_folder_the_targets_list_is_refused_before_any_work(tmp_path, capsys, listing):
    """``--out photos photos`` wrote ``a.png`` beside ``a.jpg``; the next run listed the masks as
    targets and failed on their stems. It is refused on the first run, writing nothing; a pattern
    that lists no mask (``*.jpg``) writes there and resumes."""
    data = tmp_path / "root" / "data"
    data.mkdir(parents=True)
    Image.open(TARGET).convert("RGB").save(data / "a.jpg")
    spec = listing.format(data=data, root=tmp_path / "root")

    err = refused(capsys, "--out", data, spec)
    assert f"--out {data}: TARGET {spec} lists that folder, so the next run would take the masks" in err
    assert sorted(path.name for path in data.iterdir()) == ["a.jpg"]

    assert segment("--out", data, data / "*.jpg") == 0
    assert segment("--out", data, data / "*.jpg") == 0
    assert "already have their mask" in capsys.readouterr().err
    assert sorted(path.name for path in data.glob("[!.]*")) == ["a.jpg", "a.png", "annotations.json"]


RUN_UNDER_A_MEMORY_CAP = """
import resource, sys
from insid3_core.cli import main

status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
cap = int(status["VmSize"].split()[0]) * 1024 + (1 << 30)  # what it has mapped, and 1 GiB more
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.exit(main(sys.argv[1:]))
"""


def test_running_out_of_memory_names_the_settings_that_lower_it(tmp_path):
    """A batch that did not fit (here, under an address-space cap: 2048 px targets, whose
    clustering alone needs 2 GiB) ended in a torch or NumPy traceback; it is now exit 2 naming
    batch_size and image_size, and the run's listing is still written."""
    import subprocess
    import sys

    from test_cli import REFERENCE

    out = tmp_path / "out"
    answer = subprocess.run(
        [sys.executable, "-c", RUN_UNDER_A_MEMORY_CAP, "segment", "--ref", *REFERENCE, "--out", str(out),
         "--image-size", "2048", "--svd-components", "8", "--device", "cpu", "--batch-size", "2",
         str(EXAMPLES / "targets" / "scene_01.png"), str(EXAMPLES / "targets" / "scene_02.png")],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert answer.returncode == 2, answer.stderr[-2000:]
    assert "Traceback" not in answer.stderr
    assert "insid3: error: out of memory (" in answer.stderr
    assert "lower batch_size (--batch-size, INSID3_BATCH_SIZE) or image_size (--image-size, INSID3_IMAGE_SIZE)" in answer.stderr
    assert json.loads((out / "annotations.json").read_text())["annotations"] == []


def test_only_failed_allocations_are_called_out_of_memory():
    """NumPy's and torch's own failures to allocate 728 TiB and 9 TB (refused at once, whatever the
    overcommit) are; another RuntimeError is not."""
    import torch

    from insid3_core.settings import out_of_memory_message

    failures = []
    for allocate in (lambda: np.empty(10**14), lambda: torch.empty(10**13, dtype=torch.uint8)):
        try:
            allocate()
        except (MemoryError, RuntimeError) as err:
            failures.append(out_of_memory_message(err))
    assert len(failures) == 2 and all(message.startswith("out of memory (") for message in failures)
    assert "Unable to allocate 728. TiB" in failures[0] and "can't allocate memory" in failures[1]
    assert out_of_memory_message(RuntimeError("Expected all tensors to be on the same device")) is None
    assert out_of_memory_message(ValueError("can't allocate memory")) is None
