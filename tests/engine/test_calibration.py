"""Calibration from the references: leave-one-out episodes lift held-out IoU where the defaults are
wrong for the scenes, bad references are flagged, and every reported IoU is a segment run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from insid3_core import calibration as calibration_module
from insid3_core.calibration import calibrate, calibration_episodes, grid_option
from insid3_core.io import InputError
from insid3_core.metrics import mask_iou
from insid3_core.settings import EngineSettings, SettingsError
from scenes import field_scene, ringed_scene, scene, square

BASE = EngineSettings(image_size=256, svd_components=16, device="cpu")
DISKS = [[(100, 120, 60)], [(80, 90, 45)], [(230, 150, 55)], [(120, 128, 70)], [(200, 100, 50)]]


def disk_references(count: int = 5) -> list[tuple]:
    scenes = [scene(disks=layout, seed=10 + index) for index, layout in enumerate(DISKS[:count])]
    return [(image, masks["disks"]) for image, masks in scenes]


def held_out_iou(settings: EngineSettings, references, targets) -> float:
    segmenter = settings.build()
    predictions = segmenter.segment(segmenter.encode({"object": references}), [image for image, _ in targets])
    return float(np.mean([mask_iou(p.mask, truth) for p, (_, truth) in zip(predictions, targets)]))


@pytest.mark.parametrize("family, grid", [
    pytest.param(ringed_scene, None, id="split: two-texture objects, default grid"),
    pytest.param(field_scene, {"tau": (0.6, 0.7, 0.8, 0.9)}, id="over-merged: disk on a look-alike field"),
])
def test_calibrated_settings_lift_the_iou_of_held_out_targets(family, grid):
    """Four references calibrate; four other scenes of the family (never references) are scored."""
    scenes = [family(seed) for seed in range(8)]
    references, held_out = scenes[:4], scenes[4:]
    calibration = calibrate(BASE, {"object": references}, grid=grid)
    tuned = dataclasses.replace(BASE, **calibration.settings)
    before, after = held_out_iou(BASE, references, held_out), held_out_iou(tuned, references, held_out)
    print(f"\n{family.__name__}: leave-one-out {calibration.default_score:.3f} -> {calibration.best_score:.3f}, "
          f"held-out IoU {before:.3f} -> {after:.3f} with {calibration.settings}")
    assert calibration.best_score > calibration.default_score + 0.2
    assert after > before + 0.3


def test_a_wrong_reference_mask_is_flagged_and_the_others_are_not():
    references = disk_references()
    image, masks = references[2][0], references[2][1]
    references[2] = (image, square((320, 256), (10, 180), 60) & ~masks)  # background marked as the disk
    calibration = calibrate(BASE, {"disk": references})
    flags = [reference.flag for reference in calibration.references]
    print(f"\nleave-one-out IoU per reference: {[round(r.iou_best, 3) for r in calibration.references]}")
    assert flags[2] is not None and "disagrees with the other references" in flags[2]
    assert flags[:2] + flags[3:] == [None] * 4


def test_duplicate_images_and_near_empty_masks_are_flagged():
    references = disk_references(4)
    tiny = np.zeros_like(references[3][1])
    tiny[100:103, 100:103] = True
    pairs = references[:3] + [(references[0][0].copy(), references[0][1]), (references[3][0], tiny)]
    flags = [reference.flag or "" for reference in calibrate(BASE, {"disk": pairs}).references]
    assert "duplicate of reference 3" in flags[0] and "duplicate of reference 0" in flags[3]
    assert flags[1] == flags[2] == ""
    assert flags[4].startswith("near-empty mask")


def test_each_reported_iou_is_the_segment_run_of_its_episode():
    """An episode segments the reference from the others; its IoU against its own mask is reported."""
    references = disk_references(4)
    calibration = calibrate(BASE, {"disk": references})
    for settings, key in ((calibration.defaults, "iou_default"), (calibration.settings, "iou_best")):
        segmenter = dataclasses.replace(BASE, **settings).build()
        for index, (image, mask) in enumerate(references):
            others = references[:index] + references[index + 1:]
            prediction = segmenter.segment(segmenter.encode({"disk": others}), [image])[0]
            assert mask_iou(prediction.mask, mask) == getattr(calibration.references[index], key)
    scores = {tuple(sorted(point.items())): score for point, score in calibration.grid}
    chosen = {name: value for name, value in calibration.settings.items() if name != "image_size"}
    assert scores[tuple(sorted(chosen.items()))] == calibration.best_score == max(scores.values())

    def changes(point) -> int:
        return sum(value != calibration.defaults[name] for name, value in point)

    tied = [changes(point) for point, score in scores.items() if score == calibration.best_score]
    assert changes(chosen.items()) == min(tied), "among equal scores, the fewest changed options"
    assert calibration.best_score == pytest.approx(np.mean([r.iou_best for r in calibration.references]))


def test_references_pass_the_backbone_once_and_each_tau_clusters_once(monkeypatch):
    references = disk_references(4)
    segmenter = BASE.build()
    images = []
    hook = segmenter.backbone.model.patch_embed.register_forward_hook(
        lambda module, args, output: images.append(args[0].shape[0]))
    clusterings = []
    real = calibration_module.cluster_patches
    monkeypatch.setattr(calibration_module, "cluster_patches",
                        lambda features, tau, method: clusterings.append((tau, len(features))) or real(features, tau, method))
    try:
        calibration = calibrate(BASE, {"disk": references}, segmenter=segmenter)
    finally:
        hook.remove()
    assert sum(images) == 4, "each reference image through the backbone once for the whole grid"
    assert clusterings == [(tau, 4) for tau in (0.5, 0.6, 0.7, 0.8)], "one clustering per tau, all targets at once"
    assert len(calibration.grid) == 4 * 4 * 3


def test_several_classes_score_the_classes_of_each_image():
    """Two classes on shared images: each image is segmented with the other images' references of both."""
    scenes = [scene(disks=[(80 + 30 * i, 90, 40)], squares=[(200, 120 + 20 * i, 60)], seed=20 + i) for i in range(3)]
    classes = {"disk": [(image, masks["disks"]) for image, masks in scenes],
               "square": [(image, masks["squares"]) for image, masks in scenes[:2]]}
    calibration = calibrate(BASE, classes, grid={"svd_components": (16,)})
    by_class = {(r.category, r.image): r for r in calibration.references}
    assert all(by_class[("disk", f"reference {i}")].iou_best is not None for i in range(3))
    assert by_class[("square", "reference 0")].iou_best is not None
    assert len(calibration.grid) == 16


def test_one_reference_image_cannot_calibrate_and_is_told_before_the_backbone_loads(tmp_path):
    """One image object given twice is one image; the check needs no backbone (the weights here
    do not exist, and the error is still the references')."""
    (image, mask), = disk_references(1)
    with pytest.raises(InputError, match="at least two images"):
        calibrate(BASE, {"disk": [(image, mask), (image, mask)]})
    missing = dataclasses.replace(BASE, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(InputError, match="at least two images"):
        calibrate(missing, {"disk": [(image, mask)], "square": [(image.copy(), mask)]})
    assert len(calibration_episodes({"disk": [(image, mask), (image.copy(), mask)]})) == 2


@pytest.mark.parametrize("spec, message", [
    ("gamma=1,2", "NAME one of tau, merge_threshold"),
    ("tau=", "no value"),
    ("tau=0.1,,0.2", "an empty value between commas"),
    ("tau=0.1,", "an empty value between commas"),
    ("tau=0.5,x", "is not a finite number"),
    ("tau=0.5,1.5", r"tau must lie in \(-1, 1\)"),
    ("refinement=sharp", "must be one of bilinear, guided"),
])
def test_a_bad_grid_option_is_refused_by_name(spec, message):
    with pytest.raises(SettingsError, match=message):
        grid_option(spec)


def test_grid_options_parse():
    assert grid_option("tau=0.5, 0.7,0.5") == ("tau", (0.5, 0.7))
    assert grid_option("merge-threshold=0.3") == ("merge_threshold", (0.3,))
    assert grid_option("svd_components=8,24") == ("svd_components", (8, 24))
