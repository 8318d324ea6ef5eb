"""`insid3 segment` and `insid3 info` end to end on the example images."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import EXAMPLES
from insid3_core.cli import main
from insid3_core.coco import rle_decode

REFERENCE = [str(EXAMPLES / "reference" / "disks.png"), str(EXAMPLES / "reference" / "disks_mask.png")]
FAST = ["--image-size", "128", "--svd-components", "16", "--device", "cpu", "--batch-size", "3"]


@pytest.fixture
def targets(tmp_path):
    folder = tmp_path / "targets"
    shutil.copytree(EXAMPLES / "targets", folder)
    return folder


def segment(*arguments) -> int:
    return main(["segment", "--ref", *REFERENCE, *FAST, *map(str, arguments)])


@pytest.mark.parametrize("command", ["segment", "match", "calibrate"])
def test_a_full_disk_is_named_not_a_traceback(tmp_path, command):
    """No second byte can be written (RLIMIT_FSIZE, as a full disk: EFBIG): the write checks up front pass
    (an empty file), then annotations.json, OUT.json or calibration.json failed with a traceback."""
    import resource
    import signal

    def no_bytes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))

    target = str(EXAMPLES / "targets" / "scene_01.png")
    out = tmp_path / "out"
    points = tmp_path / "points.json"
    points.write_text('[{"name": "centre", "x": 100, "y": 120}]')
    arguments = {
        "segment": ["--ref", *REFERENCE, "--out", str(out), target],
        "match": ["--ref", REFERENCE[0], str(points), "--out", str(out / "points.json"), target],
        "calibrate": ["--ref", *REFERENCE, "--ref", target, str(EXAMPLES / "masks" / "scene_01.png"),
                      "--grid", "tau=0.6", "--out", str(out)],
    }[command]
    run = subprocess.run([str(Path(sys.executable).parent / "insid3"), command, *arguments, *FAST],
                         capture_output=True, text=True, preexec_fn=no_bytes)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"insid3: error: {out}" in run.stderr and "File too large" in run.stderr, run.stderr


def test_console_script_end_to_end(tmp_path, targets):
    out = tmp_path / "out"
    command = [str(Path(sys.executable).parent / "insid3"), "segment", "--ref", *REFERENCE,
               "--out", str(out), "--image-size", "256", "--svd-components", "16", str(targets)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "SMOKE TEST" in run.stderr and "segment: 100%" in run.stderr
    assert "insid3: quality:" in run.stderr and "segmented 8, skipped 0, failed 0" in run.stderr

    document = json.loads((out / "annotations.json").read_text())
    assert [image["file_name"] for image in document["images"]] == sorted(p.name for p in targets.iterdir())
    assert document["info"]["smoke_test"] is True and document["categories"] == [{"id": 1, "name": "object"}]
    for image, annotation in zip(document["images"], document["annotations"]):
        png = np.array(Image.open(out / image["file_name"]))
        assert png.shape == Image.open(targets / image["file_name"]).size[::-1]
        assert set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(rle_decode(annotation["segmentation"]), png > 0)
        assert annotation["area"] == int((png > 0).sum())
        assert annotation["quality"]["verdict"] in ("ok", "too_small", "too_large", "fragmented", "empty")
        assert 0.0 <= annotation["score"] <= 1.0


def test_resume_skips_existing_and_keeps_annotations(tmp_path, targets, capsys):
    out = tmp_path / "out"
    assert segment("--out", out, targets) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "scene_03.png").unlink()
    capsys.readouterr()
    assert segment("--out", out, targets) == 0
    assert "segmented 1, skipped 7" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert {k: v for k, v in after.items() if k != "scene_03.png"} == {k: v for k, v in first.items() if k != "scene_03.png"}
    assert len(json.loads((out / "annotations.json").read_text())["annotations"]) == 8

    assert segment("--out", out, "--overwrite", targets) == 0
    assert "segmented 8, skipped 0" in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns != first[p.name] for p in out.glob("*.png") if p.name != "scene_03.png")


def test_masks_written_by_hand_get_annotations_on_resume(tmp_path, targets):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(EXAMPLES / "masks" / "scene_01.png", out / "scene_01.png")
    assert segment("--out", out, targets) == 0
    document = json.loads((out / "annotations.json").read_text())
    by_name = {i["file_name"]: a for i, a in zip(document["images"], document["annotations"])}
    assert by_name["scene_01.png"]["score"] is None
    truth = np.array(Image.open(EXAMPLES / "masks" / "scene_01.png")) > 0
    np.testing.assert_array_equal(rle_decode(by_name["scene_01.png"]["segmentation"]), truth)


def test_failed_target_is_reported_and_batch_goes_on(tmp_path, targets, capsys):
    data = (targets / "scene_02.png").read_bytes()
    (targets / "scene_02.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert segment("--out", out, targets) == 1
    error = capsys.readouterr().err
    assert f"FAILED {targets / 'scene_02.png'}" in error and "truncated" in error
    assert len(list(out.glob("*.png"))) == 7 and not (out / "scene_02.png").exists()


def test_exif_rotated_target_keeps_its_orientation(tmp_path):
    image = Image.open(EXAMPLES / "targets" / "scene_01.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    folder = tmp_path / "targets"
    folder.mkdir()
    image.save(folder / "rotated.jpg", exif=exif, quality=95)
    out = tmp_path / "out"
    assert segment("--out", out, folder / "rotated.jpg") == 0
    assert Image.open(out / "rotated.png").size == (image.height, image.width)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t, r: Image.new("L", (10, 10)).save(r / "mask.png"), "10x10 but its image is 480x360"),
        (lambda t, r: Image.new("L", (480, 360)).save(r / "mask.png"), "reference mask is empty"),
        (lambda t, r: (r / "mask.png").write_bytes(b"not a png"), "unreadable or truncated"),
    ],
    ids=["mask-size", "empty-mask", "unreadable-mask"],
)
def test_bad_reference_is_a_clear_error(tmp_path, targets, capsys, mutate, message):
    references = tmp_path / "ref"
    references.mkdir()
    mutate(targets, references)
    code = main(["segment", "--ref", REFERENCE[0], str(references / "mask.png"), *FAST,
                 "--out", str(tmp_path / "out"), str(targets)])
    error = capsys.readouterr().err
    assert code == 2 and message in error and "mask.png" in error
    assert "Traceback" not in error


def test_target_resolution_errors(tmp_path, targets, capsys):
    assert segment("--out", tmp_path / "out", tmp_path / "missing.png") == 2
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(targets / "scene_01.png", other / "scene_01.png")
    assert segment("--out", tmp_path / "out", targets, other) == 2
    assert "share a file stem" in capsys.readouterr().err
    assert segment("--out", targets, targets / "scene_01.png") == 2
    assert "would overwrite input files" in capsys.readouterr().err


def test_glob_pattern_and_corrupt_annotations(tmp_path, targets, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "annotations.json").write_text("{ not json")
    assert segment("--out", out, str(targets / "scene_0[12].png")) == 2
    assert "move it away or pass --overwrite" in capsys.readouterr().err
    assert segment("--out", out, "--overwrite", str(targets / "scene_0[12].png")) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["scene_01.png", "scene_02.png"]


def test_svd_components_must_be_below_width(tmp_path, targets, capsys):
    code = main(["segment", "--ref", *REFERENCE, "--image-size", "128", "--svd-components", "96",
                 "--device", "cpu", "--out", str(tmp_path / "out"), str(targets)])
    assert code == 2 and "smaller than the backbone width C=96" in capsys.readouterr().err


def test_info(capsys, monkeypatch):
    assert main(["info", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "torch" in printed and "timm" in printed and "device          cpu" in printed
    assert "cache" in printed and "insid3-cache" in printed
    assert "clustering      scipy (auto on cpu; INSID3_CLUSTERING)" in printed and "triton " in printed
    monkeypatch.setenv("INSID3_CLUSTERING", "torch")
    assert main(["info", "--device", "cpu"]) == 0
    assert "clustering      torch (torch on cpu; INSID3_CLUSTERING)" in capsys.readouterr().out
    monkeypatch.setenv("INSID3_CLUSTERING", "kmeans")
    assert main(["info", "--device", "cpu"]) == 2
    assert "clustering (--clustering, INSID3_CLUSTERING) must be one of" in capsys.readouterr().err


def test_info_reads_the_settings_as_segment_does_and_refuses_what_segment_would(tmp_path, capsys, monkeypatch):
    """``info`` read INSID3_DEVICE and INSID3_CLUSTERING only: it ignored INSID3_SETTINGS and
    --settings, and reported ``triton`` on the CPU, which segment then refused after loading the
    backbone. Both now read the settings alike and refuse triton off CUDA before any loading."""
    import insid3_core.settings

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shared = tmp_path / "shared.json"
    shared.write_text('{"clustering": "torch", "weights": "facebook/dinov3-vits16-pretrain-lvd1689m"}')
    monkeypatch.setenv("INSID3_SETTINGS", str(shared))
    assert main(["info", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "clustering      torch (torch on cpu; INSID3_CLUSTERING)" in printed
    assert "weights         facebook/dinov3-vits16-pretrain-lvd1689m" in printed and str(shared) in printed

    mine = tmp_path / "mine.json"
    mine.write_text('{"clustering": "triton"}')
    monkeypatch.setattr(insid3_core.settings.EngineSettings, "load_backbone", lambda self: pytest.fail("loaded"))
    for command in (["info", "--settings", str(mine)],
                    ["segment", "--settings", str(mine), "--ref", *REFERENCE, "--out", str(tmp_path / "out"),
                     str(EXAMPLES / "targets" / "scene_01.png")]):
        assert main([*command, "--device", "cpu"]) == 2
        error = capsys.readouterr().err
        assert "'triton' needs a CUDA device, and device (--device, INSID3_DEVICE) 'cpu' is cpu" in error
    assert not (tmp_path / "out" / "scene_01.png").exists()


def test_auto_clustering_is_triton_on_cuda_torch_on_other_accelerators_and_scipy_on_the_cpu(monkeypatch):
    from insid3_core import clustering

    monkeypatch.setattr(clustering, "triton_usable", lambda: True)
    chosen = {device: clustering.clustering_method("auto", torch.device(device)) for device in ("cuda", "mps", "cpu")}
    assert chosen == {"cuda": "triton", "mps": "torch", "cpu": "scipy"}
    monkeypatch.setattr(clustering, "triton_usable", lambda: False)
    assert clustering.clustering_method("auto", torch.device("cuda")) == "torch"
    assert clustering.clustering_method("torch", torch.device("cpu")) == "torch", "a named method is itself"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="clustering='triton' needs a CUDA device"):
        clustering.clustering_method("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert clustering.clustering_method("triton", torch.device("cpu")) == "triton", "Triton's CPU interpreter"


def test_a_broken_link_in_a_target_folder_is_reported_not_lost(tmp_path, targets, capsys):
    """Links are followed (a link is a target of its own name); a link whose image is gone fails like
    an unreadable image (named, exit 1), while a folder or a pipe that merely has an image's name
    is no target."""
    (targets / "scene_09.png").symlink_to(tmp_path / "gone.png")
    (targets / "linked.png").symlink_to(targets / "scene_01.png")
    (targets / "folder.png").mkdir()
    os.mkfifo(targets / "pipe.png")
    out = tmp_path / "out"
    assert segment("--out", out, targets) == 1
    error = capsys.readouterr().err
    assert f"FAILED {targets / 'scene_09.png'}: a link to {tmp_path / 'gone.png'}, which does not exist" in error
    assert "failed 1" in error and "folder.png" not in error and "pipe.png" not in error
    assert len(list(out.glob("*.png"))) == 9
    assert np.array_equal(np.asarray(Image.open(out / "linked.png")), np.asarray(Image.open(out / "scene_01.png")))
    assert segment("--out", tmp_path / "other", targets / "scene_09.png") == 2
    assert f"{targets / 'scene_09.png'}: a link to {tmp_path / 'gone.png'}, which does not exist" in capsys.readouterr().err


def test_a_folder_of_avif_and_gif_images_is_segmented_and_its_other_files_counted(tmp_path, capsys):
    """Folder scans took only JPEG, PNG, BMP, TIFF and WebP: AVIF and GIF files were left out without
    a word. Files that are not images are still left out, and counted."""
    folder = tmp_path / "modern"
    folder.mkdir()
    Image.open(EXAMPLES / "targets" / "scene_01.png").convert("RGB").save(folder / "first.avif", quality=90)
    Image.open(EXAMPLES / "targets" / "scene_02.png").convert("RGB").save(folder / "second.gif")
    for name in ("notes.txt", "labels.txt", "photo.heic", "README", ".DS_Store"):
        (folder / name).write_text("not an image")
    out = tmp_path / "out"
    assert segment("--out", out, folder) == 0
    assert f"insid3: {folder}: left out 4 file(s) that are not images insid3 reads (.heic 1, .txt 2, no extension 1)" \
        in capsys.readouterr().err
    document = json.loads((out / "annotations.json").read_text())
    assert [image["file_name"] for image in document["images"]] == ["first.avif", "second.gif"]
    for name, source in (("first", "scene_01.png"), ("second", "scene_02.png")):
        assert Image.open(out / f"{name}.png").size == Image.open(EXAMPLES / "targets" / source).size


def test_masks_and_records_take_the_names_of_linked_targets(tmp_path, targets):
    """A folder of links into a content-addressed store (DVC, git-annex): masks are named after the
    links, not after the store's hash names, and the records list the links."""
    store = tmp_path / "store"
    store.mkdir()
    links = tmp_path / "links"
    links.mkdir()
    for name in ("scene_01", "scene_02"):
        digest = hashlib.sha256(name.encode()).hexdigest()
        shutil.copy(targets / f"{name}.png", store / digest)
        (links / f"{name}.png").symlink_to(store / digest)
    out = tmp_path / "out"
    assert segment("--out", out, links, links / "scene_01.png") == 0
    assert sorted(path.name for path in out.glob("*.png")) == ["scene_01.png", "scene_02.png"]
    listed = json.loads((out / "annotations.json").read_text())["images"]
    assert sorted(image["file_name"] for image in listed) == ["scene_01.png", "scene_02.png"]


def test_the_ray_listing_keeps_broken_links_too(tmp_path, targets):
    from insid3_core.distributed import check_target_spec, listed_targets
    from insid3_core.io import InputError

    scenes = {os.path.abspath(path) for path in targets.glob("scene_*.png")}
    (targets / "linked.png").symlink_to(targets / "scene_01.png")
    (targets / "scene_09.png").symlink_to(tmp_path / "gone.png")
    (targets / "folder.png").mkdir()
    os.mkfifo(targets / "pipe.png")
    for spec in (targets, targets / "*.png"):
        assert set(listed_targets(str(spec))) == scenes | {str(targets / "linked.png"), str(targets / "scene_09.png")}
    with pytest.raises(InputError, match="scene_09.png: a link to .*gone.png, which does not exist"):
        check_target_spec(str(targets / "scene_09.png"))


def test_the_ray_listing_counts_a_folders_other_files_as_the_single_machine_does(tmp_path, targets, capsys):
    """Local folders and URIs (pyarrow): the files that are not images are counted by kind into the
    fragments folder, and the job's summary says of each folder what the single machine says."""
    pytest.importorskip("pyarrow")
    from insid3_core.cli.common import folder_targets
    from insid3_core.distributed import LEFT_OUT_PREFIX, left_out_counts, list_batch
    from insid3_core.fragments import JobSummary, print_summary

    for name in ("notes.txt", "labels.TXT", "README", ".DS_Store"):
        (targets / name).write_text("not an image")
    (targets / "nested").mkdir()
    (targets / "nested" / "deeper.txt").write_text("not listed: subfolders are not read")
    empty = tmp_path / "only_images"
    empty.mkdir()
    shutil.copy(targets / "scene_01.png", empty / "scene_01.png")
    parts = tmp_path / "parts"
    parts.mkdir()
    specs = [str(targets), f"file://{targets}", str(empty), str(targets / "scene_02.png")]
    listed = [list(path for block in list_batch({"spec": [spec]}, str(parts)) for path in block["path"])
              for spec in specs]
    assert sorted(listed[0]) == sorted(os.path.abspath(path) for path in targets.glob("scene_*.png"))
    assert sorted(listed[1]) == sorted(f"file://{path}" for path in listed[0])
    assert len(list(parts.glob(f"{LEFT_OUT_PREFIX}*.json"))) == 2, "folders with other files only"
    counts = {".txt": 2, "no extension": 1}
    assert left_out_counts(parts, specs) == {specs[0]: counts, specs[1]: counts}
    print_summary(JobSummary(left_out=left_out_counts(parts, specs)), tmp_path / "out")
    folder_targets(specs[0], targets)
    notes = [line for line in capsys.readouterr().err.splitlines() if "left out" in line]
    assert notes == [f"insid3: {spec}: left out 3 file(s) that are not images insid3 reads (.txt 2, no extension 1)"
                     for spec in (specs[0], specs[1], specs[0])]


def test_a_mask_that_cannot_be_written_is_a_failed_target_and_the_others_are_listed(tmp_path, targets, capsys,
                                                                                   monkeypatch):
    """A full disk, say, for one mask (planted: the writer raises ENOSPC for scene_02)."""
    import errno

    import insid3_core.cli.segment as command

    write = command.write_target_mask

    def disk_full_for_scene_02(path, *arguments):
        if path.name == "scene_02.png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, *arguments)

    monkeypatch.setattr(command, "write_target_mask", disk_full_for_scene_02)
    out = tmp_path / "out"
    assert segment("--out", out, targets) == 1
    error = capsys.readouterr().err
    assert "FAILED scene_02.png: its mask could not be written (No space left on device)" in error
    assert "Traceback" not in error
    listed = json.loads((out / "annotations.json").read_text())["images"]
    assert sorted(image["file_name"] for image in listed) == [f"scene_0{i}.png" for i in (1, 3, 4, 5, 6, 7, 8)]


def test_the_ray_job_takes_existing_masks_as_the_single_machine_does(tmp_path, targets):
    """A mask without its record (saved again by an image editor) is a skipped target whose entry
    is rebuilt from its pixels, on Ray as on one machine; one that is not the target's size, or
    cannot be read, is a failed target naming it (it was 'not insid3's mask' for all three)."""
    from insid3_core.distributed import PARTS, JobSpec, prepare_batch
    from insid3_core.settings import EngineSettings

    out = tmp_path / "out"
    names = ["scene_01.png", "scene_02.png", "scene_03.png", "scene_04.png"]
    assert segment("--out", out, *(targets / name for name in names)) == 0
    written = {image["file_name"]: [a for a in document["annotations"] if a["image_id"] == image["id"]]
               for document in [json.loads((out / "annotations.json").read_text())] for image in document["images"]}
    with Image.open(out / "scene_01.png") as mask:
        Image.fromarray(np.asarray(mask)).save(out / "scene_01.png")  # the same pixels, no record
        Image.fromarray(np.asarray(mask)[::2, ::2]).save(out / "scene_02.png")
    (out / "scene_03.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    job = JobSpec(EngineSettings.from_env(image_size=256), str(out), ("object",), None, False, None)
    left = prepare_batch({"path": [str(targets / name) for name in names]}, job)
    assert len(left["path"]) == 0, "every target is settled from its existing mask"
    entries = {entry["name"]: entry for fragment in (out / PARTS).glob("*.jsonl")
               for entry in map(lambda line: json.loads(line.split("\t", 1)[1]), fragment.read_text().splitlines())}
    assert entries["scene_01.png"]["status"] == "skipped"
    rebuilt = entries["scene_01.png"]["record"]["annotations"]
    assert [(a["segmentation"], a["area"]) for a in rebuilt] == [(a["segmentation"], a["area"]) for a in written["scene_01.png"]]
    assert rebuilt[0]["score"] is None, "no score without the record"
    assert entries["scene_02.png"]["status"] == "failed"
    width, height = Image.open(targets / "scene_02.png").size
    assert entries["scene_02.png"]["error"] == \
        f"{out / 'scene_02.png'}: 260x200, the target is {width}x{height}; --overwrite redoes it"
    assert entries["scene_03.png"]["status"] == "failed"
    assert entries["scene_03.png"]["error"].startswith(f"existing output mask {out / 'scene_03.png'}: unreadable or truncated")
    assert entries["scene_04.png"]["status"] == "skipped"
    assert entries["scene_04.png"]["record"]["annotations"][0]["score"] is not None


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_ray_job_never_writes_a_mask_over_a_reference(tmp_path, targets, capsys, overwrite):
    """``--ref data/a.png out/a.png --out out data/``: the single machine refuses before any work;
    on Ray the target fails (its mask would have been the reference mask, taken as done, or with
    --overwrite written over it)."""
    import os

    from insid3_core.distributed import PARTS, JobSpec, prepare_batch
    from insid3_core.settings import EngineSettings

    out = tmp_path / "out"
    out.mkdir()
    reference_mask = out / "scene_01.png"
    shutil.copy(REFERENCE[1], reference_mask)
    job = JobSpec(EngineSettings.from_env(image_size=256), str(out), ("object",), None, overwrite, None,
                  frozenset({os.path.realpath(reference_mask)}))
    left = prepare_batch({"path": [str(targets / "scene_01.png"), str(targets / "scene_02.png")]}, job)

    assert list(left["path"]) == [str(targets / "scene_02.png")]
    entries = [json.loads(line.split("\t", 1)[1]) for fragment in (out / PARTS).glob("*.jsonl")
               for line in fragment.read_text().splitlines()]
    assert entries == [{"name": "scene_01.png", "status": "failed", "source": str(targets / "scene_01.png"),
                        "error": f"{targets / 'scene_01.png'}: its output mask would overwrite the reference or "
                                 f"settings file {reference_mask}; choose another --out"}]
    assert reference_mask.read_bytes() == Path(REFERENCE[1]).read_bytes()
    capsys.readouterr()
    assert main(["segment", "--ref", str(REFERENCE[0]), str(reference_mask), *FAST, "--out", str(out),
                 str(targets / "scene_01.png")]) == 2
    assert f"output masks would overwrite input files: {reference_mask}" in capsys.readouterr().err, \
        "the single machine refuses it before any work"
