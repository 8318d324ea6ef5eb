"""``INSID3_CALIBRATE=on``: a pool with a label's references on three images is calibrated before it
is encoded, again whenever it changes, and predicted with the chosen settings; ``INSID3_SETTINGS``
applies a calibration.json to the served engine."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("flask")

from labelstudio_fixtures import BRUSH_CONFIG, LABEL, StaticServer, UPLOADS, brush_region, insid3_parser  # noqa: E402
from scenes import ringed_scene  # noqa: E402

from insid3_core.calibration import calibrate  # noqa: E402
from insid3_core.settings import EngineSettings  # noqa: E402
from labelstudio_backend.app import create_app  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.rle import rle_to_mask  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402

ENGINE = EngineSettings(image_size=256, svd_components=16, device="cpu")
SCENES = [ringed_scene(seed) for seed in range(6)]


def add_reference(folder, index: int) -> None:
    image, mask = SCENES[index]
    (folder / LABEL).mkdir(parents=True, exist_ok=True)
    image.save(folder / LABEL / f"ringed_{index}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / LABEL / f"ringed_{index}_mask.png")


@pytest.fixture
def served(tmp_path):
    """The scenes served like Label Studio uploads, and settings with calibration on."""
    (tmp_path / "served").mkdir()
    for index, (image, _) in enumerate(SCENES):
        image.save(tmp_path / "served" / f"ringed_{index}.png")
    with StaticServer(tmp_path / "served") as server:
        yield Settings(label_studio_url=server.url, model_dir=tmp_path / "model",
                       reference_dir=tmp_path / "references", calibrate=True)


def predict(client, index: int) -> dict:
    answer = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": f"{UPLOADS}/ringed_{index}.png"}}],
                                           "project": "7.1700000000", "label_config": BRUSH_CONFIG})
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def predicted_mask(body: dict) -> np.ndarray:
    (region,) = body["results"][0]["result"]
    value = region["value"]
    return rle_to_mask(value["rle"], region["original_height"], region["original_width"]) > 0


def expected_mask(settings: dict, references: list[int], target: int) -> np.ndarray:
    segmenter = dataclasses.replace(ENGINE, **settings).build()
    encoded = segmenter.encode({LABEL: [SCENES[i] for i in references]})
    return segmenter.segment(encoded, [SCENES[target][0]])[0].mask


def annotate(client, index: int) -> None:
    """Label Studio's webhook for an annotation of task ``index`` painting its scene's mask."""
    answer = client.post("/webhook", json={
        "action": "ANNOTATION_CREATED", "project": {"id": 7, "label_config": BRUSH_CONFIG},
        "task": {"id": 100 + index, "data": {"image": f"{UPLOADS}/ringed_{index}.png"}},
        "annotation": {"id": 40 + index, "result": [brush_region(SCENES[index][1])]},
    })
    assert answer.status_code == 200, answer.get_json()


def test_three_annotated_tasks_calibrate_and_a_new_one_recalibrates(served):
    client = create_app(build_backend(served, ENGINE.build(), ENGINE)).test_client()
    stored_at = served.model_dir / "projects" / "7" / "calibration.json"
    for index in (0, 1):
        annotate(client, index)
    two = predict(client, 5)
    assert not stored_at.exists()
    np.testing.assert_array_equal(predicted_mask(two), expected_mask({}, [0, 1], 5))

    annotate(client, 2)
    three = predict(client, 5)
    stored = json.loads(stored_at.read_text())
    expected = calibrate(ENGINE, {LABEL: SCENES[:3]})
    assert stored["settings"] == expected.settings != expected.defaults
    assert stored["best_score"] == expected.best_score
    assert stored["model_version"] == three["model_version"] != two["model_version"]
    np.testing.assert_array_equal(predicted_mask(three), expected_mask(expected.settings, [0, 1, 2], 5))

    annotate(client, 3)
    four = predict(client, 5)
    stored = json.loads(stored_at.read_text())
    assert stored["model_version"] == four["model_version"] != three["model_version"]
    assert len(stored["references"]) == 4
    assert stored["settings"] == calibrate(ENGINE, {LABEL: SCENES[:4]}).settings


def test_reference_folder_pools_calibrate_too(served):
    for index in (0, 1, 2):
        add_reference(served.reference_dir, index)
    client = create_app(build_backend(served, ENGINE.build(), ENGINE)).test_client()
    predict(client, 5)
    stored = json.loads((served.model_dir / "projects" / "7" / "calibration.json").read_text())
    assert stored["settings"] == calibrate(ENGINE, {LABEL: SCENES[:3]}).settings


def test_calibrated_versions_differ_from_uncalibrated_ones(served):
    add_reference(served.reference_dir, 0)
    calibrating = create_app(build_backend(served, ENGINE.build(), ENGINE)).test_client()
    plain = create_app(build_backend(dataclasses.replace(served, calibrate=False), ENGINE.build())).test_client()
    assert predict(calibrating, 5)["model_version"] != predict(plain, 5)["model_version"]


def test_calibrate_switch_is_read_by_name(monkeypatch):
    monkeypatch.setenv("INSID3_CALIBRATE", "on")
    assert Settings.from_environment().calibrate
    monkeypatch.setenv("INSID3_CALIBRATE", "sometimes")
    with pytest.raises(ValueError, match="INSID3_CALIBRATE must be on or off, got 'sometimes'"):
        Settings.from_environment()
    with pytest.raises(ValueError, match="needs the engine settings"):
        build_backend(Settings(calibrate=True), ENGINE.build())


def test_insid3_settings_applies_a_calibration_file_to_the_served_engine(tmp_path, monkeypatch):
    from labelstudio_backend.commands import backend_from_arguments

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"settings": {"image_size": 256, "tau": 0.8, "merge_threshold": 0.1}}))
    monkeypatch.setenv("INSID3_SETTINGS", str(path))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    backend = backend_from_arguments(insid3_parser().parse_args(["labelstudio", "serve", "--device", "cpu"]),
                                     Settings.from_environment(), serving=True)
    config = backend.predictor.segmenter.config
    assert (config.image_size, config.tau, config.merge_threshold) == (256, 0.8, 0.1)
