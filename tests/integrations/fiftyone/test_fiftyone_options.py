"""The plugin's options beyond one mask: instances as ``Detections``, several classes in one pass,
negative references; on synthetic scenes in a real FiftyOne (own MongoDB), tiny checkpoint."""

from __future__ import annotations

import asyncio
import importlib
import json
import re
from importlib.util import find_spec

import numpy as np
import pytest
from fiftyone_setup import PLUGIN_URI
from scenes import scene
from insid3_core.metrics import mask_iou

pytestmark = pytest.mark.skipif(find_spec("fiftyone") is None, reason="needs the fiftyone extra")

SEGMENT = f"{PLUGIN_URI}/segment_by_example"
ENGINE = {"image_size": 256, "svd_components": 16, "device": "cpu", "batch_size": 2}
CLASSES = {0: "background", 3: "disk", 7: "square"}  # values not in class order, on purpose
REFERENCE = scene(disks=[(100, 120, 60)], squares=[(200, 40, 90)], seed=1)
TARGETS = [
    scene(disks=[(80, 90, 45)], squares=[(200, 140, 70)], seed=3),
    scene(disks=[(70, 70, 40), (240, 180, 45)], seed=4),
    scene(disks=[(120, 128, 70)], squares=[(230, 20, 64)], seed=5),
]


@pytest.fixture(scope="module")
def segmenter():
    from insid3_core import TEST_CHECKPOINT, EngineConfig, Segmenter, load_backbone

    return Segmenter(load_backbone(TEST_CHECKPOINT, device="cpu"), EngineConfig(image_size=256, svd_components=16))


def saved(image, folder, name) -> str:
    path = folder / f"{name}.png"
    image.save(path)
    return str(path)


def label_mask(masks) -> np.ndarray:
    """``(H, W)`` uint8: the disks 3, the squares 7."""
    return (3 * masks["disks"] + 7 * masks["squares"]).astype(np.uint8)


@pytest.fixture
def dataset(fo, tmp_path):
    """The reference scene (disks 3, squares 7 in ``ground_truth``, tagged ``reference``) and the targets."""
    samples = [fo.Sample(filepath=saved(REFERENCE[0], tmp_path, "reference"), tags=["reference"],
                         ground_truth=fo.Segmentation(mask=label_mask(REFERENCE[1])))]
    samples += [fo.Sample(filepath=saved(image, tmp_path, f"target_{i}")) for i, (image, _) in enumerate(TARGETS)]
    collection = fo.Dataset()
    collection.add_samples(samples)
    collection.mask_targets = {"ground_truth": CLASSES}
    yield collection
    collection.delete()


def segment(dataset, params, **ctx):
    import fiftyone.operators as foo

    return foo.execute_operator(SEGMENT, {"dataset": dataset, "view_target": "DATASET", **ctx},
                                params={"reference_field": "ground_truth", **ENGINE, **params})


def targets_of(dataset):
    return [sample for sample in dataset.match_tags("reference", bool=False) if sample.filename.startswith("target")]


def assert_detections_match(detections, instances, label):
    """Each ``Detection`` is the engine's instance: relative box, mask cropped to the box, score."""
    assert len(detections) == len(instances)
    for detection, instance in zip(detections, instances):
        height, width = instance.mask.shape
        x, y, w, h = (int(number) for number in instance.box)
        assert detection.label == label
        assert detection.bounding_box == pytest.approx([x / width, y / height, w / width, h / height])
        mask = detection.get_mask()
        assert mask.shape == (h, w)
        np.testing.assert_array_equal(mask > 0, instance.mask[y:y + h, x:x + w])
        assert detection.confidence == pytest.approx(instance.score)


def test_instances_as_detections_beside_the_mask(fo, dataset, segmenter, tmp_path):
    import fiftyone.operators as foo
    from insid3_core.instances import split_instances

    references = segmenter.encode({"object": [(dataset.match_tags("reference").first().filepath,
                                               REFERENCE[1]["disks"])]})
    segment(dataset, {"reference_class": "3", "output": "both", "output_field": "pred"})
    segment(dataset, {"reference_class": "3", "output": "instances", "output_field": "objects",
                      "instance_label": "round", "mask_dir": str(tmp_path / "masks")})

    dataset.reload()
    counts = []
    for sample in targets_of(dataset):
        result = segmenter.segment(references, [sample.filepath])[0].classes["object"]
        instances = split_instances(result)
        np.testing.assert_array_equal(sample.pred.get_mask() > 0, result.mask)
        assert_detections_match(sample.pred_instances.detections, instances, "disk")
        assert sample.pred_instances.verdict == result.quality.verdict
        assert_detections_match(sample.objects.detections, instances, "round")
        assert all(detection.mask is None and detection.mask_path.startswith(str(tmp_path / "masks" / "objects"))
                   for detection in sample.objects.detections)
        counts.append(len(instances))
    assert counts[1] >= 2, "the two separate disks are two instances"
    assert dataset.get_field("objects").document_type is fo.Detections
    report = foo.execute_operator(f"{PLUGIN_URI}/quality_report", {"dataset": dataset},
                                  params={"field": "objects", "view_target": "DATASET"}).result
    assert report["counts"]["ok"] == dataset.count_values("pred.verdict").get("ok", 0) > 0


def test_several_classes_in_one_pass(dataset, segmenter):
    import fiftyone.operators as foo
    from insid3_core.instances import split_instances

    package = type(foo.get_operator(SEGMENT)).__module__.rsplit(".", 1)[0]
    plugin = {name: importlib.import_module(f"{package}.{name}") for name in ("models", "settings")}
    backbone = plugin["models"].segmenter(plugin["settings"].engine_settings(ENGINE, dataset)).backbone
    batches = []
    hook = backbone.model.patch_embed.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    try:
        segment(dataset, {"reference_classes": ["3", "7"], "output": "both", "output_field": "pred"})
    finally:
        hook.remove()
    assert batches == [1, 2, 1], "one call for the reference image of both classes, then one per batch of 2 targets"
    segment(dataset, {"all_classes": True, "output_field": "every"})

    reference = dataset.match_tags("reference").first().filepath
    classes = segmenter.encode({"disk": [(reference, REFERENCE[1]["disks"])],
                                        "square": [(reference, REFERENCE[1]["squares"])]})
    dataset.reload()
    assert dataset.mask_targets["pred"] == CLASSES
    found, class_failures = set(), set()
    for sample, (_, truth) in zip(targets_of(dataset), TARGETS):
        result = segmenter.segment(classes, [sample.filepath])[0]
        mask = sample.pred.get_mask()
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 3, 7}
        np.testing.assert_array_equal(mask, np.array([0, 3, 7])[result.label_map])
        np.testing.assert_array_equal(sample.every.get_mask(), mask)
        for name, class_result in result.classes.items():
            assert sample.pred.classes[name]["score"] == pytest.approx(class_result.score)
            assert sample.pred.classes[name]["verdict"] == class_result.quality.verdict
            class_tag = f"insid3:pred:{name}:{class_result.quality.verdict}"
            assert (class_tag in sample.tags) == (class_result.quality.verdict != "ok"), (class_tag, sample.tags)
            class_failures.update([class_tag] if class_result.quality.verdict != "ok" else [])
            detections = [d for d in sample.pred_instances.detections if d.label == name]
            assert_detections_match(detections, split_instances(class_result), name)
        found.update(int(value) for value in np.unique(mask))
        assert mask_iou(mask == 3, truth["disks"]) > 0.6
    assert found == {0, 3, 7}
    assert "insid3:pred:square:empty" in class_failures, "the disk-only target's square class is judged on its own"

    from fiftyone_plugin import curation  # the review panel's class buttons

    targets = targets_of(dataset)
    classes = {summary.label: summary for summary in curation.summarize(dataset, "pred").classes}
    assert set(classes) == {"disk", "square"}
    for name, summary in classes.items():
        found = sorted(sample.id for sample in targets if sample.pred.classes[name]["verdict"] != "empty")
        failed = sorted(sample.id for sample in targets if sample.pred.classes[name]["verdict"] != "ok")
        assert (summary.found, summary.failed) == (len(found), len(failed))
        assert sorted(curation.class_view(dataset, "pred", name).values("id")) == found
        assert sorted(curation.class_view(dataset, "pred", name, failed=True).values("id")) == failed
    instances = {summary.label: summary.found for summary in curation.summarize(dataset, "pred_instances").classes}
    assert instances == {name: sum(any(d.label == name for d in sample.pred_instances.detections)
                                   for sample in targets) for name in ("disk", "square")}


def test_negative_reference_removes_a_lookalike_that_leaks(fo, dataset, tmp_path):
    """The look-alike leaks into the disk mask until a sample tagged ``negative`` marks it "not this"."""
    negative, negative_masks = scene(lookalikes=[(160, 128, 70)], seed=2)
    target, truth = scene(disks=[(80, 90, 45)], lookalikes=[(230, 170, 50)], squares=[(200, 20, 40)], seed=3)
    negative_sample = fo.Sample(filepath=saved(negative, tmp_path, "negative"),
                                ground_truth=fo.Segmentation(mask=negative_masks["lookalikes"].astype(np.uint8)))
    target_sample = fo.Sample(filepath=saved(target, tmp_path, "leaky"))
    dataset.add_samples([negative_sample, target_sample])
    selection = {"view_target": "SELECTED_SAMPLES", "selected": [target_sample.id]}

    segment(dataset, {"reference_class": "3", "output_field": "before"}, **selection)
    negative_sample.tags.append("negative")
    negative_sample.save()
    segment(dataset, {"reference_class": "3", "output_field": "after"}, **selection)
    segment(dataset, {"reference_class": "3", "output_field": "excluded"})

    target_sample.reload()
    before, after = target_sample.before.get_mask() > 0, target_sample.after.get_mask() > 0
    leak_before = (before & truth["lookalikes"]).sum() / truth["lookalikes"].sum()
    leak_after = (after & truth["lookalikes"]).sum() / truth["lookalikes"].sum()
    print(f"\nplugin negative reference: look-alike covered {leak_before:.3f} -> {leak_after:.3f}, "
          f"disk IoU {mask_iou(before, truth['disks']):.3f} -> {mask_iou(after, truth['disks']):.3f}")
    assert leak_before > 0.5 and leak_after < 0.1
    assert mask_iou(after, truth["disks"]) > mask_iou(before, truth["disks"])
    negative_sample.reload()
    assert negative_sample.excluded is None and target_sample.excluded is not None


@pytest.mark.parametrize("case, message", [
    ("negative_without_mask", "negative(s) tagged 'negative' have no mask in 'ground_truth'"),
    ("empty_negative", "1 negative(s) have an empty mask in 'ground_truth'"),
    ("negative_is_reference", "tagged both 'reference' and 'negative'"),
    ("same_tags", "negative tag and the reference tag are both 'reference'"),
    ("absent_class", "no reference shows class(es) 5 (5)"),
    ("same_fields", "both go to 'pred'"),
    ("detections_over_masks", "does not hold Detections labels"),
])
def test_invalid_option_runs_write_nothing(fo, dataset, case, message):
    from fiftyone.operators.executor import ExecutionError

    params = {"output_field": "pred", "reference_class": "3"}
    if case == "negative_without_mask":
        dataset.select(targets_of(dataset)[0].id).tag_samples("negative")
    elif case == "empty_negative":
        negative = targets_of(dataset)[0]
        negative.tags.append("negative")
        negative.ground_truth = fo.Segmentation(mask=np.zeros((256, 320), dtype=np.uint8))
        negative.save()
    elif case == "negative_is_reference":
        dataset.match_tags("reference").tag_samples("negative")
    elif case == "same_tags":
        params["negative_tag"] = "reference"
    elif case == "absent_class":
        params["reference_classes"] = ["3", "5"]
    elif case == "same_fields":
        params.update(output="both", instances_field="pred")
    else:
        segment(dataset, {"output_field": "pred", "reference_class": "3"})
        params.update(output="instances", overwrite=True)

    with pytest.raises(ExecutionError, match=re.escape(message)):
        segment(dataset, params)
    assert "pred_instances" not in dataset.get_field_schema()
    assert ("pred" in dataset.get_field_schema()) == (case == "detections_over_masks")


def form(dataset, **params):
    """The resolved input form of ``segment_by_example`` as the App gets it."""
    from fiftyone.operators import OperatorRegistry
    from fiftyone.operators.executor import resolve_type

    request = {"dataset_name": dataset.name, "params": params, "target": "inputs"}
    resolved = asyncio.run(resolve_type(OperatorRegistry(), SEGMENT, request))
    json.dumps(resolved.to_json())
    return resolved.type.properties


def test_form_offers_classes_instances_and_negatives(dataset):
    properties = form(dataset)
    assert properties["negative_tag"].default == "negative"
    assert properties["output"].default == "segmentation"
    assert properties["reference_classes"].view.values() == ["3", "7"]
    assert properties["reference_class"].type.values == ["0", "3", "7"]
    assert not {"instances_field", "instance_method", "instance_label"} & set(properties)

    properties = form(dataset, reference_classes=["3", "7"], output="both")
    assert "reference_class" not in properties and "instance_label" not in properties
    assert properties["instances_field"].default == "insid3_instances"
    assert properties["instance_method"].default == "necks" and properties["min_instance_patches"].default == 1

    properties = form(dataset, all_classes=True, output="instances")
    assert not {"reference_classes", "reference_class", "instances_field"} & set(properties)
    assert "problem" not in properties

    assert form(dataset, reference_class="7", output="instances")["instance_label"].default == "square"


RGB_CLASSES = {"#000000": "background", "#ff0000": "disk", "#00ff00": "square"}


def rgb_mask(masks) -> np.ndarray:
    """``(H, W, 3)`` uint8: the disks red, the squares green (an RGB mask field's colours)."""
    return (masks["disks"][..., None] * np.array([255, 0, 0]) + masks["squares"][..., None] * np.array([0, 255, 0])
            ).astype(np.uint8)


def test_rgb_mask_classes_are_chosen_by_colour_or_label_and_written_in_their_colours(dataset, segmenter):
    """An RGB reference field (mask targets keyed ``#rrggbb``): classes named by colour (any case)
    or by label segment as the engine does, and the output mask holds each class's colour."""
    reference = dataset.match_tags("reference").first()
    reference.ground_truth.mask = rgb_mask(REFERENCE[1])
    reference.save()
    dataset.mask_targets = {"ground_truth": RGB_CLASSES}
    dataset.save()
    assert form(dataset)["reference_classes"].view.values() == ["#ff0000", "#00ff00"]
    segment(dataset, {"reference_classes": ["#FF0000", "square"], "output_field": "pred"})
    segment(dataset, {"reference_class": "#ff0000", "output_field": "disks"})

    classes = segmenter.encode({"disk": [(reference.filepath, REFERENCE[1]["disks"])],
                                "square": [(reference.filepath, REFERENCE[1]["squares"])]})
    disks = segmenter.encode({"disk": [(reference.filepath, REFERENCE[1]["disks"])]})
    dataset.reload()
    assert dataset.mask_targets["pred"] == RGB_CLASSES
    colours = np.array([(0, 0, 0), (255, 0, 0), (0, 255, 0)], dtype=np.uint8)
    found = set()
    for sample in targets_of(dataset):
        result = segmenter.segment(classes, [sample.filepath])[0]
        mask = sample.pred.get_mask()
        assert mask.shape == (*result.label_map.shape, 3) and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, colours[result.label_map])
        found.update(map(tuple, np.unique(mask.reshape(-1, 3), axis=0)))
        np.testing.assert_array_equal(sample.disks.get_mask() > 0,
                                      segmenter.segment(disks, [sample.filepath])[0].classes["disk"].mask)
    assert found == {(0, 0, 0), (255, 0, 0), (0, 255, 0)}


def test_a_colour_class_of_a_one_channel_mask_is_a_form_message(dataset):
    dataset.mask_targets = {"ground_truth": {"#ff0000": "disk"}}
    dataset.save()
    problem = form(dataset, reference_class="#ff0000")["problem"]
    assert problem.invalid and "class #ff0000 is an RGB colour but the mask has one channel" in problem.error_message
