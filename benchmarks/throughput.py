"""Batch annotation throughput: the per-pair baseline against the batch engine, in one process.

(a) per-pair baseline, the released INSID3's behaviour: every target is processed on its own,
    its references decoded and re-encoded with it in one backbone call, clustering with scipy
    on the CPU, files read and written in the main thread;
(b) batch engine: references encoded once, targets decoded in worker threads, one backbone
    call per batch, clustering on the device (torch) when it is a GPU, in a device thread
    that overlaps the next batch's backbone call, masks written in threads;
(c) backbone only, the ceiling: the same targets' batches, already on the device, through
    the backbone alone.

Targets are JPEG files made from the example scenes; outputs are PNG masks. The last line is
``speedup_vs_per_pair=<a/b> backbone_share=<c/b> targets_per_s=<b>``.

Example::

    python benchmarks/throughput.py --device cpu --backbone vit_small_patch16_dinov3 \\
        --random-weights --image-size 512 --targets 12 --shots 1 --batch-size 4
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from insid3_core import EngineConfig, References, Segmenter, load_backbone, random_backbone  # noqa: E402
from insid3_core.config import CLUSTERING_METHODS  # noqa: E402
from insid3_core.features import patch_features, resized_pixels  # noqa: E402
from insid3_core.encoder import load_references  # noqa: E402
from insid3_core.io import load_image, write_mask_png  # noqa: E402
from insid3_core.loader import default_workers, executor  # noqa: E402
from insid3_core.metrics import mask_iou  # noqa: E402
from insid3_core.streams import device_threads  # noqa: E402
from insid3_core.timing import StageTimer  # noqa: E402

EXAMPLES = ROOT / "examples"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--targets", type=int, default=12)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="default: 4 beside a GPU, 2 on the CPU")
    parser.add_argument("--precision", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="engine precision; the baseline always runs float32, so the IoU shows its effect")
    parser.add_argument("--clustering", default="auto", choices=CLUSTERING_METHODS)
    parser.add_argument("--target-size", type=int, nargs=2, default=(1280, 960), metavar=("W", "H"),
                        help="size of the generated JPEG targets")
    parser.add_argument("--skip-baseline", action="store_true", help="measure only the engine and the backbone")
    return parser.parse_args(argv)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--backbone``, ``--weights``, ``--random-weights`` and ``--image-size``."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="vit_small_patch16_dinov3", help="timm DINOv3 architecture")
    parser.add_argument("--weights", help="a real checkpoint instead of --random-weights")
    parser.add_argument("--random-weights", action="store_true", help="real architecture, random weights (speed only)")
    parser.add_argument("--image-size", type=int, default=512)


def make_backbone(arguments, precision: str):
    if arguments.weights:
        return load_backbone(arguments.weights, arguments.device, precision)
    if not arguments.random_weights:
        return load_backbone(arguments.backbone, arguments.device, precision)
    return random_backbone(arguments.backbone, arguments.device, precision, seed=0)


def make_episode(folder: Path, count: int, shots: int, size: tuple[int, int]):
    """JPEG targets made from the example scenes, and ``shots`` (image, mask) references."""
    scenes = sorted((EXAMPLES / "targets").glob("*.png"))
    targets = []
    for index in range(count):
        scene = scenes[index % len(scenes)]
        image = Image.open(scene).convert("RGB").resize(size, Image.BILINEAR)
        if index >= len(scenes):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"target_{index:04d}.jpg"
        image.save(path, quality=90)
        targets.append(path)
    references = [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]
    references += [(scene, EXAMPLES / "masks" / scene.name) for scene in scenes[-(shots - 1):]] if shots > 1 else []
    return targets, references[:shots]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_per_pair(segmenter: Segmenter, references, targets, out: Path) -> tuple[float, dict]:
    """The released behaviour: each target alone, references re-encoded with it in one backbone call,
    CPU clustering (the encoder's steps, since no engine call batches references with a target)."""
    device = segmenter.backbone.device
    masks = {}
    synchronize(device)
    start = time.perf_counter()
    for target in targets:
        with segmenter.stage("load", device=False):
            loaded = load_references(references, segmenter.config.image_size)
            image = load_image(target)
            batch = torch.cat([loaded.pixels, resized_pixels(image, segmenter.config.image_size)[None]])
        with segmenter.stage("backbone"):
            features = patch_features(segmenter.backbone, batch)
        with segmenter.stage("matching"):
            encoded = References({"object": segmenter.encoder.reference_set(features[:-1], loaded.masks, loaded.names)})
        result = segmenter.segment_features(encoded, features[-1:], [(image.height, image.width)])[0]
        with segmenter.stage("write", device=False):
            write_mask_png(out / f"{target.stem}.png", result.mask)
        masks[target.name] = result.mask
    synchronize(device)
    return time.perf_counter() - start, masks


def run_engine(segmenter: Segmenter, references, targets, out: Path, batch_size: int, workers: int):
    """The batch engine as `insid3 segment` runs it: references once, threads around the device."""
    device = segmenter.backbone.device
    masks = {}
    synchronize(device)
    start = time.perf_counter()
    encoded = segmenter.encode({"object": references})
    with executor(min(workers, 2), "write") as writer:
        writes = []
        for target, result in segmenter.iter_segment(encoded, targets, batch_size, workers):
            writes.append(writer.submit(write_mask_png, out / f"{target.stem}.png", result.mask))
            masks[target.name] = result.mask
        for write in writes:
            write.result()
    synchronize(device)
    return time.perf_counter() - start, masks


def run_backbone_only(backbone, targets, image_size: int, batch_size: int) -> float:
    """Backbone passes over the targets' batches, already resized and on the device."""
    batches = [
        torch.stack([resized_pixels(load_image(t), image_size) for t in targets[i : i + batch_size]]).to(backbone.device)
        for i in range(0, len(targets), batch_size)
    ]
    synchronize(backbone.device)
    start = time.perf_counter()
    for batch in batches:
        patch_features(backbone, batch)
    synchronize(backbone.device)
    return time.perf_counter() - start


def stage_line(seconds: dict, count: int) -> str:
    return "  ".join(f"{name} {1000 * value / count:.1f}" for name, value in seconds.items())


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    torch.set_grad_enabled(False)
    engine_backbone = make_backbone(arguments, arguments.precision)
    baseline_backbone = (
        engine_backbone if arguments.precision == "float32" else make_backbone(arguments, "float32")
    )
    device = engine_backbone.device
    if arguments.workers is None:
        arguments.workers = default_workers(device)
    config = EngineConfig(image_size=arguments.image_size, clustering=arguments.clustering)
    baseline_config = EngineConfig(image_size=arguments.image_size, clustering="scipy")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# device={device} ({name}) dtype={arguments.precision} image_size={arguments.image_size} "
          f"backbone={engine_backbone.name}{' random-weights' if arguments.weights is None and arguments.random_weights else ''} "
          f"batch_size={arguments.batch_size} shots={arguments.shots} targets={arguments.targets} "
          f"workers={arguments.workers} device_threads={min(arguments.workers, device_threads(device))} "
          f"clustering={arguments.clustering} target_jpeg={arguments.target_size[0]}x{arguments.target_size[1]}")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        targets, references = make_episode(scratch, arguments.targets, arguments.shots, tuple(arguments.target_size))
        for folder in ("warm", "baseline", "engine", "timed"):
            (scratch / folder).mkdir()
        engine = Segmenter(engine_backbone, config, cache=False)
        baseline = Segmenter(baseline_backbone, baseline_config, cache=False)
        run_engine(engine, references, targets[: arguments.batch_size], scratch / "warm", arguments.batch_size, arguments.workers)
        run_backbone_only(engine_backbone, targets[: arguments.batch_size], arguments.image_size, arguments.batch_size)

        seen = engine_backbone.images_seen
        engine_seconds, engine_masks = run_engine(
            engine, references, targets, scratch / "engine", arguments.batch_size, arguments.workers
        )
        engine_images = engine_backbone.images_seen - seen
        backbone_seconds = run_backbone_only(engine_backbone, targets, arguments.image_size, arguments.batch_size)

        engine.timer = StageTimer(device)
        run_engine(engine, references, targets, scratch / "timed", arguments.batch_size, arguments.workers)

        count = len(targets)
        print(f"backbone images per job: engine {engine_images} for {count} targets + {len(references)} references")
        print(f"backbone only : {count / backbone_seconds:8.2f} targets/s  {1000 * backbone_seconds / count:8.1f} ms/target")
        print(f"batch engine  : {count / engine_seconds:8.2f} targets/s  {1000 * engine_seconds / count:8.1f} ms/target")
        print(f"  stages (ms/target, synchronised run): {stage_line(engine.timer.seconds, count)}")
        if arguments.skip_baseline:
            speedup = float("nan")
        else:
            run_per_pair(baseline, references, targets[:1], scratch / "warm")
            baseline.timer = StageTimer(device)
            baseline_seconds, baseline_masks = run_per_pair(baseline, references, targets, scratch / "baseline")
            ious = [mask_iou(engine_masks[key], baseline_masks[key]) for key in baseline_masks]
            speedup = baseline_seconds / engine_seconds
            print(f"per-pair      : {count / baseline_seconds:8.2f} targets/s  {1000 * baseline_seconds / count:8.1f} ms/target")
            print(f"  stages (ms/target): {stage_line(baseline.timer.seconds, count)}")
            print(f"mask IoU engine vs per-pair: min {min(ious):.4f} mean {np.mean(ious):.4f} "
                  f"(identical {sum(i == 1.0 for i in ious)}/{len(ious)})")
        print(f"engine time per target / backbone time per target: {engine_seconds / backbone_seconds:.2f}")
        peak_gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak memory: host {peak_host:.2f} GiB, gpu {peak_gpu:.2f} GiB")
    print(f"speedup_vs_per_pair={speedup:.3f} backbone_share={backbone_seconds / engine_seconds:.3f} "
          f"targets_per_s={count / engine_seconds:.3f}")


if __name__ == "__main__":
    main()
