"""The Triton clustering (one nearest-neighbour-chain program per target) gives scipy's partition.

Without a CUDA device the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
here before the kernel is first defined), the way CI checks its exactness; on a CUDA machine the
same tests launch it on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from data import EXAMPLES, ROOT  # noqa: E402
from insid3_core import EngineConfig, Segmenter, clustering  # noqa: E402
from insid3_core import triton_clustering  # noqa: E402
from insid3_core.clustering import cluster_patches  # noqa: E402
from insid3_core.features import patch_features, resized_pixels  # noqa: E402
from insid3_core.io import load_image  # noqa: E402
from insid3_core.metrics import same_partition  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = sorted((EXAMPLES / "targets").glob("*.png"))


def assert_scipy_partitions(features: torch.Tensor, tau: float) -> list[int]:
    """Cluster ``(B, N, C)`` features in one Triton launch and compare each target with scipy;
    returns the cluster counts."""
    batched = cluster_patches(features.to(DEVICE), tau, "triton").cpu().numpy()
    counts = []
    for target, labels in zip(features, batched):
        expected = cluster_patches(target, tau, "scipy").numpy()
        assert same_partition(expected, labels), f"tau {tau}: partition differs from scipy's"
        counts.append(len(set(expected.tolist())))
        assert sorted(set(labels.tolist())) == list(range(counts[-1])), "labels are 0..K-1"
    return counts


def random_targets(batch: int, count: int, channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, count, channels, generator=generator), dim=2)


def structured_targets(count: int, channels: int = 8, seed: int = 3) -> torch.Tensor:
    """``(4, count, channels)``: an arc (chains of merges), blobs of unequal spread, a tight blob
    amid scattered points (one cluster absorbing one point after another), uniform noise."""
    generator = torch.Generator().manual_seed(seed)
    angle = torch.linspace(0.0, 2.5, count)
    arc = torch.zeros(count, channels)
    arc[:, 0], arc[:, 1] = angle.cos(), angle.sin()
    arc += 0.02 * torch.randn(count, channels, generator=generator)
    centres = torch.eye(channels)[torch.randint(0, 4, (count,), generator=generator)]
    spread = torch.tensor([0.05, 0.1, 0.3, 0.5])[torch.randint(0, 4, (count,), generator=generator)]
    blobs = centres + spread[:, None] * torch.randn(count, channels, generator=generator)
    tight = torch.randn(count, channels, generator=generator)
    tight[: count // 2] = torch.eye(channels)[0] + 0.01 * torch.randn(count // 2, channels, generator=generator)
    noise = torch.randn(count, channels, generator=generator)
    return F.normalize(torch.stack([arc, blobs, tight, noise]), dim=2)


@pytest.mark.parametrize("tau", [0.5, 0.6, 0.7])
def test_triton_matches_scipy_on_backbone_features_of_a_batch(tiny_backbone, tau):
    pixels = torch.stack([resized_pixels(load_image(t), 128) for t in TARGETS])
    counts = assert_scipy_partitions(patch_features(tiny_backbone, pixels).cpu(), tau)
    assert len(set(counts)) > 1 and min(counts) > 1, "targets end with different cluster counts"


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.9])
def test_triton_matches_scipy_on_structured_and_random_features(tau):
    assert len(set(assert_scipy_partitions(structured_targets(96), tau))) > 1
    assert_scipy_partitions(random_targets(6, 40, 3, seed=int(10 * tau)), tau)


@pytest.mark.parametrize("count", [2, 3, 5, 17, 64, 65])
def test_triton_matches_scipy_from_two_patches_up(count):
    """Sizes below, at and just past a power of two (the kernel's block)."""
    for tau in (0.3, 0.6, 0.9):
        assert_scipy_partitions(random_targets(3, count, 4, seed=count), tau)


def test_triton_keeps_duplicate_patches_together_and_resolves_ties():
    """Flat regions give identical patches (distance 0, ties everywhere); points on a circle at
    equal steps give ties between neighbours at every height."""
    duplicates = structured_targets(40).repeat_interleave(3, dim=1)
    angles = torch.arange(48) * (2 * torch.pi / 48)
    circle = torch.stack([angles.cos(), angles.sin()], dim=1)[None]
    for tau in (0.5, 0.95):
        assert_scipy_partitions(duplicates, tau)
        assert_scipy_partitions(circle, tau)
    labels = cluster_patches(duplicates.to(DEVICE), 0.9, "triton").cpu()
    assert (labels[:, 0::3] == labels[:, 1::3]).all() and (labels[:, 0::3] == labels[:, 2::3]).all()


@pytest.mark.parametrize("tau", [0.6, 0.8])
def test_triton_planted_groups_threshold_and_average_linkage(tau):
    """The step tests of the other methods: planted groups, no merge at exactly the threshold
    (dyadic unit vectors), average rather than single or complete linkage."""
    generator = torch.Generator().manual_seed(0)
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0]
    planted = F.normalize(torch.eye(8)[groups] + 0.1 * torch.randn(10, 8, generator=generator), dim=1)
    assert same_partition(cluster_patches(planted.to(DEVICE), tau, "triton").cpu(), groups)

    pair = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])  # similarity exactly 0.5
    at, below = (cluster_patches(pair.to(DEVICE), t, "triton").cpu() for t in (0.5, 0.5 - 1e-6))
    assert at[0] != at[1] and below[0] == below[1]

    angles = torch.deg2rad(torch.tensor([0.0, 20.0, 60.0]))
    three = torch.stack([angles.cos(), angles.sin()], dim=1).to(DEVICE)
    assert same_partition(cluster_patches(three, 0.7, "triton").cpu(), [0, 0, 1])
    assert same_partition(cluster_patches(three, 0.6, "triton").cpu(), [0, 0, 0])
    assert cluster_patches(three[:1], 0.6, "triton").tolist() == [0]


def scipy_partition(distances: np.ndarray, threshold: float) -> np.ndarray:
    """scipy's average-linkage partition of an ``(N, N)`` float64 distance matrix, merging below ``threshold``."""
    tree = linkage(squareform(distances, checks=False), method="average")
    return fcluster(tree, t=np.nextafter(threshold, -np.inf), criterion="distance")


def kernel_partition(distances: np.ndarray, threshold: float) -> np.ndarray:
    """The kernel's labels for one ``(N, N)`` float64 distance matrix, on the test's device."""
    batch = torch.from_numpy(distances)[None].to(DEVICE).contiguous()
    return triton_clustering.triton_average_linkage(batch, threshold)[0].cpu().numpy()


@pytest.mark.parametrize("tau", [0.6, 0.3, 0.8])
def test_a_height_between_the_float32_and_float64_threshold_falls_on_scipys_side(tau):
    """A pair at a distance between ``1 - tau`` and its nearest float32: a float32 threshold (what
    Triton makes of a Python float on a GPU) puts it on the wrong side."""
    threshold = 1.0 - tau
    single = float(np.float32(threshold))
    assert single != threshold
    height = (threshold + single) / 2
    pair = np.array([[0.0, height], [height, 0.0]])
    expected = scipy_partition(pair, threshold)
    assert (expected[0] == expected[1]) == (height < threshold)
    assert same_partition(expected, kernel_partition(pair, threshold))


def test_the_average_linkage_update_rounds_as_scipys_does():
    """Four close patches merge into one cluster of 3 and then of 4; the fifth patch's distance to
    it, ``(3 p + q) / 4``, is rounded twice by scipy and once by a fused multiply-add. With the
    threshold at the larger of the two values, only scipy's rounding gives scipy's partition."""
    generator = np.random.default_rng(0)
    while True:
        to_fifth = generator.uniform(0.4, 0.6, 4)
        p = (2 * ((to_fifth[0] + to_fifth[1]) / 2) + to_fifth[2]) / 3  # the cluster of 3 to the fifth
        q = to_fifth[3]
        twice = (3 * p + q) / 4
        once = float(3 * Fraction(p) + Fraction(q)) / 4
        if twice != once:
            break
    distances = np.zeros((5, 5))
    close = {(0, 1): 0.001, (0, 2): 0.002, (1, 2): 0.002, (0, 3): 0.003, (1, 3): 0.003, (2, 3): 0.003}
    for (i, j), value in close.items():
        distances[i, j] = distances[j, i] = value
    distances[:4, 4] = distances[4, :4] = to_fifth
    tree = linkage(squareform(distances, checks=False), method="average")
    assert tree[-1, 2] == twice, "scipy rounds the update twice"
    threshold = max(twice, once)
    expected = scipy_partition(distances, threshold)
    assert same_partition(expected, kernel_partition(distances, threshold))


def test_triton_splits_a_batch_into_chunks_that_fit_its_memory_budget(monkeypatch):
    features = structured_targets(50)
    if DEVICE == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        monkeypatch.setattr(clustering, "TORCH_MEMORY_SHARE", 2 * 12 * 50**2 / total)
    else:
        monkeypatch.setattr(clustering, "TORCH_MEMORY_BUDGET", 2 * 12 * 50**2)  # two targets' worth
    chunks = []
    linkage = triton_clustering.triton_average_linkage
    monkeypatch.setattr(triton_clustering, "triton_average_linkage",
                        lambda distances, threshold: chunks.append(len(distances)) or linkage(distances, threshold))
    assert_scipy_partitions(features, 0.6)
    assert chunks == [2, 2]


COMPILE_FOR_GPUS = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from insid3_core.triton_clustering import _kernel, launch_options

signature = {"distances": "*fp64", "sizes": "*fp64", "active": "*i32", "chain": "*i32", "parent": "*i32",
             "count": "i32", "threshold_pointer": "*fp64", "BLOCK": "constexpr"}
found = []
for arch in json.loads(sys.argv[1]):
    for count in (40, 4096):
        options = launch_options(count)
        block = options.pop("BLOCK")
        compiled = triton.compile(ASTSource(fn=_kernel(), signature=signature, constexprs={"BLOCK": block}),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        found.append({"arch": arch, "block": block, "cubin": len(compiled.asm["cubin"]),
                      "fma": ptx.count("fma.rn.f64"), "non_coherent_loads": ptx.count("ld.global.nc")})
print(json.dumps(found))
"""


def test_the_kernel_compiles_for_ampere_hopper_and_blackwell_gpus_as_scipy_rounds(tmp_path):
    """The interpreter does not compile the kernel: here Triton's own compiler and ptxas build it
    for sm_80, sm_90 and sm_100 (no GPU needed), with the launch's options. The PTX must have no
    fused multiply-add (the update rounds twice, as scipy's) and no non-coherent loads (the
    program reads back what it wrote)."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: every build really compiles
    archs = [80, 90, 100]
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPUS, json.dumps(archs)], capture_output=True,
                            text=True, env=environment, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    builds = json.loads(result.stdout.splitlines()[-1])
    assert [(b["arch"], b["block"]) for b in builds] == [(a, block) for a in archs for block in (64, 2048)]
    for build in builds:
        assert build["cubin"] > 0 and build["fma"] == 0 and build["non_coherent_loads"] == 0, build


def test_the_engine_with_triton_clustering_gives_scipys_masks(tiny_backbone):
    reference = [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]
    masks = {}
    for method in ("scipy", "triton"):
        segmenter = Segmenter(tiny_backbone, EngineConfig(image_size=128, svd_components=16, clustering=method),
                              cache=False)
        masks[method] = [p.mask for p in segmenter.segment(segmenter.encode({"object": reference}), TARGETS[:4])]
    for scipy_mask, triton_mask in zip(masks["scipy"], masks["triton"]):
        np.testing.assert_array_equal(scipy_mask, triton_mask)


def test_triton_on_the_cpu_without_the_interpreter_is_refused(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the CPU refusal is checked where there is no GPU")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="clustering='triton' needs a CUDA device"):
        cluster_patches(random_targets(1, 8, 3, seed=0), 0.6, "triton")


def test_a_failing_launch_falls_back_to_torch_with_a_warning(monkeypatch):
    """``auto`` on a GPU whose compiler or driver rejects the kernel warns once and clusters with torch."""
    features = random_targets(2, 30, 3, seed=1)

    def broken(distances, threshold):
        raise RuntimeError("PTX compilation failed")

    monkeypatch.setattr(triton_clustering, "triton_average_linkage", broken)
    monkeypatch.setattr(clustering, "_TRITON_FAILED", [])
    with pytest.warns(UserWarning, match="the Triton clustering failed .*PTX compilation failed.*torch"):
        labels = clustering._triton_clustering(features.to(DEVICE), 0.6, required=False)
    for target, found in zip(features, labels.cpu()):
        assert same_partition(cluster_patches(target, 0.6, "scipy"), found)
    assert not clustering.triton_usable(), "later batches go to torch at once"
    with pytest.raises(RuntimeError, match="PTX"):
        clustering._triton_clustering(features.to(DEVICE), 0.6, required=True)


@pytest.mark.slow
def test_triton_matches_scipy_on_many_random_targets():
    """Dozens of batches of small targets in 2-5 dimensions at three tau, and larger structured ones."""
    generator = torch.Generator().manual_seed(7)
    for index in range(12):
        channels, count = int(torch.randint(2, 6, (1,), generator=generator)), int(torch.randint(8, 60, (1,), generator=generator))
        for tau in (0.3, 0.6, 0.9):
            assert_scipy_partitions(random_targets(8, count, channels, seed=100 + index), tau)
    for tau in (0.3, 0.6, 0.9):
        assert_scipy_partitions(structured_targets(200), tau)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("side", [1024, pytest.param(2048, marks=pytest.mark.slow)])
def test_triton_matches_scipy_at_full_resolution_on_cuda(tiny_backbone, side):
    """N = 4096 and 16 384 patches (1024 and 2048 px; scipy takes minutes on the latter), a
    batch of 2, on the GPU."""
    pixels = torch.stack([resized_pixels(load_image(t), side) for t in TARGETS[:2]])
    features = patch_features(tiny_backbone, pixels).cpu()
    assert_scipy_partitions(features, 0.6)
