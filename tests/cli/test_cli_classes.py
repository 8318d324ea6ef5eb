"""`insid3 segment` with several classes, negative references and COCO instance output."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from insid3_core.cli import main
from insid3_core.coco import rle_decode
from scenes import scene
from insid3_core.metrics import mask_iou

FAST = ["--image-size", "256", "--svd-components", "16", "--device", "cpu", "--batch-size", "2"]


def write_scene(folder, name, **objects):
    image, masks = scene(**objects)
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{name}.png")
    for key in ("disks", "squares", "lookalikes"):
        Image.fromarray(masks[key].astype(np.uint8) * 255).save(folder / f"{name}_{key}.png")
    return masks


def test_two_classes_in_one_pass_write_a_label_map_and_coco_categories(tmp_path):
    write_scene(tmp_path / "ref", "ref", disks=[(100, 120, 60)], squares=[(200, 40, 90)], seed=1)
    truth = write_scene(tmp_path / "targets", "a", disks=[(80, 90, 45)], squares=[(200, 140, 70)], seed=3)
    ref = tmp_path / "ref"
    out = tmp_path / "out"
    code = main(["segment", "--class-ref", "disk", str(ref / "ref.png"), str(ref / "ref_disks.png"),
                 "--class-ref", "square", str(ref / "ref.png"), str(ref / "ref_squares.png"),
                 "--out", str(out), *FAST, str(tmp_path / "targets" / "a.png")])
    assert code == 0
    labels = np.asarray(Image.open(out / "a.png"))
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert mask_iou(labels == 1, truth["disks"]) > 0.6 and mask_iou(labels == 2, truth["squares"]) > 0.6
    document = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in document["categories"]] == ["disk", "square"]
    by_category = {a["category_id"]: a for a in document["annotations"]}
    np.testing.assert_array_equal(rle_decode(by_category[1]["segmentation"]), labels == 1)
    np.testing.assert_array_equal(rle_decode(by_category[2]["segmentation"]), labels == 2)

    (out / "annotations.json").unlink()
    assert main(["segment", "--class-ref", "disk", str(ref / "ref.png"), str(ref / "ref_disks.png"),
                 "--class-ref", "square", str(ref / "ref.png"), str(ref / "ref_squares.png"),
                 "--out", str(out), *FAST, str(tmp_path / "targets" / "a.png")]) == 0
    rebuilt = json.loads((out / "annotations.json").read_text())
    assert [a["area"] for a in rebuilt["annotations"]] == [a["area"] for a in document["annotations"]]


def test_a_label_map_without_its_record_is_read_back_from_its_pixels_or_refused_by_name(tmp_path, capsys):
    """Resuming several classes where a mask carries no record (written by hand, or by an older
    insid3): its entries come from the label map's values; a mask that is not an 8-bit label map,
    or cannot be read, stops the run with exit 2 naming it (nothing is overwritten)."""
    write_scene(tmp_path / "ref", "ref", disks=[(100, 120, 60)], squares=[(200, 40, 90)], seed=1)
    write_scene(tmp_path / "targets", "a", disks=[(80, 90, 45)], squares=[(200, 140, 70)], seed=3)
    ref, out, target = tmp_path / "ref", tmp_path / "out", tmp_path / "targets" / "a.png"
    command = ["segment", "--class-ref", "disk", str(ref / "ref.png"), str(ref / "ref_disks.png"),
               "--class-ref", "square", str(ref / "ref.png"), str(ref / "ref_squares.png"),
               "--out", str(out), *FAST, str(target)]
    assert main(command) == 0
    written = json.loads((out / "annotations.json").read_text())["annotations"]
    labels = np.asarray(Image.open(out / "a.png"))
    Image.fromarray(labels).save(out / "a.png")  # the same pixels, no record
    (out / "annotations.json").unlink()
    assert main(command) == 0
    rebuilt = json.loads((out / "annotations.json").read_text())["annotations"]
    assert [(a["category_id"], a["area"], a["segmentation"]) for a in rebuilt] == \
        [(a["category_id"], a["area"], a["segmentation"]) for a in written]
    assert all(a["score"] is None for a in rebuilt), "no score without the record"

    capsys.readouterr()
    (out / "annotations.json").unlink()
    Image.fromarray(np.stack([labels] * 3, axis=2)).save(out / "a.png")
    assert main(command) == 2
    assert f"{out / 'a.png'}: existing output is an image of mode RGB, not an 8-bit label map" in capsys.readouterr().err
    (out / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(command) == 2
    assert f"{out / 'a.png'}: existing output mask is unreadable" in capsys.readouterr().err
    assert (out / "a.png").read_bytes() == b"\x89PNG\r\n\x1a\n truncated", "kept as it was"


def test_negative_reference_on_the_command_line(tmp_path):
    ref = tmp_path / "ref"
    write_scene(ref, "ref", disks=[(100, 120, 60)], squares=[(200, 40, 90)], seed=1)
    write_scene(ref, "neg", lookalikes=[(160, 128, 70)], seed=2)
    truth = write_scene(tmp_path / "targets", "t", disks=[(80, 90, 45)], lookalikes=[(230, 170, 50)],
                        squares=[(200, 20, 40)], seed=3)
    common = ["segment", "--ref", str(ref / "ref.png"), str(ref / "ref_disks.png"), *FAST,
              str(tmp_path / "targets" / "t.png")]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "negative"),
                 "--negative", str(ref / "neg.png"), str(ref / "neg_lookalikes.png")]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain" / "t.png")) > 0
    negative = np.asarray(Image.open(tmp_path / "negative" / "t.png")) > 0
    assert (plain & truth["lookalikes"]).sum() > 0.5 * truth["lookalikes"].sum()
    assert (negative & truth["lookalikes"]).sum() < 0.1 * truth["lookalikes"].sum()
    info = json.loads((tmp_path / "negative" / "annotations.json").read_text())["info"]
    assert info["negatives"] == [str(ref / "neg.png")]


def test_instances_give_one_coco_annotation_per_object(tmp_path):
    size = (384, 320)
    write_scene(tmp_path / "ref", "ref", size=size, disks=[(150, 160, 80)], squares=[(280, 20, 80)], seed=9)
    truth = write_scene(tmp_path / "targets", "t", size=size, disks=[(110, 150, 56), (218, 150, 56)],
                        squares=[(300, 10, 60)], seed=10)
    out = tmp_path / "out"
    code = main(["segment", "--ref", str(tmp_path / "ref" / "ref.png"), str(tmp_path / "ref" / "ref_disks.png"),
                 "--instances", "--min-instance-patches", "4", "--out", str(out),
                 "--image-size", "512", "--svd-components", "16", "--device", "cpu", str(tmp_path / "targets" / "t.png")])
    assert code == 0
    document = json.loads((out / "annotations.json").read_text())
    annotations = document["annotations"]
    assert [a["instance"] for a in annotations] == [1, 2]
    masks = [rle_decode(a["segmentation"]) for a in annotations]
    assert not (masks[0] & masks[1]).any()
    np.testing.assert_array_equal(masks[0] | masks[1], np.asarray(Image.open(out / "t.png")) > 0)
    assert sorted(mask_iou(m, t) > 0.5 for m in masks for t in truth["disk_instances"]).count(True) == 2
    for entry, mask in zip(annotations, masks):
        ys, xs = np.nonzero(mask)
        assert entry["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_no_reference_at_all_is_a_usage_error(tmp_path, capsys):
    assert main(["segment", "--out", str(tmp_path), *FAST, str(tmp_path)]) == 2
    assert "at least one reference" in capsys.readouterr().err


def test_label_ref_splits_a_palette_mask_into_classes(tmp_path, capsys):
    masks = write_scene(tmp_path / "ref", "ref", disks=[(100, 120, 60)], squares=[(200, 40, 90)], seed=1)
    write_scene(tmp_path / "targets", "a", disks=[(80, 90, 45)], squares=[(200, 140, 70)], seed=3)
    ref = tmp_path / "ref"
    values = np.where(masks["disks"], 1, np.where(masks["squares"], 2, 0)).astype(np.uint8)
    values[0, :] = 255
    palette = Image.fromarray(values, mode="P")
    palette.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255, 255, 255] * 253)
    palette.save(ref / "ref_palette.png")
    target = str(tmp_path / "targets" / "a.png")
    assert main(["segment", "--label-ref", str(ref / "ref.png"), str(ref / "ref_palette.png"),
                 "--class-name", "1=disk", "--class-name", "2=square", "--out", str(tmp_path / "label"), *FAST,
                 target]) == 0
    assert main(["segment", "--class-ref", "disk", str(ref / "ref.png"), str(ref / "ref_disks.png"),
                 "--class-ref", "square", str(ref / "ref.png"), str(ref / "ref_squares.png"),
                 "--out", str(tmp_path / "separate"), *FAST, target]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "label" / "a.png")),
                                  np.asarray(Image.open(tmp_path / "separate" / "a.png")))
    document = json.loads((tmp_path / "label" / "annotations.json").read_text())
    assert [c["name"] for c in document["categories"]] == ["disk", "square"]

    rgb = ref / "ref_rgb.png"
    Image.open(ref / "ref.png").save(rgb)
    assert main(["segment", "--label-ref", str(ref / "ref.png"), str(rgb), "--out", str(tmp_path / "x"),
                 *FAST, target]) == 2
    assert f"{rgb}: a RGB mask has no class values" in capsys.readouterr().err
    assert main(["segment", "--label-ref", str(ref / "ref.png"), str(ref / "ref_palette.png"),
                 "--class-name", "one", "--out", str(tmp_path / "x"), *FAST, target]) == 2
    assert "expected VALUE=NAME" in capsys.readouterr().err
    label_ref = ["--label-ref", str(ref / "ref.png"), str(ref / "ref_palette.png")]
    for names, words in ((["--class-name", "3=car"], "no --label-ref mask holds the value 3 (they hold 1, 2)"),
                         (["--class-name", "1=disk", "--class-name", "1=ring"], "value 1 is already named 'disk'")):
        assert main(["segment", *label_ref, *names, "--out", str(tmp_path / "x"), *FAST, target]) == 2
        assert words in capsys.readouterr().err
    assert main(["segment", "--ref", str(ref / "ref.png"), str(ref / "ref_disks.png"), "--class-name", "1=disk",
                 "--out", str(tmp_path / "x"), *FAST, target]) == 2
    assert "give --label-ref IMAGE MASK too" in capsys.readouterr().err


def test_label_ref_with_too_many_values_is_refused(tmp_path, capsys):
    write_scene(tmp_path / "ref", "ref", disks=[(100, 120, 60)], seed=1)
    noise = np.arange(256 * 320, dtype=np.uint16).reshape(256, 320) % 1000
    Image.fromarray(noise).save(tmp_path / "ref" / "noise.png")
    assert main(["segment", "--label-ref", str(tmp_path / "ref" / "ref.png"), str(tmp_path / "ref" / "noise.png"),
                 "--out", str(tmp_path / "out"), *FAST, str(tmp_path / "ref" / "ref.png")]) == 2
    assert "999 class values, more than 255" in capsys.readouterr().err


def test_a_rerun_with_the_classes_in_another_order_is_refused(tmp_path, capsys):
    """The folder's masks hold disk as 1 and square as 2; a rerun giving ``--class-ref square``
    first (sets compared) added masks holding square as 1 beside them. It is refused with exit 2,
    naming the order, and writes nothing; the earlier order resumes."""
    write_scene(tmp_path / "ref", "ref", disks=[(100, 120, 60)], squares=[(200, 40, 90)], seed=1)
    write_scene(tmp_path / "targets", "a", disks=[(80, 90, 45)], squares=[(200, 140, 70)], seed=3)
    write_scene(tmp_path / "targets", "b", disks=[(160, 100, 50)], squares=[(40, 40, 60)], seed=4)
    ref, out, targets = tmp_path / "ref", tmp_path / "out", tmp_path / "targets"
    disk = ["--class-ref", "disk", str(ref / "ref.png"), str(ref / "ref_disks.png")]
    square = ["--class-ref", "square", str(ref / "ref.png"), str(ref / "ref_squares.png")]
    assert main(["segment", *disk, *square, "--out", str(out), *FAST, str(targets / "a.png")]) == 0
    before = (out / "annotations.json").read_bytes()
    capsys.readouterr()

    assert main(["segment", *square, *disk, "--out", str(out), *FAST, str(targets / "b.png")]) == 2
    error = capsys.readouterr().err
    assert "holds masks of 'disk', 'square'" in error and "in another order" in error
    assert not (out / "b.png").exists() and (out / "annotations.json").read_bytes() == before

    assert main(["segment", *disk, *square, "--out", str(out), *FAST, str(targets / "b.png")]) == 0
    document = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in document["categories"]] == ["disk", "square"]
    assert [image["file_name"] for image in document["images"]] == ["a.png", "b.png"]
