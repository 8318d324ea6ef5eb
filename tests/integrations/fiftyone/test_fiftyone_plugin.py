"""The FiftyOne plugin on a real FiftyOne (own MongoDB), run through FiftyOne's operator
execution API, immediately and delegated; masks compared with the engine's."""

from __future__ import annotations

import asyncio
import importlib
import json
from importlib.util import find_spec

import numpy as np
import pytest
from data import EXAMPLE_REFERENCE as REFERENCE, EXAMPLE_TARGETS as TARGETS
from fiftyone_setup import PLUGIN_URI

pytestmark = pytest.mark.skipif(find_spec("fiftyone") is None, reason="needs the fiftyone extra")

SEGMENT = f"{PLUGIN_URI}/segment_by_example"
ENGINE = {"image_size": 128, "svd_components": 16, "device": "cpu", "batch_size": 3}


@pytest.fixture(scope="session")
def expected():
    """The engine's own results for the example targets, by file name."""
    from insid3_core import TEST_CHECKPOINT, EngineConfig, Segmenter, load_backbone

    segmenter = Segmenter(load_backbone(TEST_CHECKPOINT, device="cpu"), EngineConfig(image_size=128, svd_components=16))
    references = segmenter.encode({"object": [REFERENCE]})
    return {target.name: result for target, result in zip(TARGETS, segmenter.segment(references, TARGETS, 4))}


def segment(dataset, params, **ctx):
    import fiftyone.operators as foo

    return foo.execute_operator(SEGMENT, {"dataset": dataset, **ctx},
                                params={"reference_field": "ground_truth", **ENGINE, **params})


def target_samples(dataset):
    return [sample for sample in dataset if "reference" not in sample.tags]


def assert_matches_engine(sample, field, expected):
    label, result = sample[field], expected[sample.filename]
    assert np.array_equal(label.get_mask() > 0, result.mask)
    assert label.score == pytest.approx(result.score)
    assert label.verdict == result.quality.verdict
    assert label.area_ratio == pytest.approx(result.quality.area_ratio)
    failure = f"insid3:{field}:{result.quality.verdict}"
    assert (failure in sample.tags) == (result.quality.verdict != "ok")


def plugin_module(name):
    """A module of the plugin as FiftyOne loaded it."""
    import fiftyone.operators as foo

    package = type(foo.get_operator(SEGMENT)).__module__.rsplit(".", 1)[0]
    return importlib.import_module(f"{package}.{name}")


def test_immediate_run_on_dataset_matches_engine(dataset, expected):
    result = segment(dataset, {"output_field": "pred"}, view_target="DATASET")

    dataset.reload()
    for sample in target_samples(dataset):
        assert_matches_engine(sample, "pred", expected)
        assert sample["pred"].mask is not None  # inline
    reference = dataset.match_tags("reference").first()
    assert reference["pred"] is None and reference.ground_truth.mask_path == str(REFERENCE[1])
    triggered = [request.operator_uri for request in result.executor._requests]
    assert "set_progress" in triggered and "notify" in triggered
    assert "pred.score" in dataset.get_field_schema(flat=True)


def test_selection_to_mask_files_and_overwrite(dataset, expected, tmp_path):
    from fiftyone.operators.executor import ExecutionError

    chosen = [sample.id for sample in target_samples(dataset)[2:4]]
    params = {"output_field": "pred", "mask_dir": str(tmp_path)}
    backbones = []
    for overwrite in (False, True):
        segment(dataset, {**params, "overwrite": overwrite}, view_target="SELECTED_SAMPLES", selected=chosen)
        backbones.append(next(iter(plugin_module("models")._SEGMENTERS.values())).backbone)
    with pytest.raises(ExecutionError, match="already exists; tick overwrite"):
        segment(dataset, params, view_target="SELECTED_SAMPLES", selected=chosen)

    assert backbones[0] is backbones[1]  # the model stays loaded between runs
    dataset.reload()
    for sample in target_samples(dataset):
        if sample.id in chosen:
            assert sample.pred.mask_path == str(tmp_path / "pred" / f"{sample.id}.png")
            assert_matches_engine(sample, "pred", expected)
        else:
            assert sample.pred is None


def test_a_patches_view_as_the_target_segments_the_images_behind_its_patches(fo, dataset, expected):
    """Patch ids are not sample ids: the run reported masks written, and wrote none."""
    chosen = target_samples(dataset)[1:3]
    for sample in chosen:
        sample["boxes"] = fo.Detections(detections=[fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.3, 0.3]),
                                                    fo.Detection(label="b", bounding_box=[0.5, 0.5, 0.3, 0.3])])
        sample.save()
    segment(dataset, {"output_field": "pred"}, view=dataset.to_patches("boxes"), view_target="CURRENT_VIEW")
    dataset.reload()
    for sample in target_samples(dataset):
        if sample.id in {s.id for s in chosen}:
            assert_matches_engine(sample, "pred", expected)
        else:
            assert sample.pred is None


def test_multiclass_reference_uses_the_chosen_class(fo, dataset, expected):
    from insid3_core.io import load_mask

    disks = load_mask(REFERENCE[1])
    classes = np.where(disks, 1, 0).astype(np.uint8)
    classes[:8, :8][~disks[:8, :8]] = 2
    reference = dataset.match_tags("reference").first()
    reference.ground_truth = fo.Segmentation(mask=classes)
    reference.save()
    dataset.mask_targets = {"ground_truth": {1: "disk", 2: "corner"}}
    dataset.save()

    chosen = [target_samples(dataset)[0].id]
    segment(dataset, {"output_field": "pred", "reference_class": "1"}, view_target="SELECTED_SAMPLES",
            selected=chosen)
    assert_matches_engine(dataset[chosen[0]], "pred", expected)
    assert dataset.mask_targets["pred"] == {255: "disk"}

    segment(dataset, {"output_field": "every", "all_classes": True}, view_target="SELECTED_SAMPLES", selected=chosen)
    assert dataset.mask_targets["every"] == {1: "disk", 2: "corner"}
    segment(dataset, {"output_field": "every", "overwrite": True, "reference_class": "2"},
            view_target="SELECTED_SAMPLES", selected=chosen)
    assert dataset.mask_targets["every"] == {255: "corner"}, "no mask targets of the run before"
    assert set(np.unique(dataset[chosen[0]].every.get_mask())) <= {0, 255}


@pytest.mark.parametrize("case, message", [
    ("no_reference", "No sample is tagged 'reference'"),
    ("reference_without_mask", "have no mask in 'ground_truth'"),
    ("empty_mask", "have an empty mask in 'ground_truth'"),
    ("output_is_reference_field", "holds the reference masks"),
    ("not_a_segmentation_field", "'filepath' is not a Segmentation field"),
])
def test_invalid_runs_write_nothing(fo, dataset, case, message):
    from fiftyone.operators.executor import ExecutionError

    params = {"output_field": "pred"}
    if case == "no_reference":
        dataset.untag_samples("reference")
    elif case == "reference_without_mask":
        dataset.select(target_samples(dataset)[0].id).tag_samples("reference")
    elif case == "empty_mask":
        reference = dataset.match_tags("reference").first()
        reference.ground_truth = fo.Segmentation(mask=np.zeros((64, 64), dtype=np.uint8))
        reference.save()
    elif case == "output_is_reference_field":
        params["output_field"] = "ground_truth"
    else:
        params["reference_field"] = "filepath"

    with pytest.raises(ExecutionError, match=message):
        segment(dataset, params, view_target="DATASET")
    assert "pred" not in dataset.get_field_schema()
    assert not [tag for tag in dataset.distinct("tags") if tag.startswith("insid3:")]


def test_delegated_run_executed_by_the_service(dataset, expected):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    queued = segment(dataset, {"output_field": "pred"}, view_target="DATASET", request_delegation=True)
    assert queued.delegated
    assert "pred" not in dataset.get_field_schema()

    service = DelegatedOperationService()
    service.execute_queued_operations(dataset_name=dataset.name)
    operation = service.get(queued.result["id"])
    assert operation.run_state == ExecutionRunState.COMPLETED, operation.result
    assert operation.status.progress == pytest.approx(1.0)
    output = operation.result.result
    print(f"delegated run {operation.id}: state {operation.run_state}, progress {operation.status.progress}, "
          f"output {output}")
    targets = len(target_samples(dataset))
    assert output["targets"] == output["masks_written"] == targets
    assert sum(output["verdicts"].values()) == targets and output["output_field"] == "pred"
    dataset.reload()
    for sample in target_samples(dataset):
        assert_matches_engine(sample, "pred", expected)


@pytest.mark.slow
@pytest.mark.skipif(find_spec("ray") is None, reason="needs the ray extra")
def test_a_delegated_run_with_a_ray_address_fans_out_to_ray_actors(fo, dataset, expected):
    """Plugin setting ``ray_address`` (a local runtime) and ``ray_actors`` 2: the delegated run's
    targets go through two engine actors, not this process's backbone (which encodes the
    references only, for the form's checks and the provenance); the labels are the same."""
    import ray
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    engine = plugin_module("settings").engine_settings(ENGINE, dataset)
    backbone = plugin_module("models").segmenter(engine).backbone
    dataset.app_config.plugins = {PLUGIN_URI: {"ray_address": "local", "ray_actors": 2}}
    dataset.save()
    queued = segment(dataset, {"output_field": "pred"}, view_target="DATASET", request_delegation=True)
    seen = backbone.images_seen
    try:
        DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    finally:
        ray.shutdown()
    operation = DelegatedOperationService().get(queued.result["id"])
    assert operation.run_state == ExecutionRunState.COMPLETED, operation.result
    assert operation.status.progress == pytest.approx(1.0)
    assert backbone.images_seen - seen == 1, "this process encoded the reference, the actors the targets"
    dataset.reload()
    for sample in target_samples(dataset):
        assert_matches_engine(sample, "pred", expected)


def test_large_targets_default_to_delegation(fo, dataset):
    from fiftyone.operators import OperatorRegistry
    from fiftyone.operators.executor import resolve_execution_options

    request = {"dataset_name": dataset.name, "params": {"view_target": "DATASET"}}
    fo.app_config.plugins[PLUGIN_URI] = {"delegation_threshold": 5}
    try:
        options = asyncio.run(resolve_execution_options(OperatorRegistry(), SEGMENT, request))
        assert options.default_choice_to_delegated and options.allow_immediate_execution
        dataset.app_config.plugins = {PLUGIN_URI: {"delegation_threshold": 8}}  # 8 targets: not more
        dataset.save()
        options = asyncio.run(resolve_execution_options(OperatorRegistry(), SEGMENT, request))
        assert not options.default_choice_to_delegated
    finally:
        del fo.app_config.plugins[PLUGIN_URI]


def test_review_operators(dataset, expected):
    import fiftyone.operators as foo

    segment(dataset, {"output_field": "pred"}, view_target="DATASET")
    report = foo.execute_operator(f"{PLUGIN_URI}/quality_report", {"dataset": dataset},
                                  params={"field": "pred", "view_target": "DATASET"}).result
    verdicts = [result.quality.verdict for result in expected.values()]
    assert report["counts"] == {category: verdicts.count(category) for category in report["counts"]}
    assert sum(report["histogram"]["counts"]) == len(expected)
    outputs = foo.get_operator(f"{PLUGIN_URI}/quality_report").resolve_output(
        foo.ExecutionContext({"dataset_name": dataset.name, "results": report}))
    assert set(outputs.type.properties) == {"counts", "score_histogram"}
    json.dumps(outputs.to_json())

    saved = foo.execute_operator(f"{PLUGIN_URI}/save_failure_views", {"dataset": dataset},
                                 params={"field": "pred"}).result["views"]
    failures = sorted({verdict for verdict in verdicts if verdict != "ok"})
    assert saved == [f"pred {category}" for category in ("too_small", "too_large", "fragmented", "empty")
                     if category in failures]
    for name in saved:
        view = dataset.load_saved_view(name)
        assert set(view.values("pred.verdict")) == {name.split()[1]}

    chosen = [sample.id for sample in target_samples(dataset)[:2]]
    tagged = foo.execute_operator(f"{PLUGIN_URI}/tag_references", {"dataset": dataset, "selected": chosen},
                                  params={"reference_tag": "shot"}).result
    assert tagged == {"tagged": 2}
    assert sorted(dataset.match_tags("shot").values("id")) == sorted(chosen)


def test_unreadable_target_is_tagged_and_the_others_go_on(fo, dataset, expected, tmp_path):
    missing = fo.Sample(filepath=str(tmp_path / "gone.png"))
    dataset.add_sample(missing)
    chosen = [missing.id, target_samples(dataset)[0].id]
    segment(dataset, {"output_field": "pred"}, view_target="SELECTED_SAMPLES", selected=chosen)

    missing.reload()
    assert missing.pred is None and "insid3:pred:unreadable" in missing.tags
    assert_matches_engine(dataset[chosen[1]], "pred", expected)


def form(dataset, **params):
    """The resolved input form of ``segment_by_example`` as the App gets it."""
    from fiftyone.operators import OperatorRegistry
    from fiftyone.operators.executor import resolve_type

    request = {"dataset_name": dataset.name, "params": params, "target": "inputs"}
    resolved = asyncio.run(resolve_type(OperatorRegistry(), SEGMENT, request))
    json.dumps(resolved.to_json())  # what the App receives
    return resolved.type.properties


def test_form_offers_defaults_classes_and_explains_problems(fo, dataset):
    properties = form(dataset)
    assert {"view_target", "reference_tag", "reference_field", "output_field", "overwrite", "weights",
            "image_size", "svd_components", "tau", "merge_threshold", "device", "batch_size"} <= set(properties)
    assert properties["output_field"].default == "insid3"
    assert properties["reference_field"].default == "ground_truth"
    assert "problem" not in properties and "smoke_test" in properties

    dataset.mask_targets = {"ground_truth": {0: "background", 1: "disk", 2: "corner"}}
    dataset.save()
    assert form(dataset)["reference_class"].type.values == ["0", "1", "2"]

    problem = form(dataset, reference_tag="nothing")["problem"]
    assert problem.invalid and "No sample is tagged 'nothing'" in problem.error_message


@pytest.mark.parametrize("case, message", [
    ("image_size", "image_size (--image-size, INSID3_IMAGE_SIZE) must be a positive multiple of 16, got 250"),
    ("tau", "tau (--tau, INSID3_TAU) must lie in (-1, 1), got 2.0"),
    ("merge_threshold", "INSID3_MERGE_THRESHOLD) must be a finite number, got nan"),
    ("device", "device 'gpu' is none of auto, cpu, cuda, cuda:N, mps"),
    ("weights", "weights '/nowhere/dinov3.pth': no such file"),
    ("batch_size", "INSID3_BATCH_SIZE) must be >= 1, got 0"),
    ("mask_dir", "is a file, not a folder"),
    ("huge_image", "use at most about"),
    ("wrong_size_reference", "The mask of reference disks"),
    ("deleted_reference", "no longer exists"),
    ("deleted_mask_file", "The mask file of reference disks.png no longer exists"),
    ("corrupt_mask_file", "The mask file of reference disks.png is unreadable"),
    ("flat_mask", "The mask of reference disks.png has shape (10,), not (H, W)"),
    ("photograph_as_mask", "The mask of reference disks.png has more than 4096 distinct colours: a photograph"),
    ("jpeg_class_mask", "The mask file of reference disks.png is a JPEG, whose compression changes class values"),
    ("ray_actors", "'ray_actors' must be an integer >= 1, got 0"),
    ("reference_class", "'1.5' is not a class of 'ground_truth'"),
])
def test_engine_and_reference_problems_are_form_messages(fo, dataset, tmp_path, case, message):
    """Each of these came back as a Python traceback from the run instead of a message in the form."""
    import re
    import shutil

    from fiftyone.operators.executor import ExecutionError

    params = {"reference_field": "ground_truth", **ENGINE, "output_field": "pred"}
    if case in ("image_size", "tau", "batch_size"):
        params[case] = {"image_size": 250, "tau": 2.0, "batch_size": 0}[case]
    elif case == "merge_threshold":
        params[case] = float("nan")
    elif case == "device":
        params[case] = "gpu"
    elif case == "weights":
        params[case] = "/nowhere/dinov3.pth"
    elif case == "mask_dir":
        (tmp_path / "masks").write_text("a file")
        params[case] = str(tmp_path / "masks")
    elif case == "huge_image":
        params["image_size"] = 1_600_000
    elif case == "ray_actors":
        params[case] = 0
    elif case == "reference_class":
        params[case] = 1.5
    else:
        reference = dataset.match_tags("reference").first()
        copy = tmp_path / "disks.png"
        shutil.copy(REFERENCE[0], copy)
        reference.filepath = str(copy)
        mask_file = tmp_path / "disks_mask.png"
        if case == "wrong_size_reference":
            reference.ground_truth = fo.Segmentation(mask=np.ones((10, 10), dtype=np.uint8))
        elif case == "deleted_mask_file":
            reference.ground_truth = fo.Segmentation(mask_path=str(mask_file))
        elif case == "corrupt_mask_file":
            mask_file.write_bytes(b"not a png")
            reference.ground_truth = fo.Segmentation(mask_path=str(mask_file))
        elif case == "flat_mask":
            reference.ground_truth = fo.Segmentation(mask=np.ones(10, dtype=np.uint8))
        elif case == "photograph_as_mask":
            reference.ground_truth = fo.Segmentation(mask_path=str(copy))  # the image as its own mask
        elif case == "jpeg_class_mask":
            from PIL import Image

            Image.open(REFERENCE[1]).save(tmp_path / "disks_mask.jpg")
            reference.ground_truth = fo.Segmentation(mask_path=str(tmp_path / "disks_mask.jpg"))
            params["reference_class"] = 255
        else:
            copy.unlink()
        reference.save()

    problem = form(dataset, **params)["problem"]
    assert problem.invalid and message in problem.error_message
    with pytest.raises(ExecutionError, match=re.escape(message)):
        segment(dataset, params)
    assert "pred" not in dataset.get_field_schema()


def test_a_jpeg_reference_mask_is_read_without_its_compression_rings(fo, dataset, tmp_path):
    """A reference whose ``mask_path`` is a JPEG was read as its every nonzero pixel, so the faint
    rings its compression leaves around the mask's edges became foreground; it is now read as the
    command line reads it (foreground at half the brightest value or more)."""
    from PIL import Image

    from fiftyone_plugin.references import reference_pairs

    stored = np.asarray(Image.open(REFERENCE[1])) > 0
    jpeg = tmp_path / "disks_mask.jpg"
    Image.open(REFERENCE[1]).save(jpeg, quality=75)
    assert ((np.asarray(Image.open(jpeg)) > 0) != stored).sum() > 500  # the rings `> 0` took
    reference = dataset.match_tags("reference").first()
    reference.ground_truth = fo.Segmentation(mask_path=str(jpeg))
    reference.save()

    [(filepath, mask)] = reference_pairs(dataset, "reference", "ground_truth")
    assert filepath == str(REFERENCE[0]) and mask.shape == stored.shape
    assert (mask != stored).sum() <= 10


def test_a_cmyk_reference_mask_file_is_read_as_it_shows(fo, dataset, tmp_path):
    """A CMYK mask file (white object on black, as print software saves it) has no colour ink on
    its object, so it was read as empty; it is now read as its RGB rendering."""
    from PIL import Image

    from fiftyone_plugin.references import reference_pairs

    stored = np.asarray(Image.open(REFERENCE[1])) > 0
    cmyk = tmp_path / "disks_mask.tif"
    key_ink = np.where(stored, 0, 255).astype(np.uint8)
    pixels = np.dstack([np.zeros((*stored.shape, 3), np.uint8), key_ink])
    Image.frombytes("CMYK", stored.shape[::-1], pixels.tobytes()).save(cmyk)
    reference = dataset.match_tags("reference").first()
    reference.ground_truth = fo.Segmentation(mask_path=str(cmyk))
    reference.save()

    [(_, mask)] = reference_pairs(dataset, "reference", "ground_truth")
    np.testing.assert_array_equal(mask, stored)


def test_running_out_of_memory_names_the_settings_that_lower_it(fo, dataset, monkeypatch):
    """A run that ran out of device memory failed with torch's message about its allocator; it now
    names the form's batch_size and image_size, and writes no field. (The failure is raised here:
    a real one needs a GPU, or a memory cap on the process, which the command line's test uses.)"""
    import re

    import torch
    from fiftyone.operators.executor import ExecutionError

    from insid3_core.engine import Segmenter

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB. If reserved but unallocated memory is large try setting ...")
        yield

    monkeypatch.setattr(Segmenter, "iter_segment", out_of_memory)
    message = ("out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); lower batch_size (--batch-size, "
               "INSID3_BATCH_SIZE) or image_size (--image-size, INSID3_IMAGE_SIZE)")
    with pytest.raises(ExecutionError, match=re.escape(message)):
        segment(dataset, {"output_field": "pred"})
    assert "pred" not in dataset.get_field_schema()


@pytest.mark.parametrize("where, name, value, message", [
    ("dataset", "ray_actors", 0, "plugin setting 'ray_actors' must be an integer >= 1, got 0"),
    ("app", "delegation_threshold", "many", "plugin setting 'delegation_threshold' must be an integer, got 'many'"),
    ("environment", "ray_actors", "0", "environment variable INSID3_RAY_ACTORS must be an integer >= 1, got '0'"),
    ("environment", "delegation_threshold", "-1",
     "environment variable INSID3_DELEGATION_THRESHOLD must be an integer >= 0, got '-1'"),
])
def test_a_bad_configured_plugin_setting_is_a_form_message(fo, dataset, monkeypatch, where, name, value, message):
    """A plugin-only setting configured out of range (dataset or App plugin settings, or its
    environment variable) was replaced by its built-in value without a word; the form now names it,
    and the run does not start. The form's own value still wins over it."""
    import re

    from fiftyone.operators.executor import ExecutionError

    if where == "dataset":
        dataset.app_config.plugins = {PLUGIN_URI: {name: value}}
        dataset.save()
    elif where == "app":
        monkeypatch.setitem(fo.app_config.plugins, PLUGIN_URI, {name: value})
    else:
        monkeypatch.setenv(f"INSID3_{name.upper()}", value)
    params = {"reference_field": "ground_truth", **ENGINE, "output_field": "pred"}
    problem = form(dataset, **params)["problem"]
    assert problem.invalid and message in problem.error_message
    with pytest.raises(ExecutionError, match=re.escape(message)):
        segment(dataset, params)
    assert "pred" not in dataset.get_field_schema()
    assert "problem" not in form(dataset, **params, **{name: 2}), "the operator's value is used instead"


def test_the_form_says_how_to_enable_scheduling(fo, dataset, monkeypatch):
    monkeypatch.setattr(fo.config, "allow_legacy_orchestrators", False)
    notice = form(dataset)["scheduling"]
    assert "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true" in notice.view.label
    monkeypatch.setattr(fo.config, "allow_legacy_orchestrators", True)
    assert "scheduling" not in form(dataset)


def test_failure_tags_name_their_field_and_old_tags_stay_readable(fo, dataset, expected):
    """Two runs into two fields keep their own failure tags; re-running one leaves the other's;
    an ``insid3:unreadable`` tag of an earlier version still counts."""
    import fiftyone.operators as foo

    segment(dataset, {"output_field": "first", "min_area_ratio": 0.5}, view_target="DATASET")  # all too small
    segment(dataset, {"output_field": "second", "min_area_ratio": 0.001, "max_area_ratio": 0.01},  # all too large
            view_target="DATASET")
    tags = set(dataset.distinct("tags"))
    first = {tag for tag in tags if tag.startswith("insid3:first:")}
    second = {tag for tag in tags if tag.startswith("insid3:second:")}
    print(f"\nfailure tags: {sorted(first)} and {sorted(second)}")
    assert first == {"insid3:first:too_small"} and second == {"insid3:second:too_large"}
    assert not {tag for tag in tags if tag.count(":") == 1}, "no tag without its field"
    segment(dataset, {"output_field": "second", "overwrite": True, "max_area_ratio": 0.9}, view_target="DATASET")
    assert not {tag for tag in dataset.distinct("tags") if tag.startswith("insid3:second:too_large")}
    assert first <= set(dataset.distinct("tags")), "re-running 'second' keeps the tags of 'first'"

    legacy = target_samples(dataset)[0]
    legacy.tags.append("insid3:unreadable")
    legacy.save()
    report = foo.execute_operator(f"{PLUGIN_URI}/quality_report", {"dataset": dataset},
                                  params={"field": "first", "view_target": "DATASET"}).result
    assert report["counts"]["unreadable"] == 1


def test_the_form_remembers_the_last_values_on_its_dataset(fo, dataset):
    from test_fiftyone_options import form

    assert form(dataset)["image_size"].default == 1024
    segment(dataset, {"output_field": "pred", "refinement": "guided"}, view_target="DATASET")
    dataset.reload()
    properties = form(dataset)
    assert properties["image_size"].default == 128 and properties["refinement"].default == "guided"
    assert properties["svd_components"].default == 16


def test_a_run_that_cannot_start_leaves_the_remembered_values_as_they_were(fo, dataset, tmp_path):
    """Only values a segmenter was built with are remembered: a missing basis file is the form's
    problem, and svd_components above the backbone's width fails the run without being kept."""
    from fiftyone.operators.executor import ExecutionError
    from test_fiftyone_options import form

    missing = str(tmp_path / "nope.npy")
    with pytest.raises(ExecutionError, match="nope.npy: no such file"):
        segment(dataset, {"output_field": "pred", "basis": missing}, view_target="DATASET")
    with pytest.raises(ExecutionError, match="svd_components=5000 must be smaller than the backbone width"):
        segment(dataset, {"output_field": "pred", "svd_components": 5000}, view_target="DATASET")
    dataset.reload()
    assert form(dataset)["svd_components"].default != 5000
    assert "basis" not in ((dataset.app_config.plugins or {}).get(PLUGIN_URI) or {})
    segment(dataset, {"output_field": "pred"}, view_target="DATASET")
    assert dataset.count("pred") == len(target_samples(dataset))


def test_failure_views_replace_their_own_saved_views_only(fo, dataset):
    import fiftyone.operators as foo

    def save_views():
        return foo.execute_operator(f"{PLUGIN_URI}/save_failure_views", {"dataset": dataset},
                                    params={"field": "empties"}).result

    segment(dataset, {"output_field": "empties", "merge_threshold": 0.99}, view_target="DATASET")  # every mask empty
    assert save_views() == {"views": ["empties empty"], "kept": []}
    assert save_views() == {"views": ["empties empty"], "kept": []}  # insid3's own view is replaced
    dataset.delete_saved_view("empties empty")
    dataset.save_view("empties empty", dataset.limit(1), description="my own curated view")
    assert save_views() == {"views": [], "kept": ["empties empty"]}
    assert dataset.get_saved_view_info("empties empty")["description"] == "my own curated view"
    assert len(dataset.load_saved_view("empties empty")) == 1
