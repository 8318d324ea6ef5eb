"""Several classes in one pass, negative references and parts, on synthetic scenes with the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from insid3_core import EngineConfig, References, Segmenter
from insid3_core import pipeline as pipeline_module
from insid3_core.io import InputError
from data import EXAMPLES
from scenes import scene
from insid3_core.metrics import mask_iou


REFERENCE, REFERENCE_MASKS = scene(disks=[(100, 120, 60)], squares=[(200, 40, 90)], seed=1)
TARGETS = [
    scene(disks=[(80, 90, 45)], squares=[(200, 140, 70)], seed=3),
    scene(disks=[(230, 150, 55)], squares=[(30, 30, 64)], seed=4),
    scene(disks=[(120, 128, 70)], seed=5),
]


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return Segmenter(tiny_backbone, EngineConfig(image_size=256, svd_components=16), cache=False)


@pytest.fixture(scope="module")
def classes(segmenter):
    return segmenter.encode({"disk": [(REFERENCE, REFERENCE_MASKS["disks"])],
                             "square": [(REFERENCE, REFERENCE_MASKS["squares"])]})


def test_encode_encodes_an_image_shared_by_classes_once(segmenter):
    seen = []
    hook = segmenter.backbone.model.patch_embed.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[0])
    )
    try:
        reference, mask = EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png"
        segmenter.encode({"a": [(reference, mask)], "b": [(reference, mask)]})
    finally:
        hook.remove()
    assert seen == [1]


def test_classes_in_one_pass_share_backbone_and_clustering(segmenter, classes, monkeypatch):
    clusterings = []
    real = pipeline_module.cluster_patches
    monkeypatch.setattr(pipeline_module, "cluster_patches", lambda *a: clusterings.append(len(a[0])) or real(*a))
    results = segmenter.segment(classes, [image for image, _ in TARGETS], batch_size=3)
    assert clusterings == [3], "one clustering call for the whole batch and both classes"
    for result, (_, truth) in zip(results, TARGETS):
        disk, square = result.classes["disk"], result.classes["square"]
        assert not (disk.mask & square.mask).any()
        np.testing.assert_array_equal(result.label_map == 1, disk.mask)
        np.testing.assert_array_equal(result.label_map == 2, square.mask)
        assert mask_iou(disk.mask, truth["disks"]) > 0.6
        if truth["squares"].any():
            assert mask_iou(square.mask, truth["squares"]) > 0.6
        else:
            assert square.mask.sum() < 0.05 * truth["disks"].sum()


def test_a_class_encoded_beside_others_equals_it_encoded_alone(segmenter, classes):
    images = [image for image, _ in TARGETS]
    alone = segmenter.segment(segmenter.encode({"disk": [(REFERENCE, REFERENCE_MASKS["disks"])]}), images)
    beside = segmenter.segment(References({"disk": classes["disk"]}), images)
    for one, other in zip(alone, beside):
        np.testing.assert_array_equal(one.mask, other.mask)
        assert one.score == other.score and one.quality == other.quality


def test_overlaps_go_to_the_more_similar_class(segmenter, classes):
    """The same references under two names claim the same patches: the tie keeps the first class only."""
    twice = References({"first": classes["disk"], "second": classes["disk"]})
    result = segmenter.segment(twice, [TARGETS[0][0]])[0]
    assert result.classes["first"].mask.any()
    assert not result.classes["second"].mask.any()
    assert result.classes["second"].quality.verdict == "empty"


def test_negative_reference_removes_a_lookalike_that_leaks(segmenter):
    """Red/orange striped look-alikes leak into the positive-only prediction; a negative removes them."""
    negative, negative_masks = scene(lookalikes=[(160, 128, 70)], seed=2)
    target, truth = scene(disks=[(80, 90, 45)], lookalikes=[(230, 170, 50)], squares=[(200, 20, 40)], seed=3)
    positive_only = segmenter.encode({"object": [(REFERENCE, REFERENCE_MASKS["disks"])]})
    with_negative = segmenter.encode({"object": [(REFERENCE, REFERENCE_MASKS["disks"])]}, negatives=[(negative, negative_masks["lookalikes"])])
    before = segmenter.segment(positive_only, [target])[0].mask
    after = segmenter.segment(with_negative, [target])[0].mask
    leak_before = (before & truth["lookalikes"]).sum() / truth["lookalikes"].sum()
    leak_after = (after & truth["lookalikes"]).sum() / truth["lookalikes"].sum()
    print(f"\nnegative reference: look-alike covered {leak_before:.3f} -> {leak_after:.3f}, "
          f"disk IoU {mask_iou(before, truth['disks']):.3f} -> {mask_iou(after, truth['disks']):.3f}")
    assert leak_before > 0.5
    assert leak_after < 0.1
    assert mask_iou(after, truth["disks"]) > mask_iou(before, truth["disks"])


def test_empty_negative_mask_is_refused(segmenter):
    with pytest.raises(InputError, match="empty"):
        segmenter.encode({"object": [(REFERENCE, REFERENCE_MASKS["disks"])]}, negatives=[(REFERENCE, np.zeros_like(REFERENCE_MASKS["disks"]))])


def test_class_without_references_is_refused(segmenter):
    with pytest.raises(InputError, match="'cat'"):
        segmenter.encode({"cat": []})


def test_part_reference_segments_the_part_only(segmenter):
    """Recipe of the README: the reference mask covers one part of a two-part object."""
    reference, reference_masks = scene(disks=[(110, 100, 50)], squares=[(70, 140, 80)], seed=6)
    target, truth = scene(disks=[(200, 90, 45)], squares=[(165, 125, 72)], seed=7)
    part = segmenter.encode({"object": [(reference, reference_masks["disks"])]})
    part_mask = segmenter.segment(part, [target])[0].mask
    other_part = (part_mask & truth["squares"]).sum() / truth["squares"].sum()
    print(f"\npart: IoU with the part {mask_iou(part_mask, truth['disks']):.3f}, other part covered {other_part:.3f}")
    assert mask_iou(part_mask, truth["disks"]) > 0.6
    assert other_part < 0.1


def test_guided_refinement_in_the_engine_sharpens_edges(tiny_backbone):
    """The engine's ``guided`` refinement against bilinear upsampling, on the example scenes."""
    from insid3_core.metrics import boundary_f_score

    targets = sorted((EXAMPLES / "targets").glob("*.png"))[:4]
    truths = [np.asarray(Image.open(EXAMPLES / "masks" / t.name)) > 0 for t in targets]
    reference = [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]
    scores = {}
    for refinement in ("bilinear", "guided"):
        config = EngineConfig(image_size=256, svd_components=16, refinement=refinement)
        segmenter = Segmenter(tiny_backbone, config, cache=False)
        results = segmenter.segment(segmenter.encode({"object": reference}), targets, batch_size=2)
        scores[refinement] = float(np.mean([boundary_f_score(r.mask, t).f for r, t in zip(results, truths)]))
        single = segmenter.segment(segmenter.encode({"object": reference}), targets[:1], workers=0)[0]
        np.testing.assert_array_equal(single.mask, results[0].mask)
    print(f"\nboundary F on 4 example scenes: {scores}")
    assert scores["guided"] > scores["bilinear"] + 0.03


def test_guided_refinement_keeps_classes_disjoint(tiny_backbone, classes):
    segmenter = Segmenter(tiny_backbone, EngineConfig(image_size=256, svd_components=16, refinement="guided"), cache=False)
    for result in segmenter.segment(classes, [image for image, _ in TARGETS]):
        assert not (result.classes["disk"].mask & result.classes["square"].mask).any()
    with pytest.raises(ValueError, match="pixels"):
        segmenter.segment_features(classes, torch.zeros(1, 256, 96), [(10, 10)])


def test_segmenting_in_the_callers_thread_equals_the_threaded_engine(segmenter, classes):
    images = [image for image, _ in TARGETS]
    for one, other in zip(segmenter.segment(classes, images, workers=0), segmenter.segment(classes, images)):
        np.testing.assert_array_equal(one.label_map, other.label_map)
