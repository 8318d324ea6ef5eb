"""Fuzzing (hypothesis, bounded for CI) of the Label Studio request handlers and of the image, mask
and checkpoint loaders, seeded with the corpus of the cases that once broke them.

Handlers: any JSON (or not) on any route gives a status below 500 and a JSON ``{"error": ...}`` for
every refusal. Loaders: damaged or hostile files raise the loader's own error (``InputError``,
``BackboneError``) naming the file, never anything else.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from insid3_core import BackboneError, load_backbone
from insid3_core.backbone import BUNDLED_CHECKPOINT
from insid3_core.io import InputError, label_masks, load_image, load_mask

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25,
)


# ---------------------------------------------------------------- request handlers

@pytest.fixture(scope="module")
def client(tiny_backbone, tmp_path_factory):
    pytest.importorskip("flask")
    from labelstudio_fixtures import reference_folder, small_segmenter
    from test_labelstudio_ssrf import Listener

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


# ---------------------------------------------------------------- image and mask loaders

def image_bytes(format_name: str, mode: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(buffer, format_name)
    return buffer.getvalue()


VALID_IMAGES = [image_bytes("PNG", "RGB"), image_bytes("PNG", "P"), image_bytes("JPEG", "RGB"),
                image_bytes("TIFF", "I;16"), image_bytes("WEBP", "RGB"), image_bytes("BMP", "L")]


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_IMAGES)))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(1, len(data)))])


@FUZZ
@given(data=damaged_images() | st.binary(max_size=300))
@example(data=b"")
@example(data=b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
@example(data=VALID_IMAGES[0][:30])
def test_image_and_mask_loaders_raise_only_input_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("image") / "image.png"
    path.write_bytes(data)
    for load in (load_image, load_mask, label_masks):
        try:
            load(path)
        except InputError as err:
            assert str(path) in str(err)


# ---------------------------------------------------------------- checkpoint loader

TINY_STATE = torch.load(BUNDLED_CHECKPOINT, weights_only=True)
TINY_SIDECAR = json.loads(BUNDLED_CHECKPOINT.with_suffix(".json").read_text())


def loads_or_names_the_file(path) -> None:
    try:
        load_backbone(path, device="cpu")
    except BackboneError as err:
        assert path.stem in str(err) and "weights_only=False" not in str(err)  # the .pth or its .json


@st.composite
def damaged_checkpoints(draw) -> bytes:
    data = bytearray(BUNDLED_CHECKPOINT.read_bytes())
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(1, len(data)))])


@settings(max_examples=25, deadline=None)
@given(data=damaged_checkpoints() | st.binary(max_size=200))
@example(data=b"")
@example(data=b"notes about my weights\n")
def test_damaged_checkpoint_files_are_named_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("checkpoint") / "weights.pth"
    path.write_bytes(data)
    loads_or_names_the_file(path)


@st.composite
def hostile_state_dicts(draw) -> dict:
    state = dict(TINY_STATE)
    for key in draw(st.lists(st.sampled_from(sorted(state)), max_size=4)):
        state.pop(key, None)
    for key in draw(st.lists(st.sampled_from(sorted(TINY_STATE)), max_size=3)):
        state[key] = draw(st.sampled_from([torch.zeros(()), torch.zeros(3), torch.zeros(2, 2, 2, 2), 5, "x"]))
    if draw(st.booleans()):
        state[draw(st.sampled_from(["blocks.x.norm1.weight", "blocks.99", "extra"]))] = torch.zeros(1)
    return state


@settings(max_examples=25, deadline=None)
@given(state=hostile_state_dicts(), sidecar=st.none() | json_values | st.fixed_dictionaries(
    {}, optional={key: json_values | st.integers(-2, 10**6) for key in ("embed_dim", "depth", "num_heads",
                                                                        "patch_size", "pos_embed_rope_base",
                                                                        "norm_layer", "ffn_layer", "qkv_bias")}))
@example(state={key: value for key, value in TINY_STATE.items() if not key.startswith("blocks.")}, sidecar=None)
@example(state=dict(TINY_STATE), sidecar="a string")
@example(state=dict(TINY_STATE), sidecar=[1, 2])
@example(state=dict(TINY_STATE), sidecar={**TINY_SIDECAR, "num_heads": "three"})
@example(state=dict(TINY_STATE), sidecar={**TINY_SIDECAR, "depth": 10_000})
def test_hostile_checkpoint_contents_are_named_errors(tmp_path_factory, state, sidecar):
    path = tmp_path_factory.mktemp("checkpoint") / "weights.pth"
    torch.save(state, path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    loads_or_names_the_file(path)
