"""``calibrate_references`` on a real FiftyOne: the tagged references segment each other, the chosen
settings land in the dataset's plugin settings and the next segment run starts from them."""

from __future__ import annotations

import asyncio
import json
from importlib.util import find_spec

import numpy as np
import pytest
from fiftyone_setup import PLUGIN_URI
from scenes import ringed_scene

pytestmark = pytest.mark.skipif(find_spec("fiftyone") is None, reason="needs the fiftyone extra")

CALIBRATE = f"{PLUGIN_URI}/calibrate_references"
SEGMENT = f"{PLUGIN_URI}/segment_by_example"
ENGINE = {"image_size": 256, "svd_components": 16, "device": "cpu"}
SCENES = [ringed_scene(seed) for seed in range(6)]


@pytest.fixture
def dataset(fo, tmp_path):
    """Six two-texture scenes with their masks; the first four tagged ``reference``."""
    samples = []
    for index, (image, mask) in enumerate(SCENES):
        path = tmp_path / f"ringed_{index}.png"
        image.save(path)
        samples.append(fo.Sample(filepath=str(path), tags=["reference"] if index < 4 else [],
                                 ground_truth=fo.Segmentation(mask=mask.astype(np.uint8) * 255)))
    collection = fo.Dataset()
    collection.add_samples(samples)
    yield collection
    collection.delete()


def run(uri, dataset, params):
    import fiftyone.operators as foo

    return foo.execute_operator(uri, {"dataset": dataset}, params={"reference_field": "ground_truth", **params})


def test_calibration_stores_the_engine_choice_and_the_next_run_uses_it(dataset):
    from insid3_core.calibration import calibrate
    from insid3_core.settings import EngineSettings

    result = run(CALIBRATE, dataset, ENGINE).result
    expected = calibrate(EngineSettings(**ENGINE), {"object": [(image, mask) for image, mask in SCENES[:4]]})
    assert [row["chosen"] for row in result["settings"]] == list(expected.settings.values())
    assert [row["iou_best"] for row in result["references"]] == [round(100 * r.iou_best, 1) for r in expected.references]
    assert result["summary"].startswith("Calibrated: leave-one-out IoU")

    dataset.reload()
    assert dataset.app_config.plugins["@insid3/fiftyone"] == expected.settings
    assert dataset.info["insid3_calibration"]["best_score"] == pytest.approx(expected.best_score)

    run(SEGMENT, dataset, {"output_field": "pred", "device": "cpu"})
    dataset.reload()
    used = dataset.info["insid3"]["pred"]["settings"]
    assert {name: used[name] for name in expected.settings} == expected.settings


def test_without_apply_the_dataset_settings_stay(dataset):
    run(CALIBRATE, dataset, {**ENGINE, "apply": False})
    dataset.reload()
    assert "@insid3/fiftyone" not in (dataset.app_config.plugins or {})
    assert "insid3_calibration" in dataset.info


def test_one_reference_sample_is_a_form_problem(dataset):
    from fiftyone.operators import OperatorRegistry
    from fiftyone.operators.executor import ExecutionError, resolve_type

    for sample in dataset.match_tags("reference").skip(1):
        sample.tags.remove("reference")
        sample.save()
    request = {"dataset_name": dataset.name, "params": {"reference_field": "ground_truth"}, "target": "inputs"}
    properties = asyncio.run(resolve_type(OperatorRegistry(), CALIBRATE, request)).type.properties
    assert "at least two samples" in properties["problem"].view.label
    with pytest.raises(ExecutionError, match="at least two samples"):
        run(CALIBRATE, dataset, ENGINE)


def test_a_calibration_file_is_a_plugin_setting(dataset, tmp_path):
    """The plugin setting ``settings`` reads ``insid3 calibrate``'s calibration.json."""
    from fiftyone_plugin.settings import engine_settings

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"settings": {"tau": 0.8, "merge_threshold": 0.1}}))
    dataset.app_config.plugins = {"@insid3/fiftyone": {"settings": str(path), "merge_threshold": 0.3}}
    dataset.save()
    engine = engine_settings({}, dataset)
    assert (engine.tau, engine.merge_threshold) == (0.8, 0.3), "a per-option plugin setting wins over the file"
    path.write_text("[]")
    with pytest.raises(ValueError, match="plugin setting 'settings' .*calibration.json: expected a JSON object"):
        engine_settings({}, dataset)
