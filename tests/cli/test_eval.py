"""`insid3 eval`: datasets written in their standard layouts, episodes, mIoU / FB-IoU, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_rle

from insid3_core.cli import main
from insid3_core.datasets import COCO_CLASSES, SUIM_CODES, load_dataset, make_episodes
from insid3_core.evaluation import iou_counts, run_episodes, summarise

FAST = ["--image-size", "64", "--svd-components", "8", "--device", "cpu", "--batch-size", "2", "--workers", "0"]
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 60), "yellow": (230, 220, 30)}
SIZE = (64, 80)  # (H, W)
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def scene(rng: np.random.Generator, colours) -> tuple[np.ndarray, list[np.ndarray]]:
    """A noisy grey ``(H, W, 3)`` image with one disk or square per colour, and each shape's ``(H, W)`` mask."""
    image = rng.integers(90, 150, (*SIZE, 3)).astype(np.uint8)
    rows, cols = np.mgrid[: SIZE[0], : SIZE[1]]
    masks = []
    for index, colour in enumerate(colours):
        cy, cx, r = rng.integers(16, SIZE[0] - 16), rng.integers(16 + 30 * index, 34 + 30 * index), rng.integers(7, 13)
        if index % 2 == 0:
            shape = (rows - cy) ** 2 + (cols - cx) ** 2 < r * r
        else:
            shape = (abs(rows - cy) < r) & (abs(cols - cx) < r) & ~masks[-1]
        image[shape] = colour
        masks.append(shape)
    return image, masks


def save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)


def save_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def write_folder(root: Path, per_class: int = 3, classes=("red", "blue", "green")) -> dict:
    """``root/<class>/<stem>.png`` + ``<stem>_mask.png``; returns the truth ``{(image, class): mask}``."""
    rng, truth = np.random.default_rng(1), {}
    for label in classes:
        for i in range(per_class):
            image, (mask,) = scene(rng, [COLOURS[label]])
            save_image(root / label / f"{label}{i}.png", image)
            save_mask(root / label / f"{label}{i}_mask.png", mask)
            truth[str(root / label / f"{label}{i}.png"), label] = mask
    return truth


def write_fss(root: Path) -> dict:
    """FSS-1000: ``root/<class>/<N>.jpg`` + ``<N>.png``, 3 classes of which the split file keeps 2."""
    rng, truth = np.random.default_rng(2), {}
    for label in ("red", "blue", "green"):
        for n in range(1, 4):
            image, (mask,) = scene(rng, [COLOURS[label]])
            save_image(root / label / f"{n}.jpg", image)
            save_mask(root / label / f"{n}.png", mask)
            truth[str(root / label / f"{n}.jpg"), label] = mask
    (root.parent / "test.txt").write_text("red\nblue\n")
    return truth


def write_isic(root: Path) -> dict:
    """ISIC 2018 task 1 with ``class_id.csv`` splitting the lesions into two classes."""
    rng, truth, rows = np.random.default_rng(3), {}, []
    for i, label in enumerate(["nevus", "melanoma"] * 3):
        image, (mask,) = scene(rng, [COLOURS["red" if label == "nevus" else "blue"]])
        path = root / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg"
        save_image(path, image)
        save_mask(root / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{i:07d}_segmentation.png", mask)
        truth[str(path), label] = mask
        rows.append([f"ISIC_{i:07d}", label])
    with (root / "class_id.csv").open("w", newline="") as stream:
        csv.writer(stream).writerows([["ID", "Class"], *rows])
    return truth


def write_suim(root: Path) -> dict:
    """SUIM: ``images/<stem>.jpg`` + colour-coded ``masks/<stem>.bmp`` with fish (FV) and divers (HD)."""
    rng, truth = np.random.default_rng(4), {}
    code_colour = {code: tuple(255 * ((code >> bit) & 1) for bit in (2, 1, 0)) for code in SUIM_CODES.values()}
    for i in range(4):
        present = ["FV", "HD"] if i < 3 else ["FV"]
        image, masks = scene(rng, [COLOURS["yellow"], COLOURS["blue"]][: len(present)])
        coded = np.zeros((*SIZE, 3), np.uint8)
        for name, mask in zip(present, masks):
            coded[mask] = code_colour[SUIM_CODES[name]]
            truth[str(root / "images" / f"d_r_{i}_.jpg"), name] = mask
        save_image(root / "images" / f"d_r_{i}_.jpg", image)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(coded).save(root / "masks" / f"d_r_{i}_.bmp")
    return truth


def write_coco(root: Path) -> dict:
    """COCO 2014 val images and instances JSON with the 80 category ids; classes 1, 2 and 5 annotated
    (folds 0, 1, 0); one image holds two instances of class 1 (their union is the class mask)."""
    rng, truth = np.random.default_rng(5), {}
    images, annotations = [], []
    planted = {1: 4, 2: 3, 5: 3}  # class number (1..80) -> images
    for number, count in planted.items():
        category = COCO_IDS[number - 1]
        for _ in range(count):
            image_id = len(images) + 1
            instances = 2 if number == 1 and image_id == 1 else 1
            colour = COLOURS[{1: "red", 2: "blue", 5: "green"}[number]]
            image, masks = scene(rng, [colour] * instances)
            name = f"COCO_val2014_{image_id:012d}.jpg"
            save_image(root / "val2014" / name, image)
            images.append({"id": image_id, "file_name": name, "height": SIZE[0], "width": SIZE[1]})
            for mask in masks:
                rle = coco_rle.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                    "area": int(mask.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0})
            truth[str(root / "val2014" / name), f"class{number}"] = np.logical_or.reduce(masks)
    categories = [{"id": cid, "name": f"class{n}", "supercategory": "thing"} for n, cid in enumerate(COCO_IDS, 1)]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return truth


WRITERS = {"folder": write_folder, "fss1000": write_fss, "isic": write_isic, "suim": write_suim, "coco20i": write_coco}


def hand_scores(report: dict, out: Path, truth: dict) -> tuple[float, float, dict]:
    """mIoU, FB-IoU and per-fold class IoUs recomputed from the written truth and the saved predictions."""
    sums: dict = {}
    for episode in report["episodes"]:
        for query in episode["queries"]:
            predicted = np.array(Image.open(out / query["mask"])) > 0
            actual = truth[query["image"], episode["class"]]
            fold = sums.setdefault(episode["fold"], {"classes": {}, "fg": [0, 0], "bg": [0, 0]})
            cls = fold["classes"].setdefault(episode["class"], [0, 0])
            for target, (i, u) in ((cls, (predicted & actual, predicted | actual)),
                                   (fold["fg"], (predicted & actual, predicted | actual)),
                                   (fold["bg"], (~predicted & ~actual, ~predicted | ~actual))):
                target[0] += int(i.sum())
                target[1] += int(u.sum())
    per_fold = {fold: {name: i / u for name, (i, u) in s["classes"].items()} for fold, s in sums.items()}
    mious = [np.mean(list(classes.values())) for classes in per_fold.values()]
    fbs = [(s["fg"][0] / s["fg"][1] + s["bg"][0] / s["bg"][1]) / 2 for s in sums.values()]
    return float(np.mean(mious)), float(np.mean(fbs)), per_fold


def test_iou_arithmetic_on_planted_predictions():
    truth = np.zeros((4, 5), bool)
    truth[1:3, 1:4] = True  # 6 pixels
    shifted = np.zeros_like(truth)
    shifted[1:3, 2:5] = True  # 6 pixels, 4 shared
    np.testing.assert_array_equal(iou_counts(shifted, truth), [[12, 16], [4, 8]])
    np.testing.assert_array_equal(iou_counts(truth, truth), [[14, 14], [6, 6]])
    np.testing.assert_array_equal(iou_counts(np.zeros_like(truth), truth), [[14, 20], [0, 6]])

    entries = [(0, "a", iou_counts(shifted, truth)), (0, "a", iou_counts(truth, truth)),
               (0, "b", iou_counts(np.zeros_like(truth), truth)), (1, "c", iou_counts(truth, truth))]
    summary = summarise(entries)
    fold0 = summary["folds"][0]
    # class a sums 10 / 14 over its two queries (not the mean of 0.5 and 1); class b 0 / 6
    assert fold0["classes"]["a"] == {"iou": 10 / 14, "queries": 2, "intersection": 10, "union": 14}
    assert fold0["classes"]["b"]["iou"] == 0.0
    assert fold0["miou"] == pytest.approx((10 / 14 + 0) / 2)
    # FB-IoU: foreground 10 / 20, background (12 + 14 + 14) / (16 + 14 + 20)
    assert fold0["fb_iou"] == pytest.approx((10 / 20 + 40 / 50) / 2)
    assert fold0["background"]["iou"] == pytest.approx(40 / 50)
    assert summary["folds"][1]["miou"] == summary["folds"][1]["fb_iou"] == 1.0
    assert summary["miou"] == pytest.approx(((10 / 14) / 2 + 1) / 2)
    assert summary["fb_iou"] == pytest.approx(((10 / 20 + 40 / 50) / 2 + 1) / 2)


class PlantedSegmenter:
    """Stands in for :class:`Segmenter`: predicts each query's truth shifted right by ``shift`` pixels."""

    def __init__(self, truth: dict, label_of: dict, shift: int):
        self.truth, self.label_of, self.shift = truth, label_of, shift
        self.encoded, self.segmented = [], []

    def encode(self, classes):
        (references,) = classes.values()
        self.encoded.append([mask.tobytes() for _, mask in references])
        return self.encoded[-1]

    def segment(self, references, targets, batch_size=8, workers=None):
        self.segmented.append([self.truth[str(t), self.label_of[str(t)]].tobytes() for t in targets])
        masks = [np.roll(self.truth[str(t), self.label_of[str(t)]], self.shift, axis=1) for t in targets]
        return [SimpleNamespace(mask=m, score=0.5) for m in masks]  # what run_episodes reads of a result


def test_run_episodes_scores_planted_predictions_and_batches_queries(tmp_path):
    truth = write_folder(tmp_path / "data", per_class=4)
    label_of = {image: label for image, label in truth}
    dataset = load_dataset("folder", tmp_path / "data")
    episodes, skipped = make_episodes(dataset, shots=2, queries=2, seed=3)
    assert not skipped and len(episodes) == 6  # 4 images a class in 2 episodes of 2 queries
    segmenter = PlantedSegmenter(truth, label_of, shift=3)
    outcomes = list(run_episodes(segmenter, episodes, batch_size=2))

    assert len(segmenter.encoded) == len(segmenter.segmented) == 6  # references once, queries in one batch
    for episode, references, targets in zip(episodes, segmenter.encoded, segmenter.segmented):
        assert len(references) == 2 and len(targets) == 2 and not set(references) & set(targets)
    assert sorted(o.query.image.name for o in outcomes) == sorted(Path(image).name for image, _ in truth)
    summary = summarise((o.episode.fold, o.episode.label, o.counts) for o in outcomes)
    for label in ("red", "blue", "green"):
        masks = [m for (_, name), m in truth.items() if name == label]
        inter = sum((np.roll(m, 3, axis=1) & m).sum() for m in masks)
        union = sum((np.roll(m, 3, axis=1) | m).sum() for m in masks)
        assert summary["folds"][0]["classes"][label]["iou"] == pytest.approx(inter / union)
    perfect = PlantedSegmenter(truth, label_of, shift=0)
    outcomes = run_episodes(perfect, episodes)
    assert summarise((o.episode.fold, o.episode.label, o.counts) for o in outcomes)["miou"] == 1.0


def test_episodes_are_seeded_and_folds_interleaved(tmp_path):
    truth = write_coco(tmp_path / "coco")
    dataset = load_dataset("coco20i", tmp_path / "coco")
    assert dataset.folds[0][:3] == ("class1", "class5", "class9") and dataset.folds[3][-1] == "class80"
    assert all(len(members) == COCO_CLASSES // 4 for members in dataset.folds.values())
    assert set(dataset.classes) == {"class1", "class2", "class5"}
    two_instances = dataset.classes["class1"][0]
    np.testing.assert_array_equal(two_instances.mask(), truth[str(two_instances.image), "class1"])

    first, skipped = make_episodes(dataset, shots=2, episodes=20, folds=[0, 1], seed=7)
    again, _ = make_episodes(dataset, shots=2, episodes=20, folds=[0, 1], seed=7)
    other, _ = make_episodes(dataset, shots=2, episodes=20, folds=[0, 1], seed=8)
    fold1_only, _ = make_episodes(dataset, shots=2, episodes=20, folds=[1], seed=7)
    key = [(e.fold, e.label, [s.image for s in e.supports], [q.image for q in e.queries]) for e in first]
    assert key == [(e.fold, e.label, [s.image for s in e.supports], [q.image for q in e.queries]) for e in again]
    assert key != [(e.fold, e.label, [s.image for s in e.supports], [q.image for q in e.queries]) for e in other]
    assert key[20:] == [(e.fold, e.label, [s.image for s in e.supports], [q.image for q in e.queries])
                        for e in fold1_only]
    assert {e.label for e in first if e.fold == 0} == {"class1", "class5"} and {e.fold for e in first} == {0, 1}
    assert all(len(set(e.supports)) == 2 and not set(e.supports) & set(e.queries) for e in first)
    assert skipped["class9"] == "0 image(s), 3 needed" and "class2" not in skipped
    with pytest.raises(ValueError, match="fold 2 has no class with at least 3 images"):
        make_episodes(dataset, shots=2, folds=[2])


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_eval_report_matches_hand_computation(tmp_path, layout, capsys):
    root = tmp_path / layout
    truth = WRITERS[layout](root)
    out = tmp_path / "out"
    extra = {"fss1000": ["--classes", str(tmp_path / "test.txt")], "coco20i": ["--episodes", "3", "--folds", "0", "1"],
             "folder": ["--shots", "2", "--figures", "4"]}.get(layout, [])
    code = main(["eval", layout, str(root), "--out", str(out), "--save-masks", "--seed", "5", "--figures", "2",
                 *extra, *FAST])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())

    miou, fb_iou, per_fold = hand_scores(report, out, truth)
    assert report["results"]["miou"] == pytest.approx(miou)
    assert report["results"]["fb_iou"] == pytest.approx(fb_iou)
    for fold, classes in per_fold.items():
        got = report["results"]["folds"][str(fold)]["classes"]
        assert {name: c["iou"] for name, c in got.items()} == pytest.approx(classes)
    assert report["protocol"]["seed"] == 5 and report["engine"]["image_size"] == 64
    assert report["engine"]["smoke_test"] is True
    episodes = report["episodes"]
    assert all(len(e["references"]) == report["protocol"]["shots"] for e in episodes)
    assert all(q["image"] not in e["references"] for e in episodes for q in e["queries"])
    expected_classes = {"folder": {"red", "blue", "green"}, "fss1000": {"red", "blue"},
                        "isic": {"nevus", "melanoma"}, "suim": {"FV", "HD"},
                        "coco20i": {"class1", "class2", "class5"}}[layout]
    assert {e["class"] for e in episodes} <= expected_classes
    if layout != "coco20i":  # every image once as a query
        assert sorted((q["image"], e["class"]) for e in episodes for q in e["queries"]) == sorted(
            key for key in truth if key[1] in expected_classes)
    else:
        assert report["results"]["folds"].keys() == {"0", "1"} and len(episodes) == 6
        assert {e["class"] for e in episodes if e["fold"] == 1} == {"class2"}

    text = (out / "report.md").read_text()
    assert f"**mIoU {100 * miou:.1f}**" in text and f"**FB-IoU {100 * fb_iou:.1f}**" in text
    assert all(f"| {e['class']} |" in text for e in episodes)
    figures = report["figures"]
    assert len(figures) == (4 if layout == "folder" else 2)
    for figure in figures:
        assert f"]({figure['path']})" in text
        with Image.open(out / figure["path"]) as png:
            assert png.width >= 400 and png.height >= 300
            assert np.asarray(png.convert("L")).std() > 10  # an image, not a blank canvas
        assert (out / figure["path"]).stat().st_size > 10_000


def bad_coco(root: Path) -> str:
    write_coco(root)
    (root / "annotations" / "instances_val2014.json").unlink()
    return str(root / "annotations" / "instances_val2014.json")


def bad_fss(root: Path) -> str:
    write_fss(root)
    (root / "blue" / "2.png").unlink()
    return str(root / "blue" / "2.png")


def bad_isic(root: Path) -> str:
    write_isic(root)
    (root / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000003_segmentation.png").unlink()
    return str(root / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000003_segmentation.png")


def bad_suim(root: Path) -> str:
    (root / "images").mkdir(parents=True)
    return str(root / "masks")


def bad_folder(root: Path) -> str:
    write_folder(root)
    (root / "green" / "green1_mask.png").unlink()
    return str(root / "green" / "green1_mask.png")


def bad_folder_mask_size(root: Path) -> str:
    write_folder(root, classes=("red",))
    save_mask(root / "red" / "red2_mask.png", np.ones((10, 10), bool))
    return str(root / "red" / "red2_mask.png")


def bad_folder_empty_support(root: Path) -> str:
    write_folder(root, classes=("red",))
    for mask in root.glob("red/*_mask.png"):
        save_mask(mask, np.zeros(SIZE, bool))
    return "_mask.png: reference mask is empty (no foreground pixel)"


def bad_folder_support_size(root: Path) -> str:
    write_folder(root, classes=("red",))
    for mask in root.glob("red/*_mask.png"):
        save_mask(mask, np.ones((10, 10), bool))
    return "_mask.png: mask is 10x10 but its image is 80x64"


def empty_root(root: Path) -> str:
    root.mkdir()
    return str(root)


def coco_not_instances(root: Path) -> str:
    write_coco(root)
    (root / "annotations" / "instances_val2014.json").write_text('{"images": 5}')
    return "instances_val2014.json: not a COCO instances file"


def coco_too_few_categories(root: Path) -> str:
    write_coco(root)
    path = root / "annotations" / "instances_val2014.json"
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "categories": document["categories"][:3]}))
    return "instances_val2014.json: COCO-20i needs the 80 COCO categories, found 3"


def isic_without_images(root: Path) -> str:
    write_isic(root)
    for image in (root / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"):
        image.unlink()
    return "ISIC2018_Task1-2_Training_Input: no ISIC_<id>.jpg image"


def isic_bad_class_table(root: Path) -> str:
    write_isic(root)
    (root / "class_id.csv").write_text("image,label\nISIC_0000000,1\n")
    return "class_id.csv: expected the columns ID,Class"


def suim_without_a_colour_mask(root: Path) -> str:
    write_suim(root)
    (root / "masks" / "d_r_1_.bmp").unlink()
    return "d_r_1_.bmp: missing colour-coded mask of"


def folder_without_classes(root: Path) -> str:
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "README.txt").write_text("no image here")
    return f"{root}: no class folder with images"


@pytest.mark.parametrize("layout, make", [
    ("coco20i", bad_coco), ("fss1000", bad_fss), ("isic", bad_isic), ("suim", bad_suim), ("folder", bad_folder),
    ("folder", bad_folder_mask_size), ("folder", bad_folder_empty_support), ("folder", bad_folder_support_size),
    ("fss1000", empty_root), ("isic", empty_root), ("coco20i", coco_not_instances),
    ("coco20i", coco_too_few_categories), ("isic", isic_without_images), ("isic", isic_bad_class_table),
    ("suim", suim_without_a_colour_mask), ("folder", folder_without_classes),
])
def test_bad_layouts_name_the_path(tmp_path, layout, make, capsys):
    root = tmp_path / "data"
    named = make(root)
    assert main(["eval", layout, str(root), "--out", str(tmp_path / "out"), *FAST]) == 2
    error = capsys.readouterr().err
    assert "insid3: error:" in error and named in error, error


def test_bad_class_list_and_arguments(tmp_path, capsys):
    root = tmp_path / "data"
    write_folder(root, per_class=2)
    classes = tmp_path / "classes.txt"
    classes.write_text("red\nviolet\n")
    out = ["--out", str(tmp_path / "out"), *FAST]
    assert main(["eval", "folder", str(root), "--classes", str(classes), *out]) == 2
    assert f"{classes}: violet: no such class" in capsys.readouterr().err
    classes.write_text("\n\n")
    assert main(["eval", "folder", str(root), "--classes", str(classes), *out]) == 2
    assert f"{classes}: the class list is empty" in capsys.readouterr().err
    assert main(["eval", "folder", str(root), "--shots", "2", *out]) == 2
    assert "fold 0 has no class with at least 3 images" in capsys.readouterr().err
    assert main(["eval", "folder", str(root), "--folds", "1", *out]) == 2
    assert "fold 1 does not exist" in capsys.readouterr().err
    assert main(["eval", "folder", str(root), "--split", "val", *out]) == 2
    assert "--split applies to coco20i and isic only" in capsys.readouterr().err
    assert main(["eval", "folder", str(tmp_path / "nowhere"), *out]) == 2
    assert f"{tmp_path / 'nowhere'}: no such dataset folder" in capsys.readouterr().err


def test_alternative_layouts(tmp_path):
    # ISIC sorted into class sub-folders (PATNet), and flat without class_id.csv (one class)
    write_isic(tmp_path / "isic")
    flat = load_dataset("isic", tmp_path / "isic")
    assert {name: len(s) for name, s in flat.classes.items()} == {"melanoma": 3, "nevus": 3}
    (tmp_path / "isic" / "class_id.csv").unlink()
    assert {name: len(s) for name, s in load_dataset("isic", tmp_path / "isic").classes.items()} == {"lesion": 6}
    inputs = tmp_path / "isic" / "ISIC2018_Task1-2_Training_Input"
    for index, image in enumerate(sorted(inputs.glob("*.jpg"))):
        (inputs / str(1 + index % 2)).mkdir(exist_ok=True)
        image.rename(inputs / str(1 + index % 2) / image.name)
    by_folder = load_dataset("isic", tmp_path / "isic")
    assert sorted(by_folder.classes) == ["1", "2"] and by_folder.folds == {0: ("1", "2")}
    sample = by_folder.classes["1"][0]
    assert sample.source.endswith(f"{sample.image.stem}_segmentation.png") and sample.mask().dtype == bool

    # SUIM with per-class binary masks; an empty mask does not make its image a sample of the class
    truth = write_suim(tmp_path / "suim")
    colour_coded = load_dataset("suim", tmp_path / "suim")
    for (image, name), mask in truth.items():
        sample = next(s for s in colour_coded.classes[name] if str(s.image) == image)
        np.testing.assert_array_equal(sample.mask(), mask)
    masks = tmp_path / "suim" / "masks"
    for coded in sorted(masks.glob("*.bmp")):
        for name in ("FV", "HD"):
            mask = truth.get((str(tmp_path / "suim" / "images" / f"{coded.stem}.jpg"), name), np.zeros(SIZE, bool))
            save_mask(masks / name / coded.name, mask)
        coded.unlink()
    per_class = load_dataset("suim", tmp_path / "suim")
    assert {name: len(s) for name, s in per_class.classes.items()} == {"FV": 4, "HD": 3}


def test_an_earlier_report_is_kept_and_a_bad_out_refused_before_any_episode(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    write_folder(root, per_class=2)
    out = tmp_path / "out"
    arguments = ["eval", "folder", str(root), "--figures", "0", *FAST]
    assert main([*arguments, "--out", str(out)]) == 0
    report = (out / "report.json").read_bytes()
    assert main([*arguments, "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err and (out / "report.json").read_bytes() == report
    assert main([*arguments, "--out", str(out), "--overwrite"]) == 0
    monkeypatch.setattr("insid3_core.cli.eval.run_episodes", lambda *_, **__: pytest.fail("an episode ran"))
    (tmp_path / "afile").write_text("")
    assert main([*arguments, "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main([*arguments, "--out", ""]) == 2 and "an empty name" in capsys.readouterr().err
    earlier = tmp_path / "masks_only" / "masks" / "episode_00000_0_s1.png"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("an earlier run's mask")
    assert main([*arguments, "--out", str(earlier.parent.parent), "--save-masks"]) == 2
    assert "holds files of an earlier run" in capsys.readouterr().err and earlier.read_text() == "an earlier run's mask"
    assert main(["eval", "folder", str(root), "--figures", "1", *FAST, "--out", str(tmp_path / "afile2"),
                 "--episodes", "99999999999999999999"]) == 2
    assert "--episodes must be at most" in capsys.readouterr().err


def test_overwrite_removes_the_earlier_runs_figures_and_masks_its_report_does_not_name(tmp_path):
    """A rerun with --overwrite and fewer figures (or no --save-masks) left the earlier run's
    files beside a report that no longer names them; they go now, other files stay."""
    root = tmp_path / "data"
    write_folder(root, per_class=2)
    out = tmp_path / "out"
    arguments = ["eval", "folder", str(root), *FAST, "--out", str(out)]
    assert main([*arguments, "--figures", "3", "--save-masks"]) == 0
    assert len(list((out / "figures").iterdir())) == 3 and any((out / "masks").iterdir())
    (out / "figures" / "notes.txt").write_text("mine")

    assert main([*arguments, "--figures", "1", "--overwrite"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.relative_to(out).as_posix() for p in (out / "figures").glob("*.png")) == \
        [figure["path"] for figure in report["figures"]]
    assert not list((out / "masks").iterdir())
    assert (out / "figures" / "notes.txt").read_text() == "mine"
