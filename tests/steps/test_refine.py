"""Edge refinement (``insid3_core.refine``) on synthetic disks with blocky feature-resolution masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from insid3_core.metrics import boundary_f_score, mask_iou
from insid3_core.refine import refine_masks
from insid3_core.upsample import upsample_mask

SIDE, PATCH = 128, 16


def disk_scene(centre, radius, inside, outside, seed=0) -> tuple[torch.Tensor, np.ndarray]:
    """``(3, s, s)`` uint8 image of a noisy disk on a noisy background, and the disk's ``(s, s)`` mask."""
    rows, columns = np.mgrid[:SIDE, :SIDE] + 0.5
    truth = (columns - centre[0]) ** 2 + (rows - centre[1]) ** 2 < radius**2
    image = np.where(truth[..., None], inside, outside) + np.random.default_rng(seed).normal(0, 8, (SIDE, SIDE, 3))
    return torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8)).permute(2, 0, 1), truth


def blocky(truth: np.ndarray) -> torch.Tensor:
    """The mask at feature resolution: patches more than half covered, ``(h, w)`` bool."""
    return F.avg_pool2d(torch.from_numpy(truth).float()[None], PATCH)[0] > 0.5


@pytest.fixture(scope="module")
def scenes():
    specs = [((61.3, 58.7), 33, (220, 60, 40), (40, 120, 60)),
             ((40.0, 80.0), 25, (30, 30, 200), (200, 200, 120)),
             ((80.5, 50.2), 38, (90, 90, 90), (160, 160, 160))]
    return [disk_scene(*spec, seed=i) for i, spec in enumerate(specs)]


def test_refinement_snaps_a_blocky_mask_to_the_disk(scenes):
    pixels, truth = scenes[0]
    lowres = blocky(truth)
    bilinear = upsample_mask(lowres, SIDE, (SIDE, SIDE)).numpy()
    refined = refine_masks(pixels[None], lowres[None])[0].numpy()
    assert refined.shape == (SIDE, SIDE) and refined.dtype == bool
    before, after = boundary_f_score(bilinear, truth, 1.0), boundary_f_score(refined, truth, 1.0)
    assert after.f > 0.9 and after.f > before.f + 0.3
    assert mask_iou(refined, truth) > 0.97 > mask_iou(bilinear, truth)


def test_batch_equals_single_images(scenes):
    pixels = torch.stack([p for p, _ in scenes])
    lowres = torch.stack([blocky(t) for _, t in scenes])
    batch = refine_masks(pixels, lowres)
    assert batch.shape == (3, SIDE, SIDE)
    for index, (image, truth) in enumerate(scenes):
        torch.testing.assert_close(batch[index], refine_masks(image[None], lowres[index : index + 1])[0])
        assert boundary_f_score(batch[index].numpy(), truth, 1.0).f > 0.9


def test_float32_inputs_match_uint8(scenes):
    pixels, truth = scenes[1]
    lowres = blocky(truth)[None]
    reference = refine_masks(pixels[None], lowres)
    assert torch.equal(refine_masks(pixels[None].float() / 255.0, lowres.float()), reference)
    soft = F.interpolate(torch.from_numpy(truth).float()[None, None], scale_factor=1 / PATCH, mode="area")[:, 0]
    assert boundary_f_score(refine_masks(pixels[None], soft)[0].numpy(), truth, 1.0).f > 0.9


def test_empty_and_full_masks_stay(scenes):
    pixels = torch.stack([p for p, _ in scenes[:2]])
    grid = (2, SIDE // PATCH, SIDE // PATCH)
    assert not refine_masks(pixels, torch.zeros(grid, dtype=torch.bool)).any()
    assert refine_masks(pixels, torch.ones(grid, dtype=torch.bool)).all()


def test_parameters_are_checked(scenes):
    pixels, truth = scenes[0]
    with pytest.raises(ValueError, match="expected"):
        refine_masks(pixels, blocky(truth)[None])
    with pytest.raises(ValueError, match="eps"):
        refine_masks(pixels[None], blocky(truth)[None], eps=0.0)
    refined = refine_masks(pixels[None], blocky(truth)[None], radius=PATCH, subsample=1)
    assert boundary_f_score(refined[0].numpy(), truth, 1.0).f > 0.9


def test_several_masks_per_image_equal_one_at_a_time(scenes):
    """``(B, K, h, w)`` masks share the image's filter statistics and give each mask's own result."""
    pixels = torch.stack([p for p, _ in scenes[:2]])
    masks = torch.stack([torch.stack([blocky(truth), ~blocky(truth)]) for _, truth in scenes[:2]])
    together = refine_masks(pixels, masks)
    assert together.shape == (2, 2, *pixels.shape[-2:])
    for k in range(2):
        assert torch.equal(together[:, k], refine_masks(pixels, masks[:, k]))


def test_pixels_must_be_uint8_or_unit_floats():
    """0-255 colours as floats would make eps a thousandth of what it means and the edges vanish."""
    lowres = torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\], got a maximum of 255: divide"):
        refine_masks(torch.full((1, 3, 16, 16), 255.0), lowres)
    with pytest.raises(TypeError, match="uint8 .* or floating point in \\[0, 1\\], got torch.int64"):
        refine_masks(torch.zeros(1, 3, 16, 16, dtype=torch.int64), lowres)
    assert not refine_masks(torch.ones(1, 3, 16, 16), lowres).any()
