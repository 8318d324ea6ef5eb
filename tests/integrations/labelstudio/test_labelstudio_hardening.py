"""The backend under hostile or unlucky load: malformed requests are 4xx with a message, busy
workers leave ``/health`` answering, decoded pixels are bounded across requests, background jobs
are bounded, large bodies are refused."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
import requests

pytest.importorskip("flask")
pytest.importorskip("waitress")

from labelstudio_fixtures import BRUSH_CONFIG, LABEL, Listener, reference_folder, small_segmenter  # noqa: E402
from labelstudio_live import BackendServer  # noqa: E402

from labelstudio_backend.app import create_app  # noqa: E402
from labelstudio_backend.budget import Lease, PixelBudget  # noqa: E402
from labelstudio_backend.build import build_backend  # noqa: E402
from labelstudio_backend.errors import BackendError  # noqa: E402
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
    ("/predict", {"project": 7, "tasks": [{"id": 1, "data": {"image": "/x.png"}}], "label_config": long_label_config()},
     400, "too long"),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": PROJECT, "task": {"id": 1, "data": {"image": "/x.png"}},
                  "annotation": {"id": 3, "result": [{"from_name": "tag", "type": "brushlabels", "original_width": 1e400,
                                                      "original_height": 4, "value": {"rle": [0], "brushlabels": [LABEL]}}]}},
     422, "image size"),
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
    answer = client.post("/predict", data=big, content_type="application/json")
    assert answer.status_code == 413 and answer.get_json()["error"]
    with BackendServer(build_backend(small, segmenter), threads=2) as server:
        answer = requests.post(server.url + "/predict", data=big, headers={"Content-Type": "application/json"}, timeout=30)
        assert answer.status_code == 413


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
        body = {"tasks": [{"id": 1, "data": {"image": "/x.png"}}], "project": "7.1", "label_config": BRUSH_CONFIG}
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
            "/predict", json={"tasks": [{"id": 1, "data": {"image": "/x.png"}}], "project": "7.1",
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
                                   ("INSID3_ALLOWED_HOSTS", "ok.org,0x7f.1", "INSID3_ALLOWED_HOSTS")):
        monkeypatch.setenv(variable, value)
        with pytest.raises(ValueError, match=words):
            build_backend(Settings.from_environment(), None)
        monkeypatch.delenv(variable)
