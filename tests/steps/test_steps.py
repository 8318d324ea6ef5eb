"""Unit tests of each pipeline step (docs/algorithm.md steps 2-7) on planted features.

Every test builds small tensors whose correct answer is known by construction, so a
step that deviates from the specification fails its test. No backbone is run except the
bundled tiny one, for the positional basis checks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import insid3_core.debias as debias_module
from insid3_core import TEST_CHECKPOINT, QualityThresholds, load_backbone, quality_report
from insid3_core.aggregation import cluster_scores
from insid3_core.clustering import cluster_patches
from insid3_core.debias import debias, positional_basis, positional_directions
from insid3_core.matching import backward_match, downsample_mask, forward_candidates, reference_prototype
from insid3_core.upsample import upsample_mask
from insid3_core.metrics import same_partition


@pytest.fixture(scope="module")
def backbone():
    """The bundled random-weight tiny DINOv3 (width C = 96)."""
    return load_backbone(TEST_CHECKPOINT, device="cpu")


def unit(*components: float) -> torch.Tensor:
    """A float32 vector from its components, L2-normalised."""
    return F.normalize(torch.tensor(components, dtype=torch.float32), dim=0)




# --- step 2: positional basis and debiasing --------------------------------------------


def test_debias_removes_a_planted_positional_component():
    generator = torch.Generator().manual_seed(0)
    channels, components, patches = 16, 4, 10
    rotation, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    basis = rotation[:, :components]
    content = torch.randn(patches, channels - components, generator=generator, dtype=torch.float64)
    semantic = content @ rotation[:, components:].T  # orthogonal to the basis by construction
    positional = torch.randn(patches, components, generator=generator, dtype=torch.float64) @ basis.T
    clean = debias(semantic, basis)
    biased = debias(semantic + 3.0 * positional, basis)

    torch.testing.assert_close(biased @ basis, torch.zeros(patches, components, dtype=torch.float64))
    torch.testing.assert_close(biased, clean)
    torch.testing.assert_close(biased, F.normalize(semantic, dim=1))
    torch.testing.assert_close(biased.norm(dim=1), torch.ones(patches, dtype=torch.float64))


def test_debias_keeps_leading_dimensions():
    basis = torch.eye(4)[:, :1]
    features = torch.tensor([[[2.0, 0.0, 3.0, 4.0]], [[-1.0, 1.0, 0.0, 0.0]]])

    debiased = debias(features, basis)

    assert debiased.shape == (2, 1, 4)
    torch.testing.assert_close(debiased, torch.tensor([[[0.0, 0.0, 0.6, 0.8]], [[0.0, 1.0, 0.0, 0.0]]]))


def test_positional_basis_loads_a_basis_file(backbone, tmp_path):
    generator = np.random.default_rng(0)
    basis, _ = np.linalg.qr(generator.normal(size=(backbone.embed_dim, 8)))
    path = tmp_path / "basis.npy"
    np.save(path, basis)

    loaded = positional_basis(backbone, 128, basis_file=path)
    with_matching_count = positional_basis(backbone, 128, components=8, basis_file=path)

    assert loaded.dtype == torch.float32
    assert loaded.shape == (backbone.embed_dim, 8)
    np.testing.assert_array_equal(loaded.numpy(), basis.astype(np.float32))
    torch.testing.assert_close(with_matching_count, loaded)


@pytest.mark.parametrize("shape", [(95, 8), (97, 8), (96,), (8, 96)], ids=str)
def test_positional_basis_rejects_a_file_of_the_wrong_width(backbone, tmp_path, shape):
    path = tmp_path / "basis.npy"
    np.save(path, np.zeros(shape))

    with pytest.raises(ValueError, match="expected \\(96, k\\)"):
        positional_basis(backbone, 128, basis_file=path)


@pytest.mark.parametrize("shape", [(10**7, 10**6), (96, 10**6)], ids=str)
def test_a_basis_file_whose_header_claims_terabytes_is_named_not_allocated(backbone, tmp_path, shape):
    """The header of a 200-byte .npy may claim any shape: loading it whole was a MemoryError."""
    path = tmp_path / "basis.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f8", "fortran_order": False, "shape": shape})
        handle.write(bytes(64))
    with pytest.raises(ValueError, match=f"{path}: "):
        positional_basis(backbone, 128, basis_file=path)
    with pytest.warns(UserWarning, match=f"{path}: "):
        assert debias_module._read_cached(path, backbone.embed_dim) is None


@pytest.mark.parametrize("spoil", ["scaled", "mixed", "repeated"])
def test_positional_basis_rejects_a_file_whose_columns_are_not_orthonormal(backbone, tmp_path, spoil):
    """Debiasing computes ``x - U Uᵀ x``: only orthonormal columns remove a subspace (and nothing else)."""
    basis, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(backbone.embed_dim, 8)))
    spoilt = {"scaled": basis * 2.0, "mixed": basis @ np.triu(np.ones((8, 8))),
              "repeated": basis[:, [0, 1, 2, 3, 4, 5, 6, 6]]}[spoil]
    path = tmp_path / "basis.npy"
    np.save(path, spoilt)
    with pytest.raises(ValueError, match=f"{path}: the positional basis's columns are not orthonormal"):
        positional_basis(backbone, 128, basis_file=path)
    np.save(path, (basis + 1e-5).astype(np.float32))  # rounding of a saved float32 SVD is accepted
    assert positional_basis(backbone, 128, basis_file=path).shape == (backbone.embed_dim, 8)


def test_positional_basis_rejects_components_that_differ_from_the_file(backbone, tmp_path):
    path = tmp_path / "basis.npy"
    np.save(path, np.eye(backbone.embed_dim)[:, :8])

    with pytest.raises(ValueError, match="holds 8 components, svd_components=9"):
        positional_basis(backbone, 128, components=9, basis_file=path)


@pytest.mark.parametrize("components", [96, 97, 500])
def test_positional_basis_rejects_components_not_below_the_width(backbone, components):
    with pytest.raises(ValueError, match="backbone width C=96"):
        positional_basis(backbone, 128, components=components)


def test_positional_basis_rejects_a_file_as_wide_as_the_backbone(backbone, tmp_path):
    path = tmp_path / "basis.npy"
    np.save(path, np.eye(backbone.embed_dim))

    with pytest.raises(ValueError, match="backbone width C=96"):
        positional_basis(backbone, 128, basis_file=path)


def test_positional_directions_are_cached_and_reloaded(backbone, tmp_path, monkeypatch):
    computed = positional_directions(backbone, 64, cache=tmp_path)
    cached = sorted(tmp_path.iterdir())

    assert [path.name for path in cached] == [f"positional_{backbone.identity}_s64.npy"]
    assert computed.shape == (backbone.embed_dim, 16)  # r = min(C, h*w) = min(96, 4*4)
    torch.testing.assert_close(computed.T @ computed, torch.eye(16), atol=1e-5, rtol=0)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the cached directions should have been loaded, not recomputed")

    monkeypatch.setattr(debias_module, "patch_features", no_backbone)
    reloaded = positional_directions(backbone, 64, cache=tmp_path)

    np.testing.assert_array_equal(reloaded.numpy(), computed.numpy())


def test_a_cache_that_cannot_be_written_is_a_warning_and_the_directions_are_still_computed(backbone, tmp_path):
    """A cache folder that cannot exist (under a file here; a read-only disk elsewhere)."""
    (tmp_path / "a-file").write_text("")
    with pytest.warns(UserWarning, match="cannot write the positional-basis cache .*going on without it"):
        directions = positional_directions(backbone, 64, cache=tmp_path / "a-file" / "cache")
    np.testing.assert_array_equal(directions.numpy(), positional_directions(backbone, 64).numpy())


def test_positional_directions_of_random_weights_are_never_cached(backbone, tmp_path):
    anonymous = dataclasses.replace(backbone, identity=None)

    positional_directions(anonymous, 32, cache=tmp_path)

    assert list(tmp_path.iterdir()) == []


# --- step 3: reference masks at feature resolution and prototype -----------------------


def test_downsample_mask_takes_bilinear_then_nearest_then_centroid():
    # s = 64 on a 4x4 grid: bilinear samples pixels 7.5, 23.5, 39.5, 55.5; nearest samples 0, 16, 32, 48.
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    masks[0, 4:28, 4:28] = True  # covers the bilinear samples of cells (0..1, 0..1); nearest only sees (1, 1)
    masks[1, :, 16] = True  # one pixel wide: invisible to bilinear, column 1 for nearest
    masks[2, 40, 21] = True  # a single pixel seen by neither: its own cell (40 // 16, 21 // 16)
    masks[3, 1, 1] = masks[3, 61, 61] = True  # two corner pixels: centroid (31, 31) -> cell (1, 1)

    low = downsample_mask(masks, (4, 4))

    expected = torch.zeros(4, 4, 4, dtype=torch.bool)
    expected[0, :2, :2] = True
    expected[1, :, 1] = True
    expected[2, 2, 1] = True
    expected[3, 1, 1] = True
    assert torch.equal(low, expected)


def test_reference_prototype_of_a_planted_category_is_its_direction():
    generator = torch.Generator().manual_seed(0)
    category = unit(1.0, 2.0, -1.0, 0.5, 0.0, 3.0)
    features = F.normalize(torch.randn(3, 12, 6, generator=generator), dim=-1)
    masks = torch.zeros(3, 12, dtype=torch.bool)
    masks[0, [0, 1, 2]] = masks[1, [5]] = masks[2, [3, 7, 8, 11]] = True
    features[masks] = category

    prototype = reference_prototype(features, masks)

    torch.testing.assert_close(prototype, category)


def test_reference_prototype_averages_per_reference_means_and_skips_empty_masks():
    e0, e1, e2 = torch.eye(3)
    features = torch.stack(
        [
            torch.stack([e0, e0, e0, e2]),  # three patches of e0 in the mask
            torch.stack([e2, e1, e2, e2]),  # one patch of e1 in the mask
            torch.stack([e2, e2, e2, e2]),  # empty mask: must not count
        ]
    )
    masks = torch.tensor([[True, True, True, False], [False, True, False, False], [False] * 4])

    prototype = reference_prototype(features, masks)

    # mean of the two per-reference means (e0 + e1) / 2, not the pooled (3 e0 + e1) / 4
    torch.testing.assert_close(prototype, unit(1.0, 1.0, 0.0))


# --- step 4: candidate patches ---------------------------------------------------------


def test_forward_candidates_keep_strictly_positive_similarities():
    similarity = torch.tensor([[0.3, -0.2, 0.0, 0.01, -1.0, 0.9]])

    assert forward_candidates(similarity).tolist() == [[True, False, False, True, False, True]]


def test_forward_candidates_fall_back_to_the_top_tenth_per_target():
    generator = torch.Generator().manual_seed(0)
    negative = -(torch.randperm(100, generator=generator).float() + 1.0) / 128.0  # -1/128 ... -100/128
    positive = torch.linspace(-1.0, 1.0, 100)
    similarity = torch.stack([negative, positive])

    candidates = forward_candidates(similarity)

    # 0.9 quantile (linear) of 100 values lies between the 90th and 91st smallest: the top 10 pass
    assert torch.equal(candidates[0], negative > -11.0 / 128.0)
    assert int(candidates[0].sum()) == 10
    assert torch.equal(candidates[1], positive > 0)


def test_forward_candidates_fallback_is_strictly_above_the_quantile():
    # 11 values: the 0.9 quantile lies at the 9th/10th smallest, both -2, so it is exactly -2
    similarity = torch.tensor([[-2.0, -1.0, -9.0, -8.0, -7.0, -2.0, -6.0, -5.0, -4.0, -3.0, -2.5]])

    assert forward_candidates(similarity).tolist() == [[False, True] + [False] * 9]


REFERENCE_PATCHES = {
    # patch order of each reference (rows of the identity) and its feature-resolution mask
    "A": ([0, 1, 2], [True, True, False]),  # votes for target patches 0 and 1
    "B": ([2, 0, 1], [False, True, False]),  # votes for target patch 0
    "C": ([1, 2, 0], [True, True, False]),  # votes for target patches 1 and 2
}


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ("A", [True, True, False]),
        ("B", [True, False, False]),
        ("AB", [True, True, False]),  # S = 2 needs ceil(2 / 2) = 1 vote: patch 1 has one
        ("BC", [True, True, True]),
        ("ABC", [True, True, False]),  # S = 3 needs 2 votes: patch 2 has one
    ],
    ids=["S1-A", "S1-B", "S2-AB", "S2-BC", "S3-ABC"],
)
def test_backward_candidates_need_a_majority_of_references(names, expected):
    identity = torch.eye(3)
    target = identity[None]  # one target whose patch i is e_i
    references = torch.stack([identity[REFERENCE_PATCHES[name][0]] for name in names])
    masks = torch.tensor([REFERENCE_PATCHES[name][1] for name in names])

    assert backward_match(target, references, masks)[0].tolist() == [expected]


def test_backward_candidates_break_ties_by_first_reference_patch():
    target = torch.eye(2)[None]
    references = torch.eye(2)[[0, 0, 1]][None]  # patches 0 and 1 are both e0

    votes_first = backward_match(target, references, torch.tensor([[True, False, False]]))[0]
    votes_second = backward_match(target, references, torch.tensor([[False, True, False]]))[0]

    assert votes_first.tolist() == [[True, False]]
    assert votes_second.tolist() == [[False, False]]


def test_backward_vote_threshold_is_the_ceiling_of_half():
    # S = 4 needs ceil(4 / 2) = 2 votes, S = 5 needs 3: one target patch with exactly 2 votes
    target = torch.eye(2)[None]
    references = torch.eye(2)[None].repeat(5, 1, 1)
    masks = torch.tensor([[True, False]] * 2 + [[False, False]] * 3)

    assert backward_match(target, references[:4], masks[:4])[0].tolist() == [[True, False]]
    assert backward_match(target, references, masks)[0].tolist() == [[False, False]]


# --- step 5: clustering ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["scipy", "torch"])
def test_cluster_patches_finds_two_planted_groups(method):
    generator = torch.Generator().manual_seed(0)
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0]
    centres = torch.eye(8)[groups]
    features = F.normalize(centres + 0.1 * torch.randn(10, 8, generator=generator), dim=1)

    labels = cluster_patches(features, tau=0.6, method=method)

    assert labels.dtype == torch.int64
    assert sorted(set(labels.tolist())) == [0, 1]
    assert same_partition(labels, groups)


@pytest.mark.parametrize(
    "other",
    [
        [0.5, 0.5, 0.5, 0.5],  # x . y = 0.5, distance 0.5
        [0.75, 0.5, 0.25, 0.25, 0.25],  # x . y = 0.75, distance 0.25
    ],
    ids=["similarity-0.5", "similarity-0.75"],
)
@pytest.mark.parametrize("method", ["scipy", "torch"])
def test_cluster_patches_do_not_merge_at_exactly_the_threshold(other, method):
    # unit vectors with dyadic components: the similarity, 1 - tau and the distance are exact
    features = torch.zeros(2, len(other))
    features[0, 0] = 1.0
    features[1] = torch.tensor(other)
    similarity = other[0]

    at_threshold = cluster_patches(features, tau=similarity, method=method)
    below_threshold = cluster_patches(features, tau=similarity - 1e-6, method=method)

    assert at_threshold[0] != at_threshold[1]
    assert below_threshold[0] == below_threshold[1]


@pytest.mark.parametrize("method", ["scipy", "torch"])
def test_cluster_patches_use_average_linkage(method):
    # a at 0°, b at 20°, c at 60°: d(a,b) = 0.060, d(b,c) = 0.234, d(a,c) = 0.5;
    # average distance between {a, b} and c is 0.367
    angles = torch.deg2rad(torch.tensor([0.0, 20.0, 60.0]))
    features = torch.stack([angles.cos(), angles.sin()], dim=1)

    cut_at_0_3 = cluster_patches(features, tau=0.7, method=method)  # single linkage would merge c (0.234 < 0.3)
    cut_at_0_4 = cluster_patches(features, tau=0.6, method=method)  # complete linkage would not (0.5 > 0.4)

    assert same_partition(cut_at_0_3, [0, 0, 1])
    assert same_partition(cut_at_0_4, [0, 0, 0])


@pytest.mark.parametrize("method", ["scipy", "torch"])
def test_cluster_patches_of_a_single_patch(method):
    assert cluster_patches(unit(1.0, 0.0)[None], tau=0.6, method=method).tolist() == [0]


# --- step 6: seed and aggregation ------------------------------------------------------


def test_cluster_scores_of_a_planted_category():
    e = torch.eye(8)
    prototype = e[0]
    half = unit(1.0, 1.0)
    # cluster 2: category core, the seed (debiased prototype == p), 1 of its 4 patches a candidate
    # cluster 0: category part, cross 1/√2, intra 1/√2, both patches candidates
    # cluster 1: as similar to p as the seed but no candidate: neither seed nor scored
    # cluster 3: background, no candidate
    labels = torch.tensor([2, 2, 2, 2, 0, 0, 1, 1, 3, 3])
    candidates = torch.tensor([True, False, False, False, True, True, False, False, False, False])
    debiased = torch.stack([e[0]] * 4 + [F.pad(half, (0, 6))] * 2 + [e[0]] * 2 + [e[2]] * 2)
    original = torch.stack([e[4]] * 4 + [F.pad(half, (4, 2))] * 2 + [e[4]] * 2 + [e[6]] * 2)
    similarity = debiased @ prototype

    scores = cluster_scores(labels[None], candidates[None, None], original[None], debiased[None], similarity[None, None], prototype[None])

    # seed: cross 1 * intra 1 * area forced to 1 (not 1/4); cluster 0: (1/√2)(1/√2) * 2/2
    torch.testing.assert_close(scores[0, 0], torch.tensor([0.5, 0.0, 1.0, 0.0]))
    assert (scores[0, 0, labels] > 0.2).tolist() == [True] * 6 + [False] * 4


def test_cluster_scores_of_a_batch_equal_each_target_and_class_alone():
    """Targets with different cluster counts and classes with different candidates, scored
    together, score as each (class, target) alone; clusters past a target's own count score 0."""
    generator = torch.Generator().manual_seed(0)
    batch, count, channels, classes = 3, 40, 6, 2
    labels = torch.stack([torch.randint(clusters, (count,), generator=generator) for clusters in (3, 9, 5)])
    labels[:, :9] = torch.arange(9) % labels.max(dim=1, keepdim=True).values.add(1)  # every label present
    features = F.normalize(torch.randn(batch, count, channels, generator=generator), dim=2)
    debiased = F.normalize(torch.randn(batch, count, channels, generator=generator), dim=2)
    prototypes = F.normalize(torch.randn(classes, channels, generator=generator), dim=1)
    similarity = torch.einsum("bnc,kc->kbn", debiased, prototypes)
    candidates = torch.rand(classes, batch, count, generator=generator) > 0.7

    scores = cluster_scores(labels, candidates, features, debiased, similarity, prototypes)

    assert scores.shape == (classes, batch, 9)
    for b in range(batch):
        own = int(labels[b].max()) + 1
        assert torch.equal(scores[:, b, own:], torch.zeros(classes, 9 - own))
        for k in range(classes):
            alone = cluster_scores(
                labels[b : b + 1], candidates[k : k + 1, b : b + 1], features[b : b + 1], debiased[b : b + 1],
                similarity[k : k + 1, b : b + 1], prototypes[k : k + 1],
            )
            torch.testing.assert_close(scores[k, b, :own], alone[0, 0])


# --- step 7: back to the target's pixels -----------------------------------------------


@pytest.mark.parametrize("fill", [True, False])
def test_upsample_mask_of_a_uniform_mask(fill):
    lowres = torch.full((4, 4), fill)

    mask = upsample_mask(lowres, 64, (37, 53))

    assert mask.shape == (37, 53)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.full((37, 53), fill))


def test_upsample_mask_keeps_the_left_half_left():
    lowres = torch.zeros(4, 4, dtype=torch.bool)
    lowres[:, :2] = True

    mask = upsample_mask(lowres, 64, (40, 60))

    expected = torch.zeros(40, 60, dtype=torch.bool)
    expected[:, :30] = True
    assert torch.equal(mask, expected)


def test_upsample_mask_is_bilinear_not_nearest():
    lowres = torch.zeros(4, 4, dtype=torch.bool)
    lowres[1, 1] = True

    mask = upsample_mask(lowres, 64, (64, 64))

    # weight of cell 1 at pixel i of the 64 px side: the tent 1 - |(i + 0.5) / 16 - 1.5|
    pixels = torch.arange(64, dtype=torch.float64)
    tent = (1.0 - ((pixels + 0.5) / 16.0 - 1.5).abs()).clamp(min=0.0)
    expected = tent[:, None] * tent[None, :] > 0.5
    assert torch.equal(mask, expected)
    assert 0 < int(mask.sum()) < 16 * 16  # nearest would fill the whole 16x16 cell



# --- quality verdicts ------------------------------------------------------------------


def blocks(*corners: tuple[int, int], size: int = 2) -> np.ndarray:
    """A 10x10 mask holding ``size``-square blocks at the given top-left corners."""
    mask = np.zeros((10, 10), dtype=bool)
    for row, column in corners:
        mask[row : row + size, column : column + size] = True
    return mask


THRESHOLDS = QualityThresholds(min_area_ratio=0.05, max_area_ratio=0.5, max_components=2)


@pytest.mark.parametrize(
    ("mask", "verdict"),
    [
        (np.zeros((10, 10), dtype=bool), "empty"),
        (blocks((0, 0), (0, 2)), "ok"),  # one 2x4 region, 8 % of the image
        (blocks((0, 0), (2, 2), (4, 4)), "ok"),  # diagonal neighbours: one region (8-connectivity)
        (blocks((0, 0), size=1), "too_small"),
        (blocks((0, 0), (0, 8), (8, 0)), "fragmented"),  # 3 regions > 2
        (blocks((0, 0), size=8), "too_large"),  # 64 %
        (blocks((0, 0), (9, 9), size=1), "too_small"),  # too small wins over fragmented
    ],
    ids=["empty", "ok", "ok-diagonal", "too-small", "fragmented", "too-large", "small-and-fragmented"],
)
def test_quality_report_verdicts(mask, verdict):
    assert quality_report(mask, THRESHOLDS).verdict == verdict


def test_quality_report_numbers():
    mask = blocks((0, 0), (6, 6), size=3)
    mask[0, 3] = True

    report = quality_report(mask, THRESHOLDS)

    assert report.as_dict() == {
        "verdict": "ok",
        "area_ratio": 0.19,
        "components": 2,
        "largest_component_ratio": 10 / 19,
    }


def test_quality_report_of_an_empty_mask_has_no_division_by_zero():
    report = quality_report(np.zeros((3, 4), dtype=bool))

    assert (report.verdict, report.area_ratio, report.components, report.largest_component_ratio) == (
        "empty",
        0.0,
        0,
        0.0,
    )


@pytest.mark.parametrize(
    "limits",
    [
        {"min_area_ratio": -0.1},
        {"min_area_ratio": 0.6, "max_area_ratio": 0.5},
        {"max_area_ratio": 1.5},
        {"max_components": 0},
    ],
    ids=["negative-min", "min-above-max", "max-above-1", "no-component"],
)
def test_quality_thresholds_reject_invalid_limits(limits):
    with pytest.raises(ValueError):
        QualityThresholds(**limits)

