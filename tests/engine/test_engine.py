"""The batch engine: references encoded once, batches equal single targets, result fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import EXAMPLES
from insid3_core import EngineConfig, Segmenter

REFERENCE = (EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")
TARGETS = sorted((EXAMPLES / "targets").glob("*.png"))


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return Segmenter(tiny_backbone, EngineConfig(image_size=256, svd_components=16), cache=False)


@pytest.fixture(scope="module")
def references(segmenter):
    return segmenter.encode({"object": [REFERENCE]})


def test_batches_equal_single_targets(segmenter, references):
    batched = segmenter.segment(references, TARGETS[:5], batch_size=3)
    single = [segmenter.segment(references, [target])[0] for target in TARGETS[:5]]
    assert len(batched) == 5
    for one, other in zip(batched, single):
        np.testing.assert_array_equal(one.mask, other.mask)
        np.testing.assert_array_equal(one.classes["object"].lowres_mask, other.classes["object"].lowres_mask)
        assert one.score == pytest.approx(other.score, abs=1e-5)
        assert one.quality == other.quality


def test_backbone_sees_each_image_once(segmenter):
    calls = []
    patch_embed = segmenter.backbone.model.patch_embed
    hook = patch_embed.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        references = segmenter.encode({"object": [REFERENCE, (TARGETS[1], EXAMPLES / "masks" / TARGETS[1].name)]})
        segmenter.segment(references, TARGETS[:5], batch_size=2)
    finally:
        hook.remove()
    assert calls == [2, 2, 2, 1]


def test_result_fields(segmenter, references):
    from PIL import Image

    prediction = segmenter.segment(references, [TARGETS[0]])[0]
    result = prediction.classes["object"]
    assert prediction.label_map.dtype == np.uint16 and np.array_equal(prediction.mask, result.mask)
    assert (prediction.score, prediction.quality) == (result.score, result.quality)
    width, height = Image.open(TARGETS[0]).size
    assert result.mask.shape == (height, width) and result.mask.dtype == bool
    assert result.lowres_mask.shape == (16, 16) and result.lowres_mask.dtype == bool
    assert 0.0 < result.score <= 1.0
    assert result.quality.verdict == "ok" and result.quality.components == 1
    truth = np.array(Image.open(EXAMPLES / "masks" / TARGETS[0].name)) > 0
    assert (result.mask & truth).sum() / (result.mask | truth).sum() > 0.8


def test_empty_prediction_scores_zero(tiny_backbone, references):
    strict = Segmenter(tiny_backbone, EngineConfig(image_size=256, svd_components=16, merge_threshold=1.0), cache=False)
    result = strict.segment(references, [TARGETS[0]])[0].classes["object"]
    assert not result.mask.any() and not result.lowres_mask.any()
    assert result.score == 0.0 and result.quality.verdict == "empty"


def test_references_must_match_image_size(tiny_backbone, references):
    other = Segmenter(tiny_backbone, EngineConfig(image_size=128, svd_components=16), cache=False)
    with pytest.raises(ValueError, match="256px"):
        other.segment(references, [TARGETS[0]])


def test_more_shots_are_accepted(segmenter):
    pairs = [REFERENCE] + [(t, EXAMPLES / "masks" / t.name) for t in TARGETS[1:3]]
    references = segmenter.encode({"object": pairs})["object"]
    assert len(references) == 3 and references.names[0] == str(REFERENCE[0])
    assert references.masks.shape == (3, 256) and references.masks.any(dim=1).all()


def test_invalid_configuration():
    with pytest.raises(ValueError, match="multiple of 16"):
        EngineConfig(image_size=100)
    with pytest.raises(ValueError, match="tau"):
        EngineConfig(tau=1.5)


def test_references_are_encoded_in_chunks_and_merge_like_one_encoding(segmenter):
    from insid3_core.engine import merge_references

    pairs = [REFERENCE, (TARGETS[0], EXAMPLES / "masks" / TARGETS[0].name), (TARGETS[1], EXAMPLES / "masks" / TARGETS[1].name)]
    seen = []
    hook = segmenter.backbone.model.patch_embed.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0])
    )
    try:
        chunked = segmenter.encode({"object": pairs}, batch_size=2)["object"]
    finally:
        hook.remove()
    assert seen == [2, 1]
    whole = segmenter.encode({"object": pairs})["object"]
    merged = merge_references(segmenter.encode({"object": pairs[:1]})["object"], segmenter.encode({"object": pairs[1:]})["object"])
    for other in (chunked, merged):
        assert other.names == whole.names
        torch.testing.assert_close(other.features, whole.features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.prototype, whole.prototype, atol=1e-5, rtol=1e-5)
        assert torch.equal(other.masks, whole.masks)
    with pytest.raises(ValueError, match="batch_size"):
        segmenter.encode({"object": pairs}, batch_size=0)
