"""Cost of K classes in one pass against K separate runs, in one process.

(a) K separate runs: ``Segmenter.segment`` once per class over the same targets (each run
    pays the backbone and the clustering again);
(b) one pass: ``Segmenter.segment`` with the K classes (one backbone call per batch,
    one clustering per target, matching and aggregation per class).

The classes are the example reference's disk mask and K - 1 others cut from the example
scenes' true masks, so every class has references of its own. The last line is
``classes=<K> one_pass_s=<b> separate_runs_s=<a> cost_ratio=<b/a>``.

Example::

    python benchmarks/classes.py --device cpu --backbone vit_small_patch16_dinov3 \\
        --random-weights --image-size 512 --targets 8 --classes 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import add_model_arguments, make_backbone, synchronize  # noqa: E402
from insid3_core import EngineConfig, References, Segmenter  # noqa: E402

EXAMPLES = ROOT / "examples"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    return parser.parse_args(argv)


def class_references(count: int) -> dict[str, list[tuple[Path, Path]]]:
    """``count`` classes, each with one (image, mask) reference from the examples."""
    pairs = [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]
    pairs += [(scene, EXAMPLES / "masks" / scene.name) for scene in sorted((EXAMPLES / "targets").glob("*.png"))]
    if count > len(pairs):
        raise SystemExit(f"--classes {count}: the examples hold {len(pairs)} reference masks")
    return {f"class_{index}": [pair] for index, pair in enumerate(pairs[:count])}


def timed(function, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    backbone = make_backbone(arguments, "float32")
    segmenter = Segmenter(backbone, EngineConfig(image_size=arguments.image_size), cache=False)
    scenes = sorted((EXAMPLES / "targets").glob("*.png"))
    targets = [scenes[index % len(scenes)] for index in range(arguments.targets)]
    classes = segmenter.encode(class_references(arguments.classes))
    segmenter.segment(classes, targets[: arguments.batch_size], arguments.batch_size)
    print(f"# backbone={backbone.name} device={backbone.device} image_size={arguments.image_size} "
          f"targets={arguments.targets} batch_size={arguments.batch_size} classes={arguments.classes}")
    separate = timed(
        lambda: [segmenter.segment(References({name: references}), targets, arguments.batch_size)
                 for name, references in classes.classes.items()],
        backbone.device,
    )
    one_pass = timed(lambda: segmenter.segment(classes, targets, arguments.batch_size), backbone.device)
    print(f"classes={arguments.classes} one_pass_s={one_pass:.3f} separate_runs_s={separate:.3f} "
          f"cost_ratio={one_pass / separate:.3f}")


if __name__ == "__main__":
    main()
