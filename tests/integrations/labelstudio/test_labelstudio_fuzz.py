"""Fuzzing (hypothesis, bounded for CI) of the request handlers, seeded with the corpus of the
cases that once broke them: any JSON (or not) on any route gives a status below 500 and a JSON
``{"error": ...}`` for every refusal."""

from __future__ import annotations

import json

import pytest
from fuzzing import FUZZ, json_values
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("flask")



@pytest.fixture(scope="module")
def client(tiny_backbone, tmp_path_factory):
    from labelstudio_fixtures import Listener, reference_folder, small_segmenter

    from labelstudio_backend.app import create_app
    from labelstudio_backend.build import build_backend
    from labelstudio_backend.settings import Settings

    root = tmp_path_factory.mktemp("fuzz")
    label_studio = Listener("127.0.0.1")
    settings = Settings(label_studio_url=label_studio.url, model_dir=root / "model", decode_wait=1.0,
                        reference_dir=reference_folder(root / "references"), download_seconds=5.0)
    yield create_app(build_backend(settings, small_segmenter(tiny_backbone))).test_client()
    label_studio.close()


def corpus():
    """Bodies that once gave 500s or leaks: the hardening table and the SSRF table as task images."""
    from test_labelstudio_hardening import MALFORMED
    from test_labelstudio_ssrf import DIFFERENTIAL_URLS

    from labelstudio_fixtures import BRUSH_CONFIG

    cases = [(route, body) for route, body, *_ in MALFORMED]
    for template in DIFFERENTIAL_URLS:
        image = template.format(L="127.0.0.1:9", A="127.0.0.2:9", Ap="9")
        cases.append(("/predict", {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": BRUSH_CONFIG}))
    return cases


def brush_config():
    from labelstudio_fixtures import BRUSH_CONFIG

    return BRUSH_CONFIG


ROUTES = ["/setup", "/predict", "/train", "/webhook", "/versions", "/health", "/metrics"]
ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED"]
bodies = st.fixed_dictionaries({}, optional={
    "project": json_values | st.integers(0, 10**20) | st.just("7.1700000000") | st.just({"id": 7}),
    "tasks": json_values | st.lists(st.fixed_dictionaries({"id": st.integers(), "data": json_values | st.fixed_dictionaries(
        {"image": st.text(max_size=40) | st.sampled_from(["/x.png", "/data/upload/1/a.png", "http://127.0.0.1:9/x"])})}),
        max_size=3),
    "label_config": json_values | st.builds(brush_config),
    "schema": json_values | st.builds(brush_config),
    "action": json_values | st.sampled_from(ACTIONS),
    "annotation": json_values,
    "annotations": json_values,
    "task": json_values,
}) | json_values


def post(client, route: str, body):
    data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    if route in ("/versions", "/health", "/metrics"):
        return client.get(route, query_string={"project": data[:30].decode(errors="replace")})
    return client.post(route, data=data, content_type="application/json")


def check_answer(answer) -> None:
    text = answer.get_data(as_text=True)
    assert answer.status_code < 500 or answer.status_code in (502, 503, 504), text
    assert "Traceback" not in text
    if answer.status_code >= 400:
        assert isinstance(json.loads(text)["error"], str)


def with_corpus(test):
    for route, body in corpus():
        test = example(route=route, body=body)(test)
    return test


@FUZZ
@given(route=st.sampled_from(ROUTES), body=bodies)
@with_corpus
def test_request_handlers_never_fail_on_any_body(client, route, body):
    check_answer(post(client, route, body))


@FUZZ
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_request_handlers_never_fail_on_any_bytes(client, body):
    check_answer(client.post("/predict", data=body, content_type="application/json"))
