"""Fuzzing (hypothesis, bounded for CI) of the image, mask and checkpoint loaders: damaged or
hostile files raise the loader's own error (``InputError``, ``BackboneError``) naming the file,
never anything else; seeded with the files that once gave a bare Python error."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from fuzzing import FUZZ, json_values
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from insid3_core import BackboneError, load_backbone
from insid3_core.backbone import BUNDLED_CHECKPOINT
from insid3_core.io import InputError, label_masks, load_image, load_mask



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
@example(state=dict(TINY_STATE), sidecar={**TINY_SIDECAR, "num_heads": 97})  # wider than the width: timm divided by 0
@example(state=dict(TINY_STATE), sidecar={**TINY_SIDECAR, "num_heads": 0})
def test_hostile_checkpoint_contents_are_named_errors(tmp_path_factory, state, sidecar):
    path = tmp_path_factory.mktemp("checkpoint") / "weights.pth"
    torch.save(state, path)
    if sidecar is not None:
        path.with_suffix(".json").write_text(json.dumps(sidecar))
    loads_or_names_the_file(path)
