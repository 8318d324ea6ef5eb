"""The engine's Python API refuses wrong arguments with errors that name them, instead of failing
deep inside torch, NumPy or PIL, or silently giving fewer or wrong results."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from data import EXAMPLES
from insid3_core import EngineConfig, InputError, QualityThresholds, Segmenter, load_image, quality_report
from insid3_core.engine import merge_references
from insid3_core.loader import load_target
from insid3_core.results import References
from insid3_core.settings import EngineSettings, SettingsError

REFERENCE = (str(EXAMPLES / "reference" / "disks.png"), str(EXAMPLES / "reference" / "disks_mask.png"))
TARGETS = sorted(str(path) for path in (EXAMPLES / "targets").glob("*.png"))[:2]


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return Segmenter(tiny_backbone, EngineConfig(image_size=128, svd_components=16), cache=False)


@pytest.fixture(scope="module")
def references(segmenter):
    return segmenter.encode({"disk": [REFERENCE]})


def test_a_none_target_is_refused_rather_than_ending_the_targets(segmenter, references):
    with pytest.raises(TypeError, match="an image must be a file path or a PIL image, got NoneType"):
        segmenter.segment(references, [TARGETS[0], None, TARGETS[1]], workers=0)


def test_one_path_instead_of_a_list_of_targets_is_named(segmenter, references):
    with pytest.raises(TypeError, match="targets must be an iterable of images"):
        segmenter.segment(references, TARGETS[0])


@pytest.mark.parametrize("image, shown", [
    (np.zeros((8, 8, 3), np.uint8), "got ndarray (PIL.Image.fromarray"),
    (torch.zeros(3, 8, 8), "got Tensor"),
    (b"\x89PNG", "got bytes"),
])
def test_an_image_that_is_no_path_or_pil_image_is_named_by_its_type(image, shown):
    with pytest.raises(TypeError, match=re.escape(shown)) as refused:
        load_image(image)
    assert len(str(refused.value)) < 200, "no pixel dump"


def test_wrong_reference_arguments_are_named(segmenter):
    with pytest.raises(TypeError, match="classes must map each class name"):
        segmenter.encode([REFERENCE])
    with pytest.raises(TypeError, match="class 'd': each reference is an \\(image, mask\\) pair, got str"):
        segmenter.encode({"d": REFERENCE})
    with pytest.raises(TypeError, match="negatives: each reference is an \\(image, mask\\) pair"):
        segmenter.encode({"d": [REFERENCE]}, negatives=[REFERENCE[0]])
    with pytest.raises(TypeError, match="batch_size must be an integer, got 2.5"):
        segmenter.encode({"d": [REFERENCE]}, batch_size=2.5)


@pytest.mark.parametrize("mask, words", [
    (np.ones(480 * 360, bool), "got shape (172800,)"),
    (np.ones((1, 360, 480), bool), "(channels last), got shape (1, 360, 480)"),
    (np.array(True), "got shape ()"),
])
def test_a_mask_of_an_odd_shape_is_named(segmenter, mask, words):
    image = Image.open(REFERENCE[0]).convert("RGB")
    with pytest.raises(InputError, match=re.escape(words)):
        segmenter.encode({"d": [(image, mask)]})


def test_references_are_checked_against_the_segmenter_using_them(segmenter, references, tiny_backbone):
    other = Segmenter(tiny_backbone, EngineConfig(image_size=128, svd_components=4), cache=False)
    with pytest.raises(ValueError, match="references were encoded by another encoder .*16 positional components"):
        other.segment(references, TARGETS[:1])
    with pytest.raises(ValueError, match="cannot merge references of two encoders"):
        merge_references(references["disk"], other.encode({"d": [REFERENCE]})["d"])
    with pytest.raises(TypeError, match="a ReferenceSet r is References"):
        segmenter.segment(references["disk"], TARGETS[:1])
    with pytest.raises(ValueError, match="at least one class"):
        References({})
    with pytest.raises(TypeError, match="References: class 'disk' holds list, not a ReferenceSet"):
        References({"disk": [REFERENCE]})
    larger = Segmenter(tiny_backbone, EngineConfig(image_size=160, svd_components=16), cache=False)
    with pytest.raises(ValueError, match="cannot merge references encoded at 128px and 160px"):
        merge_references(references["disk"], larger.encode({"d": [REFERENCE]})["d"])
    with pytest.raises(ValueError, match="references were encoded at 128px, this segmenter runs at 160px"):
        larger.segment(references, TARGETS[:1])
    merged = merge_references(references["disk"], references["disk"])
    both = References({"disk": merged})
    assert (len(both), both.names, both.image_size, both["disk"] is merged) == (1, ("disk",), 128, True)
    assert len(segmenter.segment(both, TARGETS[:1])) == 1


def test_segment_features_checks_its_features_against_their_sizes(segmenter, references):
    loaded = [load_target(path, 128) for path in TARGETS]
    features = segmenter.encoder.features(torch.stack([pixels for pixels, _ in loaded]))
    sizes = [size for _, size in loaded]
    assert len(segmenter.segment_features(references, features, sizes)) == 2
    with pytest.raises(ValueError, match="sizes holds 1 \\(H, W\\) but the features hold 2 targets"):
        segmenter.segment_features(references, features, sizes[:1])
    with pytest.raises(ValueError, match="this segmenter's are \\(B, 64, 96\\)"):
        segmenter.segment_features(references, features[:, :10], sizes)
    with pytest.raises(TypeError, match="features must be a \\(B, N, C\\) float tensor"):
        segmenter.segment_features(references, features[0], sizes)
    for bad in ((400, 520, 3), (0, 0), (400.0, 520.0), 400):
        with pytest.raises(ValueError, match="sizes must hold each target's \\(H, W\\) as two positive integers"):
            segmenter.segment_features(references, features, [sizes[0], bad])
    tracked = features.clone().requires_grad_(True)  # features of a model being trained beside it
    masks = [p.mask for p in segmenter.segment_features(references, tracked, sizes)]
    for mask, expected in zip(masks, segmenter.segment_features(references, features, sizes)):
        np.testing.assert_array_equal(mask, expected.mask)


def test_quality_report_reads_any_mask_encoding_as_its_foreground():
    mask = np.asarray(Image.open(REFERENCE[1]))  # 0/255 as stored
    assert quality_report(mask) == quality_report(mask > 0) == quality_report((mask > 0) * 0.5)
    with pytest.raises(ValueError, match="must be \\(H, W\\), got shape"):
        quality_report(np.dstack([mask] * 3))


@pytest.mark.parametrize("make, words", [
    (lambda: EngineConfig(image_size=128.0), "image_size must be an integer, got 128.0"),
    (lambda: EngineConfig(svd_components=2.5), "svd_components must be an integer"),
    (lambda: EngineConfig(tau="0.5"), "tau must be a number, got '0.5'"),
    (lambda: EngineConfig(merge_threshold=7.0), "merge_threshold must lie in [-1, 1]"),
    (lambda: QualityThresholds(max_components=2.5), "max_components must be an integer"),
    (lambda: EngineSettings(weights=""), "weights (--weights, INSID3_WEIGHTS) is empty"),
    (lambda: EngineSettings(merge_threshold=-3.0), "merge_threshold (--merge-threshold, INSID3_MERGE_THRESHOLD) must lie"),
    (lambda: EngineSettings.from_env({"INSID3_TAU": "-5"}), "tau (--tau, INSID3_TAU) must lie in (-1, 1)"),
    (lambda: EngineSettings.from_env({"INSID3_WEIGHTS": "vitl.pth"}, backbone="vit_large_patch16_dinov3"),
     "give --weights (INSID3_WEIGHTS) or --backbone (INSID3_BACKBONE), not both"),
    (lambda: EngineConfig(svd_components=-1), "svd_components must be >= 0, got -1"),
    (lambda: EngineConfig(clustering="kmeans"), "clustering must be one of"),
    (lambda: EngineConfig(refinement="crf"), "refinement must be one of"),
])
def test_configuration_values_of_the_wrong_type_or_range_are_named(make, words):
    with pytest.raises((TypeError, ValueError), match=re.escape(words)):
        make()


def test_numpy_numbers_are_settings_like_python_numbers():
    settings = EngineSettings(image_size=np.int64(128), tau=np.float32(0.5), svd_components=np.int32(16))
    assert settings == EngineSettings(image_size=128, tau=0.5, svd_components=16)
    assert type(settings.image_size) is int and type(settings.tau) is float
    with pytest.raises(SettingsError):
        EngineSettings(batch_size=np.float64(2.0))


def test_workers_and_empty_images_are_named(segmenter, references):
    with pytest.raises(ValueError, match="workers must be >= 0"):
        segmenter.segment(references, TARGETS[:1], workers=-1)
    with pytest.raises(InputError, match="an image of 0x0 pixels has nothing to segment"):
        segmenter.segment(references, [Image.new("RGB", (0, 0))], workers=0)
