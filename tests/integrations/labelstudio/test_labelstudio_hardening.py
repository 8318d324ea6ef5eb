"""The backend under hostile or unlucky load: malformed requests are 4xx with a message, busy
workers leave ``/health`` answering, decoded pixels are bounded across requests, background jobs
are bounded, large bodies are refused."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("flask")
pytest.importorskip("waitress")

from labelstudio_fixtures import BRUSH_CONFIG, LABEL, Listener, UPLOADS, reference_folder, small_segmenter  # noqa: E402
from labelstudio_live import BackendServer  # noqa: E402

from labelstudio_backend.app import create_app  # noqa: E402
from labelstudio_backend.budget import Lease, PixelBudget  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.errors import BackendError  # noqa: E402
from labelstudio_backend.rle import mask_to_rle  # noqa: E402
from labelstudio_backend.settings import Settings  # noqa: E402

PROJECT = {"id": 7, "label_config": BRUSH_CONFIG}
LONG_LABEL = "é" * 100  # 200 bytes, 600 URL-quoted: no folder can be named after it


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return small_segmenter(tiny_backbone)


@pytest.fixture(scope="module")
def hosts():
    listeners = {"label_studio": Listener("127.0.0.1"), "slow": Listener("127.0.0.3")}
    yield listeners
    for listener in listeners.values():
        listener.close()


@pytest.fixture
def settings(tmp_path, hosts):
    return Settings(label_studio_url=hosts["label_studio"].url, model_dir=tmp_path / "model",
                    reference_dir=reference_folder(tmp_path / "references"), allowed_hosts=frozenset({"127.0.0.3"}))


def bomb_png_url() -> str:
    """A 1x1 PNG whose header says 20000x20000 (400 megapixels: PIL's decompression-bomb refusal)."""
    stream = io.BytesIO()
    Image.new("L", (1, 1)).save(stream, format="PNG")
    data = bytearray(stream.getvalue())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


def image_data_url(kind: str, size: tuple[int, int]) -> str:
    """A bitmask region's ``imageDataURL`` holding an RGBA image of ``size`` in the format ``kind``
    (labelled PNG whatever it holds, as a client could send it)."""
    stream = io.BytesIO()
    Image.new("RGBA" if kind == "PNG" else "RGB", size).save(stream, format=kind)
    return "data:image/png;base64," + base64.b64encode(stream.getvalue()).decode()


def region_event(kind: str, value: dict, labels=(LABEL,), size=(4, 4), config: str = "") -> dict:
    """An ANNOTATION_CREATED event whose one region of ``kind`` has ``value`` and declares ``size``."""
    controls = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels", "bitmasklabels": "BitmaskLabels"}
    config = config or (f'<View><Image name="image" value="$image"/><{controls[kind]} name="tag" toName="image">'
                        + "".join(f'<Label value="{label}"/>' for label in labels) + f"</{controls[kind]}></View>")
    return {"action": "ANNOTATION_CREATED", "project": {"id": 7, "label_config": config},
            "task": {"id": 1, "data": {"image": UPLOADS + "/x.png"}},
            "annotation": {"id": 3, "result": [{"from_name": "tag", "to_name": "image", "type": kind,
                                                "original_width": size[0], "original_height": size[1],
                                                "value": {**value, kind: [label]}} for label in labels]}}


MANY_LABELS = [f"part {index}" for index in range(12)]
TRIANGLE = [[1.0, 1.0], [50.0, 1.0], [1.0, 50.0]]


def nested(levels: int) -> str:
    return '{"tasks": ' + "[" * levels + "]" * levels + "}"


def long_label_config() -> str:
    return BRUSH_CONFIG.replace('value="Other"', f'value="{LONG_LABEL}"')


# (route, body given as JSON text, expected status, words the message holds)
MALFORMED = [
    ("/setup", {"project": 7, "schema": 12}, 400, "'schema' must be a string"),
    ("/setup", {"project": 7, "schema": ["<View/>"]}, 400, "must be a string"),
    ("/predict", {"tasks": [], "label_config": {"x": 1}}, 400, "'label_config' must be a string"),
    ("/train", {"project": 7, "label_config": 3.5}, 400, "must be a string"),
    ("/predict", nested(100_000), 400, "nested"),
    ("/webhook", nested(2_000), 400, "nested"),
    ("/predict", "[1, 2", 400, "not JSON"),
    ("/predict", b"\xff\xfe{}", 400, "not JSON"),
    ("/webhook", {"action": "ANNOTATIONS_DELETED", "project": 7, "annotations": "all"}, 400, "list of objects"),
    ("/webhook", {"action": "ANNOTATIONS_DELETED", "project": 7, "annotations": {"id": 1}}, 400, "list of objects"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": PROJECT, "annotation": [1]}, 400, "'annotation' must be an object"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": PROJECT, "annotation": {"id": 1}, "task": "x"}, 400, "'task'"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 7, "label_config": 5}, "annotation": {"id": 1}},
     400, "must be a string"),
    ("/setup", {"project": "9" * 5000, "schema": BRUSH_CONFIG}, 400, "not a project id"),
    ("/predict", {"project": int("9" * 4000), "tasks": [], "label_config": BRUSH_CONFIG}, 400, "not a project id"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": "9" * 5000, "annotation": {"id": 1}}, 400, "no project id"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": PROJECT, "annotation": {"id": "9" * 5000}}, 400,
     "annotation without an id"),
    ("/webhook", {"action": "ANNOTATIONS_DELETED", "project": 7, "annotations": [{"id": "١٢"}]}, 400,
     "annotation without an id"),
    ("/setup", {"project": 7, "schema": long_label_config()}, 400, "too long"),
    ("/predict", {"project": 7, "tasks": [{"id": 1, "data": {"image": UPLOADS + "/x.png"}}], "label_config": long_label_config()},
     400, "too long"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": PROJECT, "task": {"id": 1, "data": {"image": UPLOADS + "/x.png"}},
                  "annotation": {"id": 3, "result": [{"from_name": "tag", "type": "brushlabels", "original_width": 1e400,
                                                      "original_height": 4, "value": {"rle": [0], "brushlabels": [LABEL]}}]}},
     422, "image size"),
    ("/webhook", region_event("brushlabels", {"format": "rle", "rle": [0, 0, 0, 64, 65, 153, 156, 249, 96]}), 422,
     "rle holds values that are not bytes"),
    ("/webhook", region_event("polygonlabels", {"points": [[10**400, 1], [2, 3], [4, 5]]}), 422, "polygon region"),
    ("/webhook", region_event("bitmasklabels", {"imageDataURL": bomb_png_url()}), 422, "bitmask region that cannot be decoded"),
    ("/webhook", region_event("bitmasklabels", {"imageDataURL": "https://elsewhere.example/mask.png"}), 422,
     "imageDataURL is not a base64 PNG data URL"),
    ("/webhook", region_event("bitmasklabels", {"imageDataURL": image_data_url("JPEG", (4, 4))}), 422,
     "its image is JPEG, not PNG"),
    ("/webhook", region_event("bitmasklabels", {"imageDataURL": image_data_url("PNG", (5, 4))}), 422,
     "its image is 5x4, the task image 4x4"),
    ("/webhook", region_event("brushlabels", {"format": "rle"}), 422, "a brush region without rle"),
    # 12 labels of 10000x10000 declared in 3 KB: the third label's mask would pass the pixel budget
    ("/webhook", region_event("polygonlabels", {"points": TRIANGLE}, MANY_LABELS, (10000, 10000)), 413,
     "exceed INSID3_MAX_PIXELS_IN_FLIGHT"),
    ("/predict", {"project": 7, "tasks": [{"id": 1, "data": {"image": "/\ud800.png"}}], "label_config": BRUSH_CONFIG},
     400, "lone UTF-16 surrogate"),
    ("/setup", {"project": 7, "schema": BRUSH_CONFIG.replace("Other", "\udc00")}, 400, "lone UTF-16 surrogate"),
    ("/train", {"project": 7, "label_config": BRUSH_CONFIG, "annotations": [{"id": 1, "annotations": 5}]}, 200,
     "model_version"),
    ("/webhook", {"action": "SOMETHING_NEW"}, 200, "ignored"),
    ("/webhook", {"action": "", "annotation": 138435, "annotations": [{}]}, 400, "'annotation' must be an object"),
    ("/webhook", {"action": ["x"]}, 400, "'action' must be a string"),
    ("/webhook", {"action": "SOMETHING_NEW", "project": True}, 400, "not a project id"),
]


@pytest.mark.parametrize(("route", "body", "status", "words"), MALFORMED)
def test_malformed_requests_are_answered_with_a_message(segmenter, settings, route, body, status, words):
    client = create_app(build_backend(settings, segmenter)).test_client()
    data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    answer = client.post(route, data=data, content_type="application/json")
    text = answer.get_data(as_text=True)
    assert answer.status_code == status, text
    assert words in text
    assert str(settings.model_dir) not in text and "Traceback" not in text


def test_an_unexpected_failure_shows_no_internal_detail(segmenter, settings, monkeypatch):
    backend = build_backend(settings, segmenter)
    monkeypatch.setattr(backend, "setup", lambda *_: open(settings.model_dir / "missing" / "file"))
    answer = create_app(backend).test_client().post("/setup", json={"project": 7, "schema": BRUSH_CONFIG})
    assert answer.status_code == 500 and "FileNotFoundError" in answer.get_json()["error"]
    assert str(settings.model_dir) not in answer.get_data(as_text=True)


def test_request_bodies_are_bounded(segmenter, settings):
    small = dataclasses.replace(settings, max_request_bytes=1 << 20)
    client = create_app(build_backend(small, segmenter)).test_client()
    big = json.dumps({"tasks": [], "padding": "x" * (2 << 20)})
    message = f"the request body is above INSID3_MAX_REQUEST_BYTES={1 << 20} bytes"
    answer = client.post("/predict", data=big, content_type="application/json")
    assert answer.status_code == 413 and answer.get_json() == {"error": message}
    with BackendServer(build_backend(small, segmenter), threads=2) as server:
        answer = requests.post(server.url + "/predict", data=big, headers={"Content-Type": "application/json"}, timeout=30)
        assert answer.status_code == 413 and answer.json() == {"error": message}, "waitress's refusal is JSON too"
        assert answer.headers["Content-Type"] == "application/json"
        with socket.create_connection(("127.0.0.1", server.server.effective_port), timeout=10) as raw:
            raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            received = b"".join(iter(lambda: raw.recv(4096), b""))  # waitress closes after its refusal
        status, _, rest = received.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 400") and json.loads(rest.partition(b"\r\n\r\n")[2])["error"], \
            "a malformed chunked body: a JSON 400"


def test_busy_workers_leave_health_answering(segmenter, settings, hosts):
    """Two /predict (the work served at once) wait on a server trickling its image; a third waits its
    turn, then is told to come back; a fourth beyond the line is refused at once; /health answers."""
    slow = hosts["slow"]
    slow.requests.clear()
    settings = dataclasses.replace(settings, download_seconds=4.0, max_queued_requests=1, queue_wait=1.0)
    body = {"tasks": [{"id": 1, "data": {"image": slow.url + "/drip"}}], "project": "7.1", "label_config": BRUSH_CONFIG}
    with BackendServer(build_backend(settings, segmenter), threads=2) as server:
        answers = {}

        def predict(name):
            answers[name] = requests.post(server.url + "/predict", json=body, timeout=60)

        running = [threading.Thread(target=predict, args=(name,)) for name in ("first", "second")]
        for worker in running:
            worker.start()
        while len(slow.requests) < 2:
            time.sleep(0.05)
        waiting = threading.Thread(target=predict, args=("waiting",))
        waiting.start()
        while server.server.task_dispatcher.active_count < 3:
            time.sleep(0.01)
        refused = requests.post(server.url + "/predict", json=body, timeout=10)
        health = requests.get(server.url + "/health", timeout=10)
        for worker in (*running, waiting):
            worker.join()
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert refused.status_code == 503 and refused.headers["Retry-After"] and "busy" in refused.json()["error"]
    assert answers["waiting"].status_code == 503 and "INSID3_QUEUE_WAIT" in answers["waiting"].json()["error"]
    assert [answers["first"].status_code, answers["second"].status_code] == [504, 504]
    assert len(slow.requests) == 2


def test_a_full_house_waits_its_turn_instead_of_failing(segmenter, settings):
    """Twelve predictions at once on two turns: every one is answered 200, none refused."""
    with BackendServer(build_backend(settings, segmenter), threads=2) as server:
        body = {"tasks": [{"id": 1, "data": {"image": UPLOADS + "/x.png"}}], "project": "7.1", "label_config": BRUSH_CONFIG}
        answers = []
        workers = [threading.Thread(target=lambda: answers.append(
            requests.post(server.url + "/predict", json=body, timeout=120).status_code)) for _ in range(12)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert answers == [200] * 12


def test_decoded_pixels_are_bounded_across_requests(tmp_path):
    budget = PixelBudget(limit=150, wait_seconds=0.2)
    with Lease(budget) as first:
        first.take(100, "a.png")
        with Lease(budget) as second, pytest.raises(BackendError) as refused:
            second.take(100, "b.png")
        assert refused.value.status == 503 and refused.value.retry_after and "INSID3_MAX_PIXELS_IN_FLIGHT" in refused.value.message
        assert budget.used == 100
        waiting = threading.Thread(target=lambda: Lease(budget).__enter__().take(100, "c.png"))
        waiting.start()
        time.sleep(0.05)
    waiting.join()  # took its pixels once the first lease ended
    assert budget.used == 100


def test_requests_share_the_pixel_budget(segmenter, settings):
    """While other requests hold the whole budget, a prediction waits for it, then is told to retry."""
    settings = dataclasses.replace(settings, max_pixels=100, max_pixels_in_flight=100, decode_wait=0.2)
    backend = build_backend(settings, segmenter)
    with backend.fetcher.lease() as held:
        held.take(100, "another request's image")
        answer = create_app(backend).test_client().post(  # the served /x.png is 8x6 pixels
            "/predict", json={"tasks": [{"id": 1, "data": {"image": UPLOADS + "/x.png"}}], "project": "7.1",
                              "label_config": BRUSH_CONFIG})
    assert answer.status_code == 503 and "INSID3_MAX_PIXELS_IN_FLIGHT" in answer.get_json()["error"]
    assert answer.headers["Retry-After"]
    assert backend.fetcher.budget.used == 0


def test_a_burst_of_webhooks_starts_no_thread_per_event(segmenter, settings):
    before = threading.active_count()
    client = create_app(build_backend(settings, segmenter)).test_client()
    for _ in range(200):
        answer = client.post("/webhook", json={"action": "START_TRAINING", "project": PROJECT})
        assert answer.status_code == 200
    assert threading.active_count() - before <= 2


def test_settings_refuse_impossible_bounds(monkeypatch):
    for variable, value, words in (("INSID3_MAX_PIXELS_IN_FLIGHT", "10", "below INSID3_MAX_PIXELS"),
                                   ("INSID3_DOWNLOAD_SECONDS", "nan", "INSID3_DOWNLOAD_SECONDS"),
                                   ("INSID3_MAX_REQUEST_BYTES", "0", "INSID3_MAX_REQUEST_BYTES"),
                                   ("INSID3_ALLOWED_HOSTS", "ok.org,0x7f.1", "INSID3_ALLOWED_HOSTS"),
                                   ("INSID3_ALLOWED_NETWORKS", "fd00::/8,10.0.0.1/8", "'10.0.0.1/8' is not a network")):
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValueError, match=words):
            build_backend(Settings.from_environment(), None)
        monkeypatch.delenv(variable)


def test_one_bad_annotation_in_label_studio_leaves_the_others(segmenter, settings, monkeypatch, caplog):
    """Whatever an annotation from Label Studio makes fail, it is logged and skipped; the project's
    other annotations still become references."""
    backend = build_backend(settings, segmenter)
    added = backend.add_annotation

    def failing_on_the_first(project, target, task, annotation, **options):
        if annotation["id"] == 1:
            raise OverflowError("a value no decoder expected")
        return added(project, target, task, annotation, **options)

    monkeypatch.setattr(backend, "add_annotation", failing_on_the_first)
    region = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": 8, "original_height": 6,
              "value": {"format": "rle", "rle": mask_to_rle(np.ones((6, 8), dtype=bool)), "brushlabels": [LABEL]}}
    tasks = [{"id": 1, "data": {"image": UPLOADS + "/x.png"}, "annotations": [{"id": 1, "result": [region]}, {"id": 2, "result": [region]}]}]
    with caplog.at_level("ERROR", logger="labelstudio_backend.service"):
        answer = create_app(backend).test_client().post(
            "/train", json={"project": 7, "label_config": BRUSH_CONFIG, "annotations": tasks})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert backend.store(7).annotation_ids() == {2}
    assert "annotation skipped" in caplog.text and "OverflowError" in caplog.text


def test_a_project_busy_with_its_references_does_not_hold_up_another(segmenter, settings):
    """One project's lock (a slow download of its annotation's image, say) leaves other projects' webhooks alone."""
    backend = build_backend(settings, segmenter)
    client = create_app(backend).test_client()
    holding, release = threading.Event(), threading.Event()

    def hold_project_7():
        with backend.project_lock(7):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold_project_7)
    holder.start()
    holding.wait(10)
    answers = []
    other = threading.Thread(target=lambda: answers.append(client.post(
        "/webhook", json={"action": "ANNOTATION_DELETED", "project": 8, "annotation": {"id": 4}})))
    other.start()
    other.join(20)
    finished = not other.is_alive()
    release.set()
    holder.join()
    other.join()
    assert finished, "project 8's webhook waited for project 7's lock"
    assert answers[0].status_code == 200


def test_interactive_regions_are_bounded_and_checked_before_decoding():
    from labelstudio_backend.interactive import MAX_DRAWN_REGIONS, drawn_masks, keypoint_disk
    from labelstudio_backend.labelconfig import region_target

    with pytest.raises(BackendError) as huge:
        keypoint_disk({"x": 10**400, "y": 5}, 10, 10)
    assert huge.value.status == 422 and "x/y percentages" in huge.value.message
    target = region_target(BRUSH_CONFIG)
    keypoint = {"type": "keypointlabels", "value": {"x": 50, "y": 50, "keypointlabels": [LABEL]}}
    with pytest.raises(BackendError) as many:
        drawn_masks([keypoint] * (MAX_DRAWN_REGIONS + 1), target, (600, 800), 10**8)
    assert many.value.status == 413
    masks = drawn_masks([keypoint] * 3, target, (600, 800), 10**8, Lease(PixelBudget(10**6, 0.1)))
    assert list(masks) == [LABEL] and masks[LABEL].sum() > 0 and not masks[LABEL][0, 0]
    larger = {"from_name": "tag", "type": "brushlabels", "original_width": 8000, "original_height": 6000,
              "value": {"format": "rle", "rle": [0], "brushlabels": [LABEL]}}
    with pytest.raises(BackendError) as other_size:  # refused before an 8000x6000 mask is made
        drawn_masks([larger], target, (600, 800), 10**8)
    assert other_size.value.status == 422 and "8000x6000 image, the task image is 800x600" in other_size.value.message
