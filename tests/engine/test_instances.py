"""Instances: splitting a predicted mask, on planted masks and on synthetic scenes through the engine."""

from __future__ import annotations

import numpy as np
import pytest

from insid3_core import EngineConfig, Segmenter
from insid3_core.instances import INSTANCE_METHODS, instance_labels, split_instances
from scenes import scene

SIZE = (384, 320)


def touching_disks(shape=(32, 32)) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return ((ys - 16) ** 2 + (xs - 9) ** 2 <= 36) | ((ys - 16) ** 2 + (xs - 21) ** 2 <= 36)


def test_components_keep_touching_disks_together_and_necks_split_them():
    mask = touching_disks()
    assert instance_labels(mask, method="components").max() == 1
    labels = instance_labels(mask, method="necks")
    assert labels.max() == 2
    left, right = labels[16, 9], labels[16, 21]
    assert {left, right} == {1, 2}
    np.testing.assert_array_equal(labels > 0, mask)


def test_a_convex_region_is_not_split():
    mask = np.zeros((32, 32), dtype=bool)
    mask[5:25, 3:29] = True
    assert instance_labels(mask, method="necks").max() == 1


def test_clusters_split_a_region_along_cluster_labels():
    mask = touching_disks()
    clusters = np.where(np.arange(32)[None, :] < 15, 4, 7).repeat(32, axis=0)
    labels = instance_labels(mask, clusters, method="clusters")
    assert labels.max() == 2
    assert labels[16, 9] != labels[16, 21]


def test_min_patches_drops_small_regions_and_labels_stay_consecutive():
    mask = touching_disks()
    mask[0, 0] = mask[0, 31] = True
    assert instance_labels(mask, method="components").max() == 3
    labels = instance_labels(mask, method="components", min_patches=2)
    assert labels.max() == 1 and labels[0, 0] == 0


def test_pixels_of_a_dropped_region_join_no_kept_instance():
    """A region below ``min_patches`` is left out of the instances: its pixels neither stretch the
    box of the nearest kept instance nor add to its area."""
    from insid3_core.quality import quality_report
    from insid3_core.results import SegmentationResult

    lowres = np.zeros((8, 8), dtype=bool)
    lowres[0:3, 0:3] = True
    lowres[7, 7] = True
    mask = np.kron(lowres, np.ones((16, 16), dtype=bool))
    result = SegmentationResult(mask, lowres, 0.5, quality_report(mask), np.full((8, 8), 0.5, np.float32),
                                np.zeros((8, 8), np.int32))
    assert len(split_instances(result, "components")) == 2
    (kept,) = split_instances(result, "components", min_patches=2)
    assert kept.box == (0.0, 0.0, 48.0, 48.0)
    np.testing.assert_array_equal(kept.mask, mask & (np.arange(128)[:, None] < 48) & (np.arange(128)[None, :] < 48))


def test_bad_method_and_missing_clusters_are_refused():
    with pytest.raises(ValueError, match="instance method"):
        instance_labels(touching_disks(), method="kmeans")
    with pytest.raises(ValueError, match="cluster labels"):
        instance_labels(touching_disks(), method="clusters")


def instance_scenes():
    """Scenes of striped disks, some touching, with each disk's true mask."""
    layouts = [
        [(110, 150, 56), (218, 150, 56)],
        [(90, 100, 50), (190, 110, 52), (300, 240, 50)],
        [(120, 200, 60), (235, 190, 58)],
        [(80, 80, 45), (290, 90, 45), (185, 230, 60)],
    ]
    return [scene(SIZE, disks=layout, squares=[(300, 10, 60)], seed=10 + i) for i, layout in enumerate(layouts)]


def matched_instances(instances, truths, threshold=0.5):
    """Number of true instances matched one-to-one by a predicted instance with IoU above ``threshold``."""
    used, matched = set(), 0
    for truth in truths:
        for index, instance in enumerate(instances):
            union = (instance.mask | truth).sum()
            if index not in used and union and (instance.mask & truth).sum() / union > threshold:
                used.add(index)
                matched += 1
                break
    return matched


@pytest.fixture(scope="module")
def scene_results(tiny_backbone):
    segmenter = Segmenter(tiny_backbone, EngineConfig(image_size=512, svd_components=16), cache=False)
    reference, masks = scene(SIZE, disks=[(150, 160, 80)], squares=[(280, 20, 80)], seed=9)
    references = segmenter.encode({"object": [(reference, masks["disks"])]})
    scenes = instance_scenes()
    predictions = segmenter.segment(references, [image for image, _ in scenes], batch_size=2)
    return [prediction.classes["object"] for prediction in predictions], [truth["disk_instances"] for _, truth in scenes]


def test_instances_of_engine_results_partition_the_mask(scene_results):
    results, _ = scene_results
    for result in results:
        instances = split_instances(result)
        assert instances
        union = np.zeros_like(result.mask)
        for instance in instances:
            assert not (union & instance.mask).any()
            union |= instance.mask
            ys, xs = np.nonzero(instance.mask)
            assert instance.box == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert 0.0 <= instance.score <= 1.0
            assert instance.lowres_mask.shape == result.lowres_mask.shape
        np.testing.assert_array_equal(union, result.mask)


def test_necks_separate_touching_disks_best(scene_results):
    """The comparison behind the default method: true disks matched (IoU > 0.5) per method."""
    results, truths = scene_results
    total = sum(len(t) for t in truths)
    matched = {
        method: sum(matched_instances(split_instances(r, method, min_patches=4), t) for r, t in zip(results, truths))
        for method in INSTANCE_METHODS
    }
    print(f"\ninstances matched of {total} disks: {matched}")
    assert matched["necks"] == max(matched.values())
    assert matched["necks"] >= 0.8 * total
    assert matched["necks"] > matched["components"]
