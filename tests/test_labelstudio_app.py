"""The ML-backend web app through Flask's test client: configs, references, auth, predictions."""

from __future__ import annotations

import base64
import dataclasses
import shutil

import numpy as np
import pytest

pytest.importorskip("flask")
pytest.importorskip("label_studio_sdk")

from labelstudio_fixtures import (  # noqa: E402
    BRUSH_CONFIG, CHOICES_CONFIG, EXAMPLES, LABEL, TARGETS, StaticServer, iou, reference_folder, small_segmenter,
)

from insid3_core.io import load_mask  # noqa: E402
from labelstudio_backend.app import create_app  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.rle import mask_to_rle, rle_to_mask  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return small_segmenter(tiny_backbone)


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """Examples plus an unreadable 'image', served like Label Studio uploads."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(EXAMPLES, root / "examples")
    (root / "broken.png").write_bytes(b"not an image at all")
    with StaticServer(root) as server:
        yield server


@pytest.fixture
def settings(tmp_path, image_server):
    return Settings(
        label_studio_url=image_server.url,
        model_dir=tmp_path / "model",
        reference_dir=reference_folder(tmp_path / "references"),
    )


def make_client(segmenter, settings):
    return create_app(build_backend(settings, segmenter)).test_client()


def tasks_for(paths, start=1):
    return [{"id": start + i, "data": {"image": f"/examples/targets/{p.name}"}} for i, p in enumerate(paths)]


def predict(client, tasks, config=BRUSH_CONFIG, **kwargs):
    return client.post("/predict", json={"tasks": tasks, "project": "7.1700000000", "label_config": config}, **kwargs)


def test_health_and_setup(segmenter, settings):
    client = make_client(segmenter, settings)
    assert client.get("/health").get_json()["status"] == "UP"
    answer = client.post("/setup", json={"project": "7.1700000000", "schema": BRUSH_CONFIG})
    assert answer.status_code == 200
    assert answer.get_json()["model_version"].startswith("insid3-")


@pytest.mark.parametrize(("config", "message"), [
    (CHOICES_CONFIG, "no <BrushLabels>"),
    ("<View><Image", "not valid XML"),
    ("", "no labelling config"),
])
def test_bad_configs_are_clear_400s(segmenter, settings, config, message):
    client = make_client(segmenter, settings)
    for answer in (client.post("/setup", json={"project": "7.1", "schema": config}), predict(client, tasks_for(TARGETS[:1]), config)):
        assert answer.status_code == 400
        assert message in answer.get_json()["error"]


def test_no_references_yet(segmenter, settings, tmp_path):
    client = make_client(segmenter, dataclasses.replace(settings, reference_dir=tmp_path / "empty"))
    answer = predict(client, tasks_for(TARGETS[:1]))
    assert answer.status_code == 422
    assert "no references yet" in answer.get_json()["error"]


def test_basic_auth(segmenter, settings):
    client = make_client(segmenter, dataclasses.replace(settings, basic_auth=("lead", "s3cret")))
    assert client.get("/health").status_code == 401
    wrong = base64.b64encode(b"lead:nope").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    right = base64.b64encode(b"lead:s3cret").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {right}"}).status_code == 200
    assert predict(client, tasks_for(TARGETS[:1]), headers={"Authorization": f"Basic {right}"}).status_code == 200


def test_predictions_match_the_engine(segmenter, settings):
    client = make_client(segmenter, settings)
    answer = predict(client, tasks_for(TARGETS))
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    references = segmenter.encode_references([(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")])
    expected = segmenter.segment(references, TARGETS)
    assert len(body["results"]) == len(TARGETS)
    for prediction, truth in zip(body["results"], expected):
        assert prediction["model_version"] == body["model_version"]
        assert 0.0 <= prediction["score"] <= 1.0
        regions = prediction["result"]
        if not truth.mask.any():
            assert regions == []
            continue
        (region,) = regions
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [LABEL]
        assert (region["original_height"], region["original_width"]) == truth.mask.shape
        decoded = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
        assert iou(decoded, truth.mask) >= 0.99
        assert region["meta"]["text"][0].startswith(f"insid3 quality: {truth.quality.verdict}")
    assert body["model_version"].startswith("insid3-smoke-")


def test_model_version_follows_the_reference_pool(segmenter, settings):
    client = make_client(segmenter, settings)
    before = client.post("/setup", json={"project": "7.1", "schema": BRUSH_CONFIG}).get_json()["model_version"]
    folder = settings.reference_dir / LABEL
    shutil.copy(TARGETS[0], folder / "extra.png")
    shutil.copy(EXAMPLES / "masks" / TARGETS[0].name, folder / "extra_mask.png")
    after = client.post("/setup", json={"project": "7.1", "schema": BRUSH_CONFIG}).get_json()["model_version"]
    assert before != after
    assert predict(client, tasks_for(TARGETS[1:2])).get_json()["results"][0]["model_version"] == after


def test_image_errors_are_clear(segmenter, settings):
    client = make_client(segmenter, settings)
    broken = [{"id": 1, "data": {"image": "/broken.png"}}]
    answer = predict(client, broken)
    assert answer.status_code == 422 and "unreadable" in answer.get_json()["error"]
    # Label Studio asks again task by task when it gets one result for several tasks
    mixed = predict(client, broken + tasks_for(TARGETS[:1], start=2)).get_json()["results"]
    assert len(mixed) == 1 and mixed[0]["result"] == []
    foreign = predict(client, [{"id": 1, "data": {"image": "http://example.com/a.png"}}])
    assert foreign.status_code == 403 and "INSID3_ALLOWED_HOSTS" in foreign.get_json()["error"]
    missing = predict(client, [{"id": 1, "data": {"other": "x"}}])
    assert missing.status_code == 422 and "no image" in missing.get_json()["error"]
    not_json = client.post("/predict", data="tasks", content_type="text/plain")
    assert not_json.status_code == 400 and "JSON" in not_json.get_json()["error"]


def test_download_and_pixel_limits(segmenter, settings):
    tasks = tasks_for(TARGETS[:1])
    small_file = make_client(segmenter, dataclasses.replace(settings, max_download_bytes=100))
    answer = predict(small_file, tasks)
    assert answer.status_code == 413 and "INSID3_MAX_DOWNLOAD_BYTES" in answer.get_json()["error"]
    few_pixels = make_client(segmenter, dataclasses.replace(settings, max_pixels=100))
    answer = predict(few_pixels, tasks)
    assert answer.status_code == 413 and "INSID3_MAX_PIXELS" in answer.get_json()["error"]


def test_allowed_hosts(segmenter, settings, image_server):
    task = [{"id": 1, "data": {"image": image_server.url.replace("127.0.0.1", "localhost") + "/examples/targets/scene_01.png"}}]
    assert predict(make_client(segmenter, settings), task).status_code == 403
    allowed = make_client(segmenter, dataclasses.replace(settings, allowed_hosts=frozenset({"localhost"})))
    assert predict(allowed, task).status_code == 200


def test_large_requests_fall_back_to_one_by_one(segmenter, settings):
    client = make_client(segmenter, dataclasses.replace(settings, max_tasks_per_request=3))
    answer = predict(client, tasks_for(TARGETS[:4])).get_json()
    assert len(answer["results"]) == 1


def test_webhook_updates_the_reference_pool(segmenter, settings, tmp_path):
    client = make_client(segmenter, dataclasses.replace(settings, reference_dir=tmp_path / "none"))
    project = {"id": 7, "label_config": BRUSH_CONFIG}
    assert predict(client, tasks_for(TARGETS[:1])).status_code == 422
    truth = load_mask(EXAMPLES / "masks" / TARGETS[0].name)
    annotation = {"id": 41, "result": [{
        "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": truth.shape[1], "original_height": truth.shape[0],
        "value": {"format": "rle", "rle": mask_to_rle(truth), "brushlabels": [LABEL]},
    }]}
    created = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": project,
                                            "task": tasks_for(TARGETS[:1])[0], "annotation": annotation})
    assert created.status_code == 200, created.get_json()
    first = created.get_json()["model_version"]
    answer = predict(client, tasks_for(TARGETS[1:2]))
    assert answer.status_code == 200 and answer.get_json()["model_version"] == first
    second = dict(annotation, id=42)
    updated = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": project,
                                            "task": tasks_for(TARGETS[:1])[0], "annotation": second})
    assert updated.get_json()["model_version"] != first
    deleted = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": project,
                                            "annotations": [{"id": 42}]})
    assert deleted.get_json()["model_version"] == first
    client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": project, "annotations": [{"id": 41}]})
    assert predict(client, tasks_for(TARGETS[:1])).status_code == 422


def test_train_request_replaces_references(segmenter, settings, tmp_path):
    client = make_client(segmenter, dataclasses.replace(settings, reference_dir=tmp_path / "none"))
    truth = load_mask(EXAMPLES / "masks" / TARGETS[0].name)
    task = dict(tasks_for(TARGETS[:1])[0], annotations=[{"id": 5, "result": [{
        "from_name": "tag", "to_name": "image", "type": "brushlabels",
        "original_width": truth.shape[1], "original_height": truth.shape[0],
        "value": {"format": "rle", "rle": mask_to_rle(truth), "brushlabels": [LABEL]},
    }]}])
    answer = client.post("/train", json={"project": "7.1", "label_config": BRUSH_CONFIG, "annotations": [task]})
    assert answer.status_code == 200, answer.get_json()
    assert predict(client, tasks_for(TARGETS[1:2])).status_code == 200


def test_unexpected_failures_are_json_not_tracebacks(segmenter, settings):
    client = make_client(segmenter, settings)
    annotation = {"id": 1, "result": [{"from_name": "tag", "type": "brushlabels", "original_width": 4,
                                        "original_height": 4, "value": {"rle": [1, 2, 3], "brushlabels": [LABEL]}}]}
    answer = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 7, "label_config": BRUSH_CONFIG},
                                           "task": tasks_for(TARGETS[:1])[0], "annotation": annotation})
    assert answer.status_code >= 400
    assert "Traceback" not in answer.get_data(as_text=True) and answer.get_json()["error"]


def test_rle_round_trip():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    assert (rle_to_mask(mask_to_rle(mask), 5, 7) == mask).all()


def test_model_version_follows_the_engine(tiny_backbone, settings):
    from insid3_core import EngineConfig, Segmenter

    versions = {
        build_backend(settings, Segmenter(tiny_backbone, EngineConfig(image_size=size, svd_components=16))).model_version(None)
        for size in (128, 256)
    }
    assert len(versions) == 2


def test_label_studio_addresses():
    from labelstudio_backend.credentials import Credentials
    from labelstudio_backend.errors import BackendError
    from labelstudio_backend.images import ImageFetcher

    fetcher = ImageFetcher(Credentials("http://ls.local:8080", ""), allowed_hosts={"images.example.org"})
    assert fetcher.url("/data/local-files/?d=scans/a.png") == "http://ls.local:8080/data/local-files/?d=scans/a.png"
    assert fetcher.url("/data/upload/3/a.png") == "http://ls.local:8080/data/upload/3/a.png"
    assert fetcher.url("https://images.example.org/a.png") == "https://images.example.org/a.png"
    for refused, status in (("s3://bucket/a.png", 422), ("http://169.254.169.254/latest", 403)):
        with pytest.raises(BackendError) as caught:
            fetcher.url(refused)
        assert caught.value.status == status
    with pytest.raises(BackendError, match="LABEL_STUDIO_URL is not set"):
        ImageFetcher(Credentials("", "")).url("/data/upload/3/a.png")
