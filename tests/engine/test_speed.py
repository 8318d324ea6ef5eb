"""The speed-ups keep results: torch clustering, threaded loading, references encoded once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data import EXAMPLES
from insid3_core import EngineConfig, InputError, Segmenter, clustering
from insid3_core.clustering import (
    _cosine_distances,
    _NearestNeighbourLinkage,
    _RoundGraph,
    _torch_average_linkage,
    cluster_patches,
)
from insid3_core.features import patch_features, resized_pixels
from insid3_core.io import load_image
from insid3_core.metrics import same_partition

REFERENCE = (EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")
TARGETS = sorted((EXAMPLES / "targets").glob("*.png"))
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])]




@pytest.mark.parametrize("tau", [0.5, 0.6, 0.7])
def test_batched_torch_clustering_matches_scipy_on_backbone_features(tiny_backbone, tau):

    pixels = torch.stack([resized_pixels(load_image(t), 512) for t in TARGETS])
    features = patch_features(tiny_backbone, pixels)
    batched = cluster_patches(features, tau, "torch").numpy()  # all targets in one padded batch
    counts = set()
    for target, torch_labels in zip(features, batched):
        scipy_labels = cluster_patches(target, tau, "scipy").numpy()
        counts.add(len(set(scipy_labels.tolist())))
        assert same_partition(scipy_labels, torch_labels)
    assert len(counts) > 1 and min(counts) > 1  # targets end with different cluster counts


def structured_targets(count: int = 300, channels: int = 16):
    """``(5, count, channels)`` L2-normalised features whose clusterings take different routes.

    An arc (chains of merges), blobs of unequal spread, one tight blob amid scattered points
    (a large cluster absorbing one point per round), uniform noise, and a mix of all three.
    """

    generator = torch.Generator().manual_seed(3)

    def noise(scale):
        return scale * torch.randn(count, channels, generator=generator)

    angle = torch.linspace(0.0, 2.5, count)
    arc = torch.zeros(count, channels)
    arc[:, 0], arc[:, 1] = angle.cos(), angle.sin()
    centres = torch.randn(6, channels, generator=generator)
    blob = torch.randint(0, 6, (count,), generator=generator)
    spread = torch.tensor([0.05, 0.1, 0.2, 0.3, 0.5, 0.8])[blob, None]
    blobs = centres[blob] + spread * torch.randn(count, channels, generator=generator)
    absorbing = torch.where(torch.arange(count)[:, None] < count // 3, centres[0] + noise(0.05), noise(1.0) + centres[0])
    mixed = torch.cat([arc[: count // 3], blobs[count // 3 : 2 * count // 3], absorbing[2 * count // 3 :]])
    features = torch.stack([arc + noise(0.02), blobs, absorbing, noise(1.0), mixed + noise(0.05)])
    return torch.nn.functional.normalize(features, dim=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [0.2, 0.5, 0.8, 0.95])
def test_batched_torch_clustering_matches_scipy_on_structured_features(tau, device):
    features = structured_targets()
    batched = cluster_patches(features.to(device), tau, "torch").cpu().numpy()
    counts = []
    for target, torch_labels in zip(features, batched):
        scipy_labels = cluster_patches(target, tau, "scipy").numpy()
        counts.append(len(set(scipy_labels.tolist())))
        assert same_partition(scipy_labels, torch_labels)
        assert sorted(set(torch_labels.tolist())) == list(range(counts[-1]))
    assert len(set(counts)) > 1
    assert not _RoundGraph.unavailable


def small_random_targets(batches: int, seed: int = 0):
    """``batches`` batches of 32 small targets ``(32, N, C)``, N in 8..59, C in 2..5, L2-normalised."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        channels = int(torch.randint(2, 6, (1,), generator=generator))
        count = int(torch.randint(8, 60, (1,), generator=generator))
        yield torch.nn.functional.normalize(torch.randn(32, count, channels, generator=generator), dim=2)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_clustering_matches_scipy_on_many_small_random_targets(device):
    """Hundreds of small targets in 2-5 dimensions: ties of order, chains and thresholds met
    in every combination the merges, their cached neighbours and absorbed chains can meet
    (on CUDA, in rounds replayed from captured graphs)."""
    for features in small_random_targets(24):
        for tau in (0.3, 0.6, 0.9):
            batched = cluster_patches(features.to(device), tau, "torch").cpu().numpy()
            for target, torch_labels in zip(features, batched):
                assert same_partition(cluster_patches(target, tau, "scipy").numpy(), torch_labels)
    assert not _RoundGraph.unavailable  # on CUDA the rounds ran from captured graphs


@pytest.mark.slow
@pytest.mark.parametrize("slot_limits, rounds_per_check", [((1, 1), None), ((1, 3), 3), ((2, 2), None), ((4, 16), 4), (None, 4)])
def test_torch_clustering_matches_scipy_when_rounds_leave_work_for_later(slot_limits, rounds_per_check):
    """Rounds that take only some of the mutual pairs and search only some of the rows (the
    others wait, stale), and several rounds between two reads of the state as on a GPU."""
    for features in small_random_targets(6, seed=1):
        for tau in (0.3, 0.6, 0.9):
            batched = _torch_average_linkage(features, 1.0 - tau, slot_limits, rounds_per_check).numpy()
            for target, torch_labels in zip(features, batched):
                assert same_partition(cluster_patches(target, tau, "scipy").numpy(), torch_labels)


class EagerGraph:
    """Stands for a captured ``torch.cuda.CUDAGraph`` on the CPU: a replay runs the captured
    round again, and only on the tensors it was captured with."""

    def __init__(self, state, arguments) -> None:
        self.state, self.arguments, self.sums = state, arguments, state.sums

    def replay(self) -> None:
        assert self.state.sums is self.sums, "replayed after the matrices changed: a real graph would write to freed memory"
        self.state.merge_round(*self.arguments)


class EagerRoundGraph(_RoundGraph):
    """:class:`_RoundGraph` with :class:`EagerGraph` captures, counting them."""

    def __init__(self) -> None:
        super().__init__()
        self.captures = 0

    def _capture(self, state, arguments):
        state.merge_round(*arguments)  # the warm-up round, as in the real capture
        self.captures += 1
        return EagerGraph(state, arguments)


@pytest.mark.parametrize("slot_limits", [None, (2, 8)])  # (2, 8): the slots never change, the matrices shrink
def test_graph_replays_give_scipy_partitions_and_capture_again_when_the_round_changes(slot_limits):
    """The replay bookkeeping the GPU runs (capture when slots or matrices change, the warm-up
    counted as a round, several replays per read of the state), with eager graphs on the CPU."""
    captures = []
    for features in small_random_targets(4, seed=2):
        for tau in (0.3, 0.6, 0.9):
            state = _NearestNeighbourLinkage(_cosine_distances(features), 1.0 - tau)
            graph = EagerRoundGraph()
            state.run(slot_limits, 4, graph)
            captures.append(graph.captures)
            for target, torch_labels in zip(features, state.labels().numpy()):
                assert same_partition(cluster_patches(target, tau, "scipy").numpy(), torch_labels)
    assert min(captures) >= 1 and max(captures) > 2


class RecordedOperations(TorchDispatchMode):
    """Records each aten operation run inside it: its name, the shapes of its outputs, and
    whether it reads a tensor's values back to the host or copies a host value in."""

    HOST_READS = {"nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "unique", "repeat_interleave", "lift_fresh"}

    def __init__(self) -> None:
        super().__init__()
        self.operations, self.host_reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in self.HOST_READS or bool_index:
            self.host_reads.append(str(func))
        outputs = output if isinstance(output, (tuple, list)) else [output]
        self.operations.append((str(func), tuple(tuple(o.shape) for o in outputs if isinstance(o, torch.Tensor))))
        return output


@pytest.mark.parametrize("chains", [False, True])
def test_a_clustering_round_has_fixed_shapes_and_reads_nothing_back(chains):
    """What lets a GPU replay rounds from one captured CUDA graph: whatever the state, a round
    runs the same operations on the same shapes, and none reads a value back to the host."""
    generator = torch.Generator().manual_seed(3)
    runs = []
    for _ in range(3):
        features = torch.nn.functional.normalize(torch.randn(4, 50, 3, generator=generator), dim=2)
        state = _NearestNeighbourLinkage(_cosine_distances(features), 0.6)
        for _ in range(2):
            with RecordedOperations() as recorded:
                state.merge_round(8, 32, chains)
            assert recorded.host_reads == []
            runs.append(recorded.operations)
    assert all(run == runs[0] for run in runs)
    assert any("topk" in name for name, _ in runs[0]) and any("index_add_" in name for name, _ in runs[0])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_clustering_splits_a_batch_into_chunks_that_fit_its_memory_budget(monkeypatch, device):
    features = structured_targets().to(device)  # 5 targets of 300 patches
    budget = 2 * 32 * 300**2  # two targets' worth
    if device == "cuda":
        monkeypatch.setattr(clustering, "TORCH_MEMORY_SHARE", budget / torch.cuda.get_device_properties(0).total_memory)
    else:
        monkeypatch.setattr(clustering, "TORCH_MEMORY_BUDGET", budget)
    chunks = []
    linkage = clustering._torch_average_linkage

    def recorded_linkage(part, threshold):
        chunks.append(len(part))
        return linkage(part, threshold)

    monkeypatch.setattr(clustering, "_torch_average_linkage", recorded_linkage)
    labels = cluster_patches(features, 0.6, "torch").cpu().numpy()
    assert chunks == [2, 2, 1]
    for target, torch_labels in zip(features.cpu(), labels):
        assert same_partition(cluster_patches(target, 0.6, "scipy").numpy(), torch_labels)


def test_torch_clustering_keeps_duplicate_patches_together():

    features = structured_targets()[:2].repeat_interleave(2, dim=1)  # every patch twice
    for tau in (0.5, 0.99):
        labels = cluster_patches(features, tau, "torch")
        assert torch.equal(labels[:, 0::2], labels[:, 1::2])
        for target, torch_labels in zip(features, labels.numpy()):
            assert same_partition(cluster_patches(target, tau, "scipy").numpy(), torch_labels)


@pytest.fixture(scope="module")
def segmenter(tiny_backbone):
    return Segmenter(tiny_backbone, EngineConfig(image_size=256, svd_components=16), cache=False)


def test_threaded_stream_equals_direct_batches_and_keeps_order(segmenter, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(TARGETS[0].read_bytes()[:300])
    targets = [TARGETS[0], TARGETS[1], broken, TARGETS[2], TARGETS[3], broken, TARGETS[4]]
    references = segmenter.encode({"object": [REFERENCE]})
    streamed = list(segmenter.iter_segment(references, targets, batch_size=2, workers=3))
    inline = list(segmenter.iter_segment(references, targets, batch_size=2, workers=0))
    assert [target for target, _ in streamed] == targets == [target for target, _ in inline]
    assert isinstance(inline[2][1], InputError) and isinstance(inline[5][1], InputError)
    for (_, threaded), (_, alone) in zip(streamed, inline):
        if not isinstance(alone, InputError):
            np.testing.assert_array_equal(threaded.mask, alone.mask)
    assert isinstance(streamed[2][1], InputError) and "broken.png" in str(streamed[2][1])
    first_failing = list(segmenter.iter_segment(references, [broken, TARGETS[0], TARGETS[1]], batch_size=2))
    assert [target for target, _ in first_failing] == [broken, TARGETS[0], TARGETS[1]]
    direct = segmenter.segment(references, [t for t in targets if t != broken], batch_size=len(targets), workers=0)
    for (_, result), expected in zip([s for s in streamed if s[0] != broken], direct):
        np.testing.assert_array_equal(result.mask, expected.mask)
    with pytest.raises(InputError, match="broken.png"):
        segmenter.segment(references, targets, batch_size=2)


def test_segment_leaves_no_thread_working_after_an_unreadable_target(segmenter, tmp_path):
    import threading

    broken = tmp_path / "broken.png"
    broken.write_bytes(TARGETS[0].read_bytes()[:300])
    references = segmenter.encode({"object": [REFERENCE]})
    before = set(threading.enumerate())
    with pytest.raises(InputError, match="broken.png"):
        segmenter.segment(references, [TARGETS[0], broken, *TARGETS[1:6]], batch_size=1, workers=2)
    left = [thread.name for thread in set(threading.enumerate()) - before if thread.name.startswith("insid3-")]
    assert left == []


def test_next_batch_goes_through_the_backbone_while_the_device_stage_clusters(segmenter, monkeypatch):
    """The device stage of a batch holds until the next batch has entered the backbone: it can end only
    if the two overlap (a sequential engine would leave it waiting)."""
    import threading

    import insid3_core.engine

    entered, overlapped, stages = [threading.Event() for _ in range(3)], [], []
    features, lowres = segmenter._features, insid3_core.engine.lowres_masks

    def recorded_features(*arguments):
        entered[len([e for e in entered if e.is_set()])].set()
        return features(*arguments)

    def waiting_lowres(*arguments, **keywords):
        batch = len(stages)
        stages.append(threading.current_thread().name)
        if batch + 1 < len(entered):
            overlapped.append(entered[batch + 1].wait(timeout=30))
        return lowres(*arguments, **keywords)

    monkeypatch.setattr(segmenter, "_features", recorded_features)
    monkeypatch.setattr(insid3_core.engine, "lowres_masks", waiting_lowres)
    references = segmenter.encode({"object": [REFERENCE]})
    pipelined = [result.mask for _, result in segmenter.iter_segment(references, TARGETS[:6], batch_size=2, workers=2)]

    assert overlapped == [True, True] and len(stages) == 3
    assert all(name.startswith("insid3-device") for name in stages)
    monkeypatch.undo()
    inline = [result.mask for _, result in segmenter.iter_segment(references, TARGETS[:6], batch_size=2, workers=0)]
    assert all(np.array_equal(a, b) for a, b in zip(pipelined, inline))


def test_two_device_threads_take_consecutive_batches_and_keep_the_masks(segmenter, monkeypatch):
    """On a GPU two device threads match and cluster consecutive batches at once (forced here on
    the CPU): the first batch's stage holds until the second's has started in another thread;
    results come out in input order and equal the inline ones."""
    import threading

    import insid3_core.engine

    started, stages = [threading.Event(), threading.Event()], []
    lowres = insid3_core.engine.lowres_masks

    def waiting_lowres(*arguments, **keywords):
        batch = len(stages)
        stages.append(threading.current_thread().name)
        if batch < 2:
            started[batch].set()
            if batch == 0:
                assert started[1].wait(timeout=30), "the second batch never ran beside the first"
        return lowres(*arguments, **keywords)

    monkeypatch.setattr(insid3_core.engine, "device_threads", lambda device: 2)
    monkeypatch.setattr(insid3_core.engine, "lowres_masks", waiting_lowres)
    references = segmenter.encode({"object": [REFERENCE]})
    pipelined = list(segmenter.iter_segment(references, TARGETS[:6], batch_size=2, workers=2))
    monkeypatch.undo()
    inline = segmenter.segment(references, TARGETS[:6], batch_size=2, workers=0)

    assert [target for target, _ in pipelined] == TARGETS[:6]
    assert all(np.array_equal(result.mask, expected.mask) for (_, result), expected in zip(pipelined, inline))
    assert len(set(stages[:2])) == 2 and started[1].is_set()


@pytest.mark.gpu
@NEEDS_CUDA
def test_pipelined_cuda_stream_gives_the_inline_masks():
    from insid3_core import TEST_CHECKPOINT, load_backbone

    cuda = Segmenter(load_backbone(TEST_CHECKPOINT, device="cuda"), EngineConfig(image_size=256, svd_components=16), cache=False)
    references = cuda.encode({"object": [REFERENCE]})
    targets = TARGETS * 3
    pipelined = [result.mask for _, result in cuda.iter_segment(references, targets, batch_size=4, workers=2)]
    inline = [result.mask for _, result in cuda.iter_segment(references, targets, batch_size=4, workers=0)]
    assert all(np.array_equal(a, b) for a, b in zip(pipelined, inline))


@pytest.mark.gpu
@NEEDS_CUDA
def test_worker_cuda_stream_outranks_the_backbone_stream():
    from insid3_core.streams import ready_marker, worker_stream

    features = torch.ones(4, device="cuda")
    with worker_stream(ready_marker(features), [features]):
        stream = torch.cuda.current_stream()
    assert stream.priority < torch.cuda.default_stream().priority


def test_each_reference_passes_the_backbone_once_per_job(segmenter):
    before = segmenter.backbone.images_seen
    references = segmenter.encode({"object": [REFERENCE, (TARGETS[1], EXAMPLES / "masks" / TARGETS[1].name)]})
    segmenter.segment(references, TARGETS, batch_size=3)
    assert segmenter.backbone.images_seen - before == 2 + len(TARGETS)


def test_stage_timer_accounts_every_stage_and_synchronises_around_device_stages_only(tiny_backbone):
    from insid3_core.timing import StageTimer

    class RecordingTimer(StageTimer):
        def __init__(self, device):
            super().__init__(device)
            self.synchronised = {}

        def stage(self, name, device=True):
            self.synchronised[name] = device
            return super().stage(name, device)

    timer = RecordingTimer(tiny_backbone.device)
    segmenter = Segmenter(tiny_backbone, EngineConfig(image_size=256, svd_components=16), cache=False, timer=timer)
    segmenter.segment(segmenter.encode({"object": [REFERENCE]}), TARGETS[:2])
    assert set(timer.seconds) == {"backbone", "matching", "clustering", "aggregation", "output"}
    assert all(seconds > 0 for seconds in timer.seconds.values())
    assert [name for name, device in timer.synchronised.items() if not device] == ["output"]  # host work only

    synchronisations = []
    timer._synchronize = lambda: synchronisations.append(True)
    with timer.stage("host", device=False):
        pass
    assert synchronisations == []
    with timer.stage("device"):
        pass
    assert len(synchronisations) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_stages_timed_in_one_thread_while_two_others_cluster(device):
    """The engine's pattern on a GPU: one thread times stages (on CUDA, synchronising around
    each) while two device threads cluster (on CUDA, capturing graphs, one capture at a time);
    nothing fails, and the partitions stay scipy's."""
    from insid3_core.timing import StageTimer

    timer = StageTimer(torch.device(device))
    targets = list(small_random_targets(8, seed=1))

    def clustered(batches):
        return [cluster_patches(t.to(device), 0.6, "torch").cpu().numpy() for t in batches]

    with ThreadPoolExecutor(2) as pool:
        halves = [pool.submit(clustered, targets[:4]), pool.submit(clustered, targets[4:])]
        work = torch.randn(256, 256, device=device)
        while not all(half.done() for half in halves):
            with timer.stage("backbone"):
                work = (work @ work).tanh_()
        labels = halves[0].result() + halves[1].result()
    for features, batched in zip(targets, labels):
        for target, torch_labels in zip(features, batched):
            assert same_partition(cluster_patches(target, 0.6, "scipy").numpy(), torch_labels)
    assert timer.seconds["backbone"] > 0
    assert not _RoundGraph.unavailable


@pytest.mark.parametrize("seed", range(4))
def test_batched_torch_clustering_matches_scipy_on_random_structures(seed):
    """Targets of different sizes of structure in one batch: nested groups, noise, duplicates."""

    generator = torch.Generator().manual_seed(seed)
    targets = []
    for groups in (3, 7, 15, 40):
        centres = torch.randn(groups, 24, generator=generator)
        members = torch.randint(groups, (300,), generator=generator)
        spread = 0.3 + 0.6 * torch.rand(300, 1, generator=generator)
        targets.append(torch.nn.functional.normalize(centres[members] + spread * torch.randn(300, 24, generator=generator), dim=1))
    features = torch.stack(targets)
    features[0, 5] = features[0, 4]  # an exact duplicate pair
    batched = cluster_patches(features, 0.6, "torch").numpy()
    for target, torch_labels in zip(features, batched):
        assert same_partition(cluster_patches(target, 0.6, "scipy").numpy(), torch_labels)
