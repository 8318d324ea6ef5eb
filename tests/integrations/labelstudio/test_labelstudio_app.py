"""The ML-backend web app through Flask's test client: configs, references, auth, predictions."""

from __future__ import annotations

import base64
import dataclasses
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("flask")
pytest.importorskip("label_studio_sdk")

from labelstudio_fixtures import (  # noqa: E402
    BRUSH_CONFIG, CHOICES_CONFIG, EXAMPLES, LABEL, TARGETS, Listener, StaticServer, brush_region, reference_folder,
    UPLOADS, scene_reference_folder, small_segmenter, two_disk_scenes, verdict_images, verdict_segmenter,
)

import insid3_core.pipeline  # noqa: E402
from insid3_core.instances import split_instances  # noqa: E402
from insid3_core.io import load_mask  # noqa: E402
from insid3_core.quality import VERDICTS  # noqa: E402
from insid3_core.metrics import mask_iou  # noqa: E402
from labelstudio_backend.app import create_app  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.rle import mask_to_rle, rle_to_mask  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402

PROJECT = {"id": 7, "label_config": BRUSH_CONFIG}


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return small_segmenter(tiny_backbone)


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    """Examples, the verdict images (:func:`verdict_images`) and an unreadable 'image', served like Label Studio uploads."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(EXAMPLES, root / "examples")
    (root / "broken.png").write_bytes(b"not an image at all")
    verdict_images(root / "verdicts")
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
    return [{"id": start + i, "data": {"image": f"{UPLOADS}/examples/targets/{p.name}"}} for i, p in enumerate(paths)]


def predict(client, tasks, config=BRUSH_CONFIG, **kwargs):
    return client.post("/predict", json={"tasks": tasks, "project": "7.1700000000", "label_config": config}, **kwargs)


def test_health_and_setup(segmenter, settings):
    client = make_client(segmenter, settings)
    assert client.get("/health").get_json() == {"status": "UP", "model_class": "INSID3", "preparing": []}
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
    references = segmenter.encode({"object": [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]})
    expected = segmenter.segment(references, TARGETS)
    assert len(body["results"]) == len(TARGETS)
    for prediction, truth in zip(body["results"], expected):
        assert prediction["model_version"] == body["model_version"]
        assert 0.0 <= prediction["score"] <= 1.0
        (region,) = prediction["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [LABEL]
        assert (region["original_height"], region["original_width"]) == truth.mask.shape
        decoded = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
        assert mask_iou(decoded, truth.mask) >= 0.99
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
    broken = [{"id": 1, "data": {"image": UPLOADS + "/broken.png"}}]
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
    named = dataclasses.replace(settings, allowed_hosts=frozenset({"localhost"}))
    loopback = predict(make_client(segmenter, named), task)
    assert loopback.status_code == 403 and "INSID3_ALLOWED_NETWORKS" in loopback.get_json()["error"]
    allowed = make_client(segmenter, dataclasses.replace(named, allowed_networks=frozenset({"127.0.0.1/32"})))
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
    for missing in ({}, {"annotations": None}):  # not "no annotations": without the API it cannot read them
        answer = client.post("/train", json={"project": "7.1", "label_config": BRUSH_CONFIG, **missing})
        assert answer.status_code == 400 and "no 'annotations'" in answer.get_json()["error"]
    assert predict(client, tasks_for(TARGETS[1:2])).status_code == 200, "a /train without annotations emptied the cache"


def test_a_projects_annotations_download_at_once(segmenter, tmp_path):
    """A project's annotations (its first sync, or ``/train``) were downloaded one after another:
    here each image is sent once all three are asked for, so the first one alone waited until the
    server gave up (503) and every annotation was skipped. A failing one is still skipped alone."""
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:5, 2:6] = True
    listener = Listener("127.0.0.1")
    try:
        backend = build_backend(Settings(label_studio_url=listener.url, model_dir=tmp_path / "model",
                                         reference_dir=tmp_path / "none"), segmenter)
        images = [f"{UPLOADS}/together?3&{index}" for index in range(3)] + [f"{UPLOADS}/status?404"]
        tasks = [{"id": index + 1, "data": {"image": image}, "annotations": [{"id": 10 + index, "result": [brush_region(mask)]}]}
                 for index, image in enumerate(images)]
        answer = create_app(backend).test_client().post(
            "/train", json={"project": "7.1", "label_config": BRUSH_CONFIG, "annotations": tasks})
    finally:
        listener.close()
    assert answer.status_code == 200, answer.get_json()
    assert backend.store(7).annotation_ids() == {10, 11, 12}
    assert sorted(path for path, _ in listener.requests) == sorted(images)


def test_annotations_downloading_at_once_do_not_starve_each_other_of_pixels(segmenter, tmp_path):
    """INSID3_MAX_PIXELS_IN_FLIGHT fits one annotation (its mask, then its image). Two downloading
    at once each hold their mask's pixels while their image arrives, so neither could take the
    image's: each waited INSID3_DECODE_WAIT for the other and both were skipped. A sync's
    annotation that finds the pixels taken is now tried again alone."""
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:5, 2:6] = True
    listener = Listener("127.0.0.1")
    try:
        backend = build_backend(Settings(label_studio_url=listener.url, model_dir=tmp_path / "model",
                                         reference_dir=tmp_path / "none", max_pixels=48, max_pixels_in_flight=96,
                                         decode_wait=0.5), segmenter)
        tasks = [{"id": index + 1, "data": {"image": f"{UPLOADS}/late?0.5&{index}"},
                  "annotations": [{"id": 10 + index, "result": [brush_region(mask)]}]} for index in range(2)]
        answer = create_app(backend).test_client().post(
            "/train", json={"project": "7.1", "label_config": BRUSH_CONFIG, "annotations": tasks})
    finally:
        listener.close()
    assert answer.status_code == 200, answer.get_json()
    assert backend.store(7).annotation_ids() == {10, 11}
    assert backend.fetcher.budget.used == 0


def test_running_out_of_device_memory_is_a_503_naming_the_settings(segmenter, settings, monkeypatch):
    """A prediction that ran out of memory was a 500 saying only ``OutOfMemoryError``; the answer now
    names the settings that lower the memory it needs. (The failure is raised here: a real one
    needs a GPU, or a memory cap on the process, which the command line's test uses.)"""
    import torch

    backend = build_backend(settings, segmenter)

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                     "of 79.19 GiB. If reserved but unallocated memory is large try setting ...")

    monkeypatch.setattr(backend.predictor, "segment", out_of_memory)
    answer = predict(create_app(backend).test_client(), tasks_for(TARGETS[:1]))
    assert answer.status_code == 503
    assert answer.get_json()["error"] == (
        "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); lower batch_size (--batch-size, "
        "INSID3_BATCH_SIZE) or image_size (--image-size, INSID3_IMAGE_SIZE), or run on a device with more memory")


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
    """Input size, mask refinement and verdict thresholds each give another model version."""
    from insid3_core import EngineConfig, Segmenter
    from insid3_core.quality import QualityThresholds

    variants = [(EngineConfig(image_size=128, svd_components=16), QualityThresholds()),
                (EngineConfig(image_size=256, svd_components=16), QualityThresholds()),
                (EngineConfig(image_size=128, svd_components=16, refinement="guided"), QualityThresholds()),
                (EngineConfig(image_size=128, svd_components=16), QualityThresholds(max_components=2))]
    versions = {build_backend(settings, Segmenter(tiny_backbone, config, quality)).model_version(None)
                for config, quality in variants}
    assert len(versions) == len(variants)


def test_label_studio_addresses():
    from labelstudio_backend.credentials import Credentials
    from labelstudio_backend.errors import BackendError
    from labelstudio_backend.images import ImageFetcher

    fetcher = ImageFetcher(Credentials("http://ls.local:8080", ""), allowed_hosts={"images.example.org"})
    assert str(fetcher.url("/data/local-files/?d=scans/a.png")) == "http://ls.local:8080/data/local-files/?d=scans/a.png"
    assert str(fetcher.url("/data/upload/3/a.png")) == "http://ls.local:8080/data/upload/3/a.png"
    assert str(fetcher.url("https://images.example.org/a.png")) == "https://images.example.org/a.png"
    assert str(fetcher.url("https://images.example.org:8443/a.png")) == "https://images.example.org:8443/a.png"
    refusals = (("s3://bucket/a.png", 422), ("http://169.254.169.254/latest", 403), ("http://[::1/a.png", 422),
                ("http://ls.local:22/a.png", 403), ("https://ls.local:8080/a.png", 403))
    for refused, status in refusals:
        with pytest.raises(BackendError) as caught:
            fetcher.url(refused)
        assert caught.value.status == status, refused
    # credentials go to Label Studio's origin only: same scheme, host and port
    assert fetcher.is_own(fetcher.url("http://LS.local:8080/data/upload/1.png"))
    assert not fetcher.is_own(fetcher.url("https://images.example.org/a.png"))
    own = ImageFetcher(Credentials("https://ls.local", ""))
    assert own.is_own(own.url("https://ls.local:443/data/upload/a.png"))
    with pytest.raises(BackendError, match="LABEL_STUDIO_URL is not set"):
        ImageFetcher(Credentials("", "")).url("/data/upload/3/a.png")


def test_label_studio_gets_its_credentials_for_its_file_routes_only():
    """A task's author cannot make the backend GET Label Studio's API with its token."""
    from labelstudio_backend.credentials import Credentials
    from labelstudio_backend.errors import BackendError
    from labelstudio_backend.images import ImageFetcher

    fetcher = ImageFetcher(Credentials("http://ls.local:8080", ""))
    for fine in ("/data/upload/3/a.png", "/data/local-files/?d=scans/a.png", "/data/local-files?d=a.png",
                 "/storage-data/uploaded/?filepath=upload/1/a.png", "/tasks/12/presign/?fileuri=czM6Ly9iL2EucG5n",
                 "http://LS.local:8080/data/upload/1.png"):
        assert fetcher.is_own(fetcher.url(fine)), fine
    for refused in ("/api/projects/", "/../../api/projects/", "/%2e%2e/api/current-user/whoami",
                    "/data/upload/../../api/projects", "/data/upload/%252e%252e/api", "/data/local-files/?d=../../etc/passwd",
                    "http://ls.local:8080/api/projects", "/x.png", "/tasks/12/", "/data/uploads/a.png"):
        with pytest.raises(BackendError) as caught:
            fetcher.url(refused)
        assert caught.value.status == 422 and "file routes" in caught.value.message, refused
    under = ImageFetcher(Credentials("http://ls.local:8080/label-studio/", ""))  # Label Studio under a sub-path
    assert str(under.url("/data/upload/1.png")) == "http://ls.local:8080/label-studio/data/upload/1.png"
    with pytest.raises(BackendError, match="file routes"):
        under.url("http://ls.local:8080/data/upload/1.png")


def webhook_annotation(client, annotation, action="ANNOTATION_CREATED", task=None):
    return client.post("/webhook", json={"action": action, "project": PROJECT, "annotation": annotation,
                                         "task": task or tasks_for(TARGETS[:1])[0]})


def test_every_verdict_reaches_the_reviewer(tiny_backbone, settings, tmp_path):
    """Each label gives a region, an empty mask too, its verdict in the region meta text the Data Manager searches."""
    segmenter = verdict_segmenter(tiny_backbone)
    images = verdict_images(tmp_path / "verdicts")  # the same files as the served /verdicts/
    tasks = [{"id": i, "data": {"image": f"{UPLOADS}/verdicts/{path.name}"}} for i, path in enumerate(images)]
    answer = predict(make_client(segmenter, dataclasses.replace(settings, max_tasks_per_request=16)), tasks)
    assert answer.status_code == 200, answer.get_json()
    references = segmenter.encode({"object": [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]})
    seen = set()
    for path, result, truth in zip(images, answer.get_json()["results"], segmenter.segment(references, images)):
        (region,) = result["result"]
        verdict = truth.quality.verdict
        assert region["meta"]["text"][0].startswith(f"insid3 quality: {verdict} ("), path.name
        decoded = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
        assert mask_iou(decoded, truth.mask) >= 0.99, path.name
        if verdict == "empty":
            assert not decoded.any() and region["score"] == 0.0 and result["score"] == 0.0
        seen.add(verdict)
    assert seen == set(VERDICTS)


def test_slow_references_never_block_a_request(segmenter, settings):
    """/setup answers at once while the references are prepared in the background; /predict answers 503 meanwhile."""
    backend = build_backend(dataclasses.replace(settings, warmup_wait=0.5), segmenter)
    release, encode = threading.Event(), backend.predictor.references
    backend.predictor.references = lambda pairs, key: release.wait(60) and encode(pairs, key)
    client = create_app(backend).test_client()
    assert client.post("/setup", json={"project": "7.1", "schema": BRUSH_CONFIG}).status_code == 200
    # answered while the encoding still waits for ``release``: /setup never waits for the references
    assert client.get("/health").get_json()["preparing"] == [7] and not release.is_set()
    waiting = predict(client, tasks_for(TARGETS[:1]))
    assert waiting.status_code == 503 and waiting.headers["Retry-After"] == "30"
    assert "still preparing the references of project 7" in waiting.get_json()["error"]
    release.set()
    deadline = time.monotonic() + 60
    while client.get("/health").get_json()["preparing"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert predict(client, tasks_for(TARGETS[:1])).status_code == 200


def test_empty_brush_annotations_are_no_references(segmenter, settings, tmp_path):
    """An accepted empty prediction region (no pixel) is not a reference: it would make every prediction fail."""
    client = make_client(segmenter, dataclasses.replace(settings, reference_dir=tmp_path / "none"))
    truth = load_mask(EXAMPLES / "masks" / TARGETS[0].name)
    empty = {"id": 3, "result": [brush_region(np.zeros_like(truth))]}
    assert webhook_annotation(client, empty).status_code == 200
    answer = predict(client, tasks_for(TARGETS[1:2]))
    assert answer.status_code == 422 and "no references yet" in answer.get_json()["error"]
    both = {"id": 3, "result": [brush_region(np.zeros_like(truth)), brush_region(truth)]}
    assert webhook_annotation(client, both, "ANNOTATION_UPDATED").status_code == 200
    assert predict(client, tasks_for(TARGETS[1:2])).status_code == 200


@pytest.mark.parametrize(("region", "status", "message"), [
    ({"original_width": 100_000, "original_height": 100_000, "value": {"rle": [0, 0, 0, 4]}}, 413, "INSID3_MAX_PIXELS"),
    ({"original_width": 4, "original_height": 4, "value": {"rle": [0, 0, 0, 4, 1]}}, 422, "cannot be decoded"),
    ({"original_width": 4, "original_height": 4, "value": {"rle": "x"}}, 422, "cannot be decoded"),
    ({"original_height": 4, "value": {"rle": [0]}}, 422, "image size"),
])
def test_bad_brush_regions_are_clear_errors(segmenter, settings, region, status, message):
    client = make_client(segmenter, dataclasses.replace(settings, max_pixels=10**6))
    region = {"from_name": "tag", "to_name": "image", "type": "brushlabels",
              **region, "value": {"brushlabels": [LABEL], **region["value"]}}
    answer = webhook_annotation(client, {"id": 9, "result": [region]})
    assert answer.status_code == status and message in answer.get_json()["error"]


@pytest.mark.parametrize(("payload", "message"), [
    ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}, "no project id"),
    ({"action": "ANNOTATION_CREATED", "project": {"id": "x"}, "annotation": {"id": 1}}, "no project id"),
    ({"action": "ANNOTATION_CREATED", "project": PROJECT, "annotation": {"result": []}}, "annotation without an id"),
    ({"action": "ANNOTATIONS_DELETED", "project": 7, "annotations": [{"id": None}]}, "annotation without an id"),
    ({"action": "ANNOTATION_CREATED", "project": 7, "annotation": {"id": 1}}, "no label_config"),
])
def test_bad_webhook_payloads_are_400s(segmenter, settings, payload, message):
    answer = make_client(segmenter, settings).post("/webhook", json=payload)
    assert answer.status_code == 400 and message in answer.get_json()["error"]


def test_bad_requests_are_400s(segmenter, settings):
    client = make_client(segmenter, settings)
    not_objects = client.post("/predict", json={"tasks": [1, 2], "project": "7.1", "label_config": BRUSH_CONFIG})
    assert not_objects.status_code == 400 and "list of objects" in not_objects.get_json()["error"]
    bad_project = client.post("/setup", json={"project": "seven", "schema": BRUSH_CONFIG})
    assert bad_project.status_code == 400 and "not a project id" in bad_project.get_json()["error"]
    assert client.get("/nowhere").get_json()["error"] and client.get("/nowhere").status_code == 404
    assert client.get("/predict").status_code == 405


def test_unchanged_annotations_are_not_downloaded_again(segmenter, settings, tmp_path):
    backend = build_backend(dataclasses.replace(settings, reference_dir=tmp_path / "none"), segmenter)
    fetched, fetch = [], backend.fetcher.fetch
    backend.fetcher.fetch = lambda address, lease=None: fetched.append(address) or fetch(address, lease)
    client = create_app(backend).test_client()
    truth = load_mask(EXAMPLES / "masks" / TARGETS[0].name)
    task = dict(tasks_for(TARGETS[:1])[0], annotations=[{"id": 5, "result": [brush_region(truth)]}])
    train = {"project": "7.1", "label_config": BRUSH_CONFIG, "annotations": [task]}
    first = client.post("/train", json=train).get_json()["model_version"]
    assert client.post("/train", json=train).get_json()["model_version"] == first
    assert len(fetched) == 1
    task["annotations"][0]["result"] = [brush_region(truth[:, ::-1].copy())]
    assert client.post("/train", json=train).get_json()["model_version"] != first
    assert len(fetched) == 2


def test_training_keeps_the_usable_annotations_and_drops_cancelled_stale_and_mismatched_ones(
        segmenter, settings, tmp_path, caplog):
    """The pool after each ``/train`` holds exactly the project's usable annotations: a cancelled
    one is left out, one whose region is not its image's size is skipped with a warning (the
    others still count), and an annotation gone from the project leaves the pool."""
    backend = build_backend(dataclasses.replace(settings, reference_dir=tmp_path / "none"), segmenter)
    client = create_app(backend).test_client()
    truth = load_mask(EXAMPLES / "masks" / TARGETS[0].name)
    task = tasks_for(TARGETS[:1])[0]

    def train(*annotations):
        body = {"project": "7.1", "label_config": BRUSH_CONFIG,
                "annotations": [dict(task, annotations=list(annotations))]}
        assert client.post("/train", json=body).status_code == 200
        return backend.store(7).annotation_ids()

    good = {"id": 5, "result": [brush_region(truth)]}
    cancelled = {"id": 6, "result": [brush_region(truth)], "was_cancelled": True}
    mismatched = {"id": 7, "result": [brush_region(truth[:-8])]}
    assert train(good, cancelled, mismatched) == {5}
    assert "annotation 7: region size" in caplog.text and "differs from its image" in caplog.text
    assert train({"id": 8, "result": [brush_region(truth)]}) == {8}, "annotation 5 is gone from the project"
    assert train({"id": 8, "result": [brush_region(truth)], "was_cancelled": True}) == set()


def test_basic_auth_needs_both_variables(monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", "lead")
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        Settings.from_environment()
    monkeypatch.setenv("BASIC_AUTH_PASS", "s3cret")
    assert Settings.from_environment().basic_auth == ("lead", "s3cret")


@pytest.fixture(scope="module")
def scene_server(tmp_path_factory):
    """Three scenes of two separated disks (``two_disks_<i>.png``) served like Label Studio uploads; ``(server, paths)``."""
    root = tmp_path_factory.mktemp("scenes")
    paths = two_disk_scenes(root, count=3)
    with StaticServer(root) as server:
        yield server, paths


def scene_client(segmenter, tmp_path, server, **changes):
    """A client whose references are :func:`scene_reference_folder`'s two labels; ``(client, reference folder)``."""
    settings = Settings(label_studio_url=server.url, model_dir=tmp_path / "model",
                        reference_dir=scene_reference_folder(tmp_path / "references"), **changes)
    return make_client(segmenter, settings), settings.reference_dir


def engine_classes(segmenter, folder, images):
    """The engine's ``Prediction`` of ``images`` for the labels of a reference ``folder``."""
    classes = segmenter.encode({label: [(folder / label / "scene.png", folder / label / "scene_mask.png")]
                                for label in (LABEL, "Other")})
    return segmenter.segment(classes, images)


def regions_of(prediction, label):
    return [region for region in prediction["result"] if region["value"]["brushlabels"] == [label]]


def decoded(region):
    return rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])


def test_instances_give_one_region_each(segmenter, scene_server, tmp_path):
    """INSID3_INSTANCES: one region per instance of a label, each with its own mask, score and the label's verdict."""
    server, paths = scene_server
    client, folder = scene_client(segmenter, tmp_path, server, instances="necks")
    answer = predict(client, [{"id": 1, "data": {"image": f"{UPLOADS}/{paths[0].name}"}}])
    assert answer.status_code == 200, answer.get_json()
    (prediction,) = answer.get_json()["results"]
    truth = engine_classes(segmenter, folder, paths[:1])[0].classes
    instances = split_instances(truth[LABEL], "necks")
    disks = regions_of(prediction, LABEL)
    assert len(instances) == len(disks) == 2
    for region, instance in zip(disks, instances):
        np.testing.assert_array_equal(decoded(region), instance.mask)
        assert region["score"] == round(instance.score, 4) > 0
        assert region["meta"]["text"][0].startswith(f"insid3 quality: {truth[LABEL].quality.verdict} (")
    others = regions_of(prediction, "Other")
    assert len(others) == max(1, len(split_instances(truth["Other"], "necks")))
    assert others[0]["meta"]["text"][0].startswith(f"insid3 quality: {truth['Other'].quality.verdict} (")
    # the task's score is the labels' mean, as with whole regions
    whole_client, _ = scene_client(segmenter, tmp_path / "whole", server)
    whole = predict(whole_client, [{"id": 1, "data": {"image": f"{UPLOADS}/{paths[0].name}"}}]).get_json()["results"][0]
    assert len(regions_of(whole, LABEL)) == 1
    assert whole["score"] == prediction["score"] > 0
    assert whole["model_version"] != prediction["model_version"]


def test_all_labels_share_one_clustering_per_batch(segmenter, scene_server, tmp_path, monkeypatch):
    """Every label of a batch comes from one backbone pass and one clustering; the labels' masks are disjoint."""
    server, paths = scene_server
    calls, cluster = [], insid3_core.pipeline.cluster_patches
    monkeypatch.setattr(insid3_core.pipeline, "cluster_patches",
                        lambda features, *args: calls.append(len(features)) or cluster(features, *args))
    client, folder = scene_client(segmenter, tmp_path, server, batch_size=2)
    answer = predict(client, [{"id": i, "data": {"image": f"{UPLOADS}/{path.name}"}} for i, path in enumerate(paths)])
    assert answer.status_code == 200, answer.get_json()
    assert calls == [2, 1]  # 3 tasks in batches of 2, two labels
    for prediction, truth in zip(answer.get_json()["results"], engine_classes(segmenter, folder, paths)):
        masks = {label: decoded(region) for label in (LABEL, "Other") for region in regions_of(prediction, label)}
        assert set(masks) == {LABEL, "Other"} and len(prediction["result"]) == 2
        assert not (masks[LABEL] & masks["Other"]).any()
        for label, mask in masks.items():
            np.testing.assert_array_equal(mask, truth.classes[label].mask)


def test_instance_settings(tiny_backbone, settings, monkeypatch):
    """INSID3_INSTANCES / INSID3_MIN_INSTANCE_PATCHES are read, checked, and change the model version when on."""
    monkeypatch.setenv("INSID3_INSTANCES", "Components")
    monkeypatch.setenv("INSID3_MIN_INSTANCE_PATCHES", "3")
    assert (Settings.from_environment().instances, Settings.from_environment().min_instance_patches) == ("components", 3)
    monkeypatch.setenv("INSID3_INSTANCES", "yes")
    with pytest.raises(ValueError, match="INSID3_INSTANCES must be one of off, necks, components, clusters"):
        Settings.from_environment()
    with pytest.raises(ValueError, match="INSID3_MIN_INSTANCE_PATCHES"):
        Settings(min_instance_patches=0)
    segmenter = small_segmenter(tiny_backbone)
    variants = [{}, {"instances": "necks"}, {"instances": "components"}, {"instances": "necks", "min_instance_patches": 3}]
    versions = [build_backend(dataclasses.replace(settings, **variant), segmenter).model_version(None) for variant in variants]
    assert len(set(versions)) == len(variants)
    off = dataclasses.replace(settings, instances="off", min_instance_patches=5)
    assert build_backend(off, segmenter).model_version(None) == versions[0]


def test_negative_label_regions_are_negatives_and_never_predicted(tiny_backbone, tmp_path):
    """INSID3_NEGATIVE_LABEL: brushed regions of the reserved label remove the look-alike they show."""
    from scenes import scene

    from insid3_core import EngineConfig, Segmenter
    from insid3_core.io import write_mask_png

    segmenter = Segmenter(tiny_backbone, EngineConfig(image_size=256, svd_components=16))
    references = tmp_path / "references"
    for label, objects, key, seed in ((LABEL, {"disks": [(100, 120, 60)], "squares": [(200, 40, 90)]}, "disks", 1),
                                      ("Other", {"lookalikes": [(160, 128, 70)]}, "lookalikes", 2)):
        image, masks = scene(seed=seed, **objects)
        (references / label).mkdir(parents=True)
        image.save(references / label / "scene.png")
        write_mask_png(references / label / "scene_mask.png", masks[key])
    served = tmp_path / "served"
    served.mkdir()
    target, truth = scene(disks=[(80, 90, 45)], lookalikes=[(230, 170, 50)], squares=[(200, 20, 40)], seed=3)
    target.save(served / "target.png")
    disk_only = tmp_path / "disk_only"
    shutil.copytree(references / LABEL, disk_only / LABEL)
    task = [{"id": 1, "data": {"image": UPLOADS + "/target.png"}}]
    with StaticServer(served) as server:
        covered = {}
        for name, folder, negative in (("positive only", disk_only, ""), ("negative label", references, "Other")):
            settings = Settings(label_studio_url=server.url, model_dir=tmp_path / name, reference_dir=folder,
                                negative_label=negative)
            answer = predict(make_client(segmenter, settings), task)
            assert answer.status_code == 200, answer.get_json()
            prediction = answer.get_json()["results"][0]
            assert regions_of(prediction, "Other") == []
            (disk,) = regions_of(prediction, LABEL)
            covered[name] = (decoded(disk) & truth["lookalikes"]).sum() / truth["lookalikes"].sum()
    print(f"\nlook-alike covered by Disk: {covered}")
    assert covered["positive only"] > 0.5
    assert covered["negative label"] < 0.1


def test_only_negative_regions_is_a_clear_error(segmenter, tmp_path, image_server):
    references = reference_folder(tmp_path / "references")
    settings = Settings(label_studio_url=image_server.url, model_dir=tmp_path / "model", reference_dir=references,
                        negative_label=LABEL)
    answer = predict(make_client(segmenter, settings), tasks_for(TARGETS[:1]))
    assert answer.status_code == 422
    assert "only 'Disk' (negative) regions" in answer.get_json()["error"]
