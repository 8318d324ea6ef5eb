"""Parity with the released INSID3 on the episodes of tests/fixtures/parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data import ARTIFACTS, EPISODES, PARITY
from insid3_core import TEST_CHECKPOINT, EngineConfig, Segmenter, load_backbone
from insid3_core.features import patch_features, resized_pixels
from insid3_core.io import load_image

IOUS: dict[str, float] = {}


SPEEDUPS = [
    pytest.param("cpu", "scipy", id="cpu-scipy"),
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param(
        "cuda", "auto", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
    ),
]


def episode_segmenter(backbone, episode, clustering: str = "auto") -> Segmenter:
    config = EngineConfig(
        image_size=episode["image_size"],
        svd_components=episode["svd_components"],
        tau=episode["tau"],
        merge_threshold=episode["merge_threshold"],
        clustering=clustering,
    )
    return Segmenter(backbone, config, cache=False)


@pytest.mark.parametrize("episode", EPISODES, ids=[e["id"] for e in EPISODES])
def test_features_match_release(tiny_backbone, episode):
    folder = PARITY / episode["id"]
    expected = np.load(folder / "target_features.npy")  # (C, h, w)
    image = resized_pixels(load_image(folder / episode["target"]), episode["image_size"])
    features = patch_features(tiny_backbone, image[None])[0]  # (N, C)
    ours = features.T.reshape(expected.shape).numpy()
    assert np.abs(ours - expected).max() <= 1e-4


@pytest.mark.parametrize("episode", EPISODES, ids=[e["id"] for e in EPISODES])
def test_positional_basis_spans_release_subspace(tiny_backbone, episode):
    expected = np.load(PARITY / episode["id"] / "positional_basis.npy")
    basis = episode_segmenter(tiny_backbone, episode).basis.numpy()
    assert basis.shape == expected.shape
    assert np.abs(basis @ basis.T - expected @ expected.T).max() <= 1e-3


@pytest.mark.parametrize("device, clustering", SPEEDUPS)
@pytest.mark.parametrize("episode", EPISODES, ids=[e["id"] for e in EPISODES])
def test_mask_matches_release(tiny_backbone, episode, device, clustering):
    """Every speed-up switched on (torch clustering, GPU, threaded loading) keeps parity."""
    folder = PARITY / episode["id"]
    backbone = tiny_backbone if device == "cpu" else load_backbone(TEST_CHECKPOINT, device=device)
    segmenter = episode_segmenter(backbone, episode, clustering)
    references = segmenter.encode({"object": [(folder / r["image"], folder / r["mask"]) for r in episode["references"]]})
    result = segmenter.segment(references, [folder / episode["target"]])[0]
    expected = np.array(Image.open(folder / episode["expected_mask"])) > 0
    assert result.mask.shape == expected.shape
    iou = (result.mask & expected).sum() / (result.mask | expected).sum()
    IOUS[f"{episode['id']}/{device}-{clustering}"] = float(iou)
    print(f"parity {episode['id']} ({device}, {clustering} clustering): IoU {iou:.4f}")
    assert iou >= 0.99


def test_positional_basis_from_release_file(tiny_backbone):
    """A basis given as .npy is used as is and reproduces the release's mask."""
    episode = EPISODES[0]
    folder = PARITY / episode["id"]
    config = EngineConfig(image_size=episode["image_size"], tau=episode["tau"])
    segmenter = Segmenter(tiny_backbone, config, basis_file=folder / "positional_basis.npy", cache=False)
    assert torch.equal(segmenter.basis, torch.from_numpy(np.load(folder / "positional_basis.npy")))
    references = segmenter.encode({"object": [(folder / r["image"], folder / r["mask"]) for r in episode["references"]]})
    mask = segmenter.segment(references, [folder / episode["target"]])[0].mask
    expected = np.array(Image.open(folder / episode["expected_mask"])) > 0
    assert (mask & expected).sum() / (mask | expected).sum() >= 0.99


def teardown_module(module):
    if IOUS:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "parity_iou.json").write_text(json.dumps(IOUS, indent=1))
