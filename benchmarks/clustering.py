"""Clustering alone: the Triton and torch clusterings of whole batches against scipy one target at a time.

Features are the backbone's patch features of the example scenes (flipped copies beyond the
eight scenes), so the clustering sees the structure a real job gives it. Partitions are
compared target by target. The torch clustering's rounds, host reads of its state (checks)
and distinct round shapes (on a GPU: CUDA graph captures) are counted on one more run. The
Triton clustering (one launch per batch) runs on CUDA, or in Triton's CPU interpreter with
``TRITON_INTERPRET=1`` (exactness only: the interpreter is slow). The last lines are
``torch_ms_per_target=<a> scipy_ms_per_target=<b> scipy_over_torch=<b/a> same_partitions=<n>/<total>``
and, where Triton ran,
``triton_ms_per_target=<c> torch_over_triton=<a/c> scipy_over_triton=<b/c> same_partitions=<n>/<total>``.

Example::

    python benchmarks/clustering.py --device cpu --backbone vit_small_patch16_dinov3 \\
        --random-weights --image-size 1024 --targets 8 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import add_model_arguments, make_backbone, synchronize  # noqa: E402
from insid3_core.clustering import (  # noqa: E402
    _NearestNeighbourLinkage,
    _RoundGraph,
    _torch_average_linkage,
    cluster_patches,
)
from insid3_core.features import patch_features, resized_pixels  # noqa: E402
from insid3_core.metrics import same_partition  # noqa: E402

EXAMPLES = ROOT / "examples"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="targets clustered together by torch")
    parser.add_argument("--tau", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3, help="torch timing: fastest of this many runs")
    parser.add_argument(
        "--rounds-per-check", type=int, default=None,
        help="torch rounds between two host reads (default: the device's, 4 on CUDA, 1 elsewhere)",
    )
    return parser.parse_args(argv)


def target_features(arguments, backbone) -> torch.Tensor:
    """``(T, N, C)`` patch features of ``--targets`` example scenes, on the backbone's device."""
    scenes = sorted((EXAMPLES / "targets").glob("*.png"))
    images = []
    for index in range(arguments.targets):
        image = Image.open(scenes[index % len(scenes)]).convert("RGB")
        images.append(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if index >= len(scenes) else image)
    pixels = torch.stack([resized_pixels(image, arguments.image_size) for image in images])
    return torch.cat([patch_features(backbone, batch) for batch in pixels.split(arguments.batch_size)])




def count_rounds(run) -> dict[str, int]:
    """Rounds, host reads and distinct round shapes (on CUDA, graph captures) of the torch
    clustering during ``run()``."""
    counts = {"rounds": 0, "host reads": 0, "round shapes": 0}
    linkage, graph = _NearestNeighbourLinkage, _RoundGraph
    merge_round, pending, replay = linkage.merge_round, linkage._pending, graph.replay
    last_shape, replaying = [], []

    def count(state, slots, rounds):
        shape = [state.sums.shape, tuple(slots)]
        counts["round shapes"] += shape != last_shape
        last_shape[:] = shape
        counts["rounds"] += rounds

    def counted_round(state, *slots):
        if not replaying:
            count(state, slots, 1)
        return merge_round(state, *slots)

    def counted_pending(state):
        counts["host reads"] += 1
        return pending(state)

    def counted_replay(round_graph, state, slots, rounds):
        count(state, slots, rounds)
        replaying.append(True)
        try:
            return replay(round_graph, state, slots, rounds)
        finally:
            replaying.pop()

    linkage.merge_round, linkage._pending, graph.replay = counted_round, counted_pending, counted_replay
    try:
        run()
    finally:
        linkage.merge_round, linkage._pending, graph.replay = merge_round, pending, replay
    return counts


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    torch.set_grad_enabled(False)
    backbone = make_backbone(arguments, "float32")
    device = backbone.device
    features = target_features(arguments, backbone)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# device={device} ({name}) image_size={arguments.image_size} patches={features.shape[1]} "
          f"backbone={backbone.name} targets={arguments.targets} batch_size={arguments.batch_size} tau={arguments.tau}")

    def torch_run() -> list[torch.Tensor]:
        return [
            _torch_average_linkage(batch, 1.0 - arguments.tau, None, arguments.rounds_per_check)
            for batch in features.split(arguments.batch_size)
        ]

    torch_run()
    runs = []
    for _ in range(arguments.repeats):
        synchronize(device)
        start = time.perf_counter()
        torch_labels = torch.cat(torch_run()).cpu()
        runs.append(time.perf_counter() - start)
    start = time.perf_counter()
    scipy_labels = [cluster_patches(target.cpu(), arguments.tau, "scipy") for target in features]
    scipy_seconds = time.perf_counter() - start

    counts = count_rounds(torch_run)
    count = len(features)
    same = sum(same_partition(a, b) for a, b in zip(torch_labels, scipy_labels))
    torch_ms, scipy_ms = 1000 * min(runs) / count, 1000 * scipy_seconds / count
    clusters = [len(set(labels.tolist())) for labels in scipy_labels]
    print(f"clusters per target: min {min(clusters)} max {max(clusters)}")
    failed = " (a CUDA graph capture failed: rounds ran eagerly)" if _RoundGraph.unavailable else ""
    print(", ".join(f"{name} {value}" for name, value in counts.items()) + f", all batches{failed}")
    print(f"torch_ms_per_target={torch_ms:.1f} scipy_ms_per_target={scipy_ms:.1f} "
          f"scipy_over_torch={scipy_ms / torch_ms:.2f} same_partitions={same}/{count}")
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        def triton_run() -> torch.Tensor:
            return torch.cat([cluster_patches(batch, arguments.tau, "triton")
                              for batch in features.split(arguments.batch_size)])

        triton_run()  # compiles the kernel
        runs = []
        for _ in range(arguments.repeats):
            synchronize(device)
            start = time.perf_counter()
            triton_labels = triton_run().cpu()
            runs.append(time.perf_counter() - start)
        triton_ms = 1000 * min(runs) / count
        same = sum(same_partition(a, b) for a, b in zip(triton_labels, scipy_labels))
        print(f"triton_ms_per_target={triton_ms:.1f} torch_over_triton={torch_ms / triton_ms:.2f} "
              f"scipy_over_triton={scipy_ms / triton_ms:.2f} same_partitions={same}/{count}")


if __name__ == "__main__":
    main()
