"""The zoo model ``insid3-dinov3-torch`` on a real FiftyOne: found in the model zoo directory the
install wrote, loaded with ``foz.load_zoo_model``, applied with ``apply_model`` through DataLoader
workers; masks equal the engine's."""

from __future__ import annotations

import re
from importlib.util import find_spec

import numpy as np
import pytest
from data import EXAMPLES

pytestmark = pytest.mark.skipif(find_spec("fiftyone") is None, reason="needs the fiftyone extra")

MODEL = "insid3-dinov3-torch"
ENGINE = {"image_size": 128, "svd_components": 16, "device": "cpu"}
REFERENCE = (str(EXAMPLES / "reference" / "disks.png"), str(EXAMPLES / "reference" / "disks_mask.png"))
TARGETS = sorted((EXAMPLES / "targets").glob("*.png"))


@pytest.fixture(scope="module")
def expected():
    from insid3_core import TEST_CHECKPOINT, EngineConfig, Segmenter, load_backbone

    segmenter = Segmenter(load_backbone(TEST_CHECKPOINT, device="cpu"), EngineConfig(image_size=128, svd_components=16))
    predictions = segmenter.segment(segmenter.encode({"object": [REFERENCE]}), TARGETS)
    return {target.name: prediction for target, prediction in zip(TARGETS, predictions)}


@pytest.fixture
def dataset(fo):
    collection = fo.Dataset()
    collection.add_samples([fo.Sample(filepath=str(target)) for target in TARGETS])
    yield collection
    collection.delete()


def test_the_install_puts_the_model_in_the_zoo(fo):
    import fiftyone.zoo as foz

    assert MODEL in foz.list_zoo_models()
    assert foz.is_zoo_model_downloaded(MODEL)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_apply_model_writes_the_engines_masks(fo, dataset, expected, num_workers):
    import fiftyone.zoo as foz

    from insid3_core.backbone import BUNDLED_CHECKPOINT

    model = foz.load_zoo_model(MODEL, references=[REFERENCE], weights=BUNDLED_CHECKPOINT, **ENGINE)  # a Path too
    dataset.apply_model(model, "insid3", batch_size=3, num_workers=num_workers)
    for sample in dataset:
        label, truth = sample["insid3"], expected[sample.filename]
        assert isinstance(label, fo.Segmentation)
        np.testing.assert_array_equal(label.get_mask() > 0, truth.mask)
        assert label.score == pytest.approx(truth.score) and label.verdict == truth.quality.verdict


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_unreadable_image_leaves_only_its_own_sample_without_a_label(fo, dataset, expected, tmp_path, caplog,
                                                                       num_workers):
    """One missing file failed its whole batch: its batch-mates got no label either."""
    import fiftyone.zoo as foz

    missing = fo.Sample(filepath=str(tmp_path / "gone.png"))
    dataset.add_sample(missing)
    ordered = dataset.sort_by("filepath")  # gone.png (under /tmp) in the first batch of three
    model = foz.load_zoo_model(MODEL, references=[REFERENCE], **ENGINE)
    ordered.apply_model(model, "insid3", batch_size=3, num_workers=num_workers)
    for sample in ordered:
        if sample.id == missing.id:
            assert sample["insid3"] is None
        else:
            np.testing.assert_array_equal(sample["insid3"].get_mask() > 0, expected[sample.filename].mask)
    if num_workers == 0:
        assert "gone.png" in caplog.text


def test_instances_and_several_classes(fo, dataset):
    import fiftyone.zoo as foz

    from insid3_core.io import load_mask

    square = np.zeros_like(load_mask(REFERENCE[1]))
    square[20:80, 200:260] = True
    model = foz.load_zoo_model(MODEL, classes={"disk": [REFERENCE], "patch": [(REFERENCE[0], square)]},
                               output="both", **ENGINE)
    dataset.apply_model(model, "pred", batch_size=4)
    sample = dataset.first()
    mask = sample["pred_segmentation"].get_mask()
    assert set(np.unique(mask)) <= {0, 1, 2} and (mask == 1).any()
    assert set(sample["pred_segmentation"].classes) == {"disk", "patch"}
    assert {d.label for d in sample["pred_instances"].detections} <= {"disk", "patch"}
    assert any(d.label == "disk" for d in sample["pred_instances"].detections)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs references="),
    ({"references": [REFERENCE], "gamma": 1}, "unknown option(s) gamma"),
    ({"references": [REFERENCE], "tau": "high"}, "'tau'='high' is not a finite number"),
    ({"references": [REFERENCE], "output": "boxes"}, "output must be one of segmentation, instances, both"),
    ({"references": [REFERENCE], "classes": {"object": [REFERENCE]}}, "which classes= names too"),
])
def test_bad_arguments_are_named(fo, kwargs, message):
    import fiftyone.zoo as foz

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        foz.load_zoo_model(MODEL, cache=False, **{**ENGINE, **kwargs})


def test_the_app_form_and_its_parameters_from_tagged_references(fo, dataset):
    """``resolve_input`` gives the App the form; ``parse_parameters`` turns its tag into references."""
    import fiftyone.zoo as foz
    from fiftyone.operators.executor import ExecutionContext

    reference = fo.Sample(filepath=REFERENCE[0], tags=["reference"],
                          ground_truth=fo.Segmentation(mask_path=REFERENCE[1]))
    dataset.add_sample(reference)
    ctx = ExecutionContext(request_params={"dataset_name": dataset.name, "params": {}})
    zoo_model = foz.get_zoo_model(MODEL)
    properties = zoo_model.resolve_input(ctx).type.properties
    assert properties["reference_tag"].default == "reference"
    assert properties["reference_field"].default == "ground_truth"
    assert {"output", "tau", "weights", "image_size"} <= set(properties)
    params = {"reference_tag": "reference", "reference_field": "ground_truth", "output": "segmentation",
              "weights": None, **ENGINE}
    zoo_model.parse_parameters(ctx, params)
    assert [path for path, _ in params["references"]] == [REFERENCE[0]] and "weights" not in params
    model = foz.load_zoo_model(MODEL, cache=False, **params)
    dataset.match_tags("reference", bool=False).apply_model(model, "from_form", batch_size=4)
    assert len(dataset.exists("from_form")) == len(TARGETS)


def test_a_repository_archive_registers_as_a_zoo_source(fo, dataset, tmp_path, monkeypatch):
    """``foz.register_zoo_model_source(URL)`` on an archive of the repository (what FiftyOne also
    downloads for a GitHub URL), served on loopback: FiftyOne finds the manifest in the tree,
    copies its folder into the zoo, and the first load runs its ``download_model``."""
    import functools
    import shutil
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import fiftyone.zoo as foz

    from fiftyone_plugin.zoo import SOURCE

    repository = tmp_path / "repository" / "insid3" / "fiftyone_plugin" / "zoo_source"
    shutil.copytree(SOURCE, repository, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.make_archive(str(tmp_path / "served" / "insid3"), "zip", tmp_path / "repository")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(fo.config, "model_zoo_dir", str(tmp_path / "zoo"))
    try:
        foz.register_zoo_model_source(f"http://127.0.0.1:{server.server_address[1]}/insid3.zip")
    finally:
        server.shutdown()
        server.server_close()
    assert (tmp_path / "zoo" / "insid3" / "manifest.json").is_file()
    model = foz.load_zoo_model(MODEL, cache=False, references=[REFERENCE], **ENGINE)
    assert foz.is_zoo_model_downloaded(MODEL)
    dataset.limit(2).apply_model(model, "registered", batch_size=2)
    assert len(dataset.exists("registered")) == 2


def test_predict_takes_fiftyones_arrays_and_pil_images_and_names_anything_else(fo):
    import fiftyone.zoo as foz
    from PIL import Image

    model = foz.load_zoo_model(MODEL, references=[REFERENCE], **ENGINE)
    image = Image.open(REFERENCE[0]).convert("RGB")
    from_array = model.predict(np.asarray(image)).get_mask()
    np.testing.assert_array_equal(model.predict(image).get_mask(), from_array)
    np.testing.assert_array_equal(model.predict(np.asarray(image.convert("RGBA"))).get_mask(), from_array)
    for wrong, shown in ((np.asarray(image, np.float32) / 255, "float32 array of shape"),
                         (np.asarray(image).transpose(2, 0, 1), "uint8 array of shape (3,"),
                         (REFERENCE[0], "got a str")):
        with pytest.raises(TypeError, match=re.escape(shown)):
            model.predict(wrong)
