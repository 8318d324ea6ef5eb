"""What does Ray Data cost and bring? ``insid3 segment`` against ``insid3 segment --ray`` on the
same targets, and the peak memory of merging a million annotations.

(a) Throughput: the single-process command (the baseline, run first in the same process), then
    the Ray job with 1 and 2 CPU actors of one CPU each, and 1 actor of two CPUs (Ray gives an
    actor's torch as many threads as it has CPUs), on one local runtime started beforehand (its
    start is printed apart, not counted). Each prints ``targets_per_s`` and its ratio to the baseline.
The references: the engine's build and one encode, and the bytes each way of giving them to the
    actors would ship (their files and masks, or the encoded references).
(b) Merge: ``--entries`` records (one small RLE annotation each) written as sorted fragments of
    ``--fragment`` records, merged by :func:`insid3_core.fragments.merge_fragments` in a child
    process, against :func:`insid3_core.coco.coco_document` over the same records held in one dict
    (the single-machine way) in another; each prints its peak RSS (``ru_maxrss``) and seconds.

Example::

    python benchmarks/ray_scaling.py --targets 48 --image-size 224 --entries 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXAMPLES = ROOT / "examples"
REFERENCE = [str(EXAMPLES / "reference" / "disks.png"), str(EXAMPLES / "reference" / "disks_mask.png")]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--fragment", type=int, default=1000, help="records per fragment")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--merge-child", choices=["fragments", "dict"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_targets(folder: Path, count: int) -> None:
    scenes = sorted((EXAMPLES / "targets").glob("*.png"))
    for index in range(count):
        with Image.open(scenes[index % len(scenes)]) as image:
            variant = [image, ImageOps.mirror(image), ImageOps.flip(image)][(index // len(scenes)) % 3]
            variant.rotate(index * 7 % 360).save(folder / f"target_{index:05d}.png")


def segment(arguments: argparse.Namespace, targets: Path, out: Path, *extra: str) -> float:
    """Seconds of one ``insid3 segment`` in this process (its output swallowed)."""
    from insid3_core.cli import main

    command = ["segment", "--ref", *REFERENCE, str(targets), "--out", str(out), "--device", "cpu",
               "--image-size", str(arguments.image_size), "--svd-components", "16",
               "--batch-size", str(arguments.batch_size), *extra]
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        code = main(command)
    elapsed = time.perf_counter() - start
    assert code == 0, f"insid3 {' '.join(command)} exited {code}"
    return elapsed


def references_cost(arguments: argparse.Namespace) -> None:
    """What each way of giving the actors their references costs: the engine's build (what the
    driver would add to encode them itself), one encode (what each actor spends), and the bytes
    that travel either way (the file contents and masks, or the encoded references)."""
    import pickle

    from insid3_core.distributed import reference_payload
    from insid3_core.settings import EngineSettings

    start = time.perf_counter()
    segmenter = EngineSettings(device="cpu", image_size=arguments.image_size, svd_components=16).build()
    built = time.perf_counter() - start
    classes = {"object": [(Path(REFERENCE[0]), Path(REFERENCE[1]))]}
    start = time.perf_counter()
    encoded = segmenter.encode(classes)
    encoding = time.perf_counter() - start
    print(f"engine_build seconds={built:.2f} reference_encode seconds={encoding:.3f} "
          f"payload_bytes={len(pickle.dumps(reference_payload(classes, [])))} "
          f"encoded_bytes={len(pickle.dumps(encoded))}")


def throughput(arguments: argparse.Namespace, folder: Path) -> None:
    import ray

    targets = folder / "targets"
    targets.mkdir()
    write_targets(targets, arguments.targets)
    segment(arguments, targets, folder / "warm")  # the weights and the basis cache, once
    baseline = arguments.targets / segment(arguments, targets, folder / "single")
    print(f"single_process targets_per_s={baseline:.2f} ratio=1.00")
    start = time.perf_counter()
    ray.init(num_cpus=max(4, max(arguments.actors) + 2), include_dashboard=False, log_to_driver=False)
    print(f"ray_start seconds={time.perf_counter() - start:.1f}")
    for actors, cpus in [(actors, 1) for actors in arguments.actors] + [(1, 2)]:
        rate = arguments.targets / segment(arguments, targets, folder / f"ray{actors}x{cpus}", "--ray", "local",
                                           "--actors", str(actors), "--cpus-per-actor", str(cpus))
        print(f"ray_actors={actors} cpus_per_actor={cpus} targets_per_s={rate:.2f} ratio={rate / baseline:.2f}")
    ray.shutdown()


RECORD = {"image": {"file_name": "", "height": 360, "width": 480, "run": "0123456789ab", "source": "",
                    "source_sha256": "0123456789abcdef"},
          "annotations": [{"category": "object", "segmentation": {"size": [360, 480], "counts": "Wbc04Y;5K2N2N1O1N2N"},
                           "area": 1234, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.61,
                           "quality": {"verdict": "ok", "area_ratio": 0.007, "components": 1,
                                       "largest_component_ratio": 1.0}, "iscrowd": 0}]}


def record(index: int) -> dict:
    name = f"target_{index:07d}.jpg"
    return {**RECORD, "image": {**RECORD["image"], "file_name": name, "source": f"s3://bucket/{name}"}}


def write_fragments(parts: Path, entries: int, per_fragment: int) -> None:
    """Sorted fragments as the job's stages write them (interleaved names, as actors would)."""
    from insid3_core.fragments import fragment_file

    fragments = -(-entries // per_fragment)
    for fragment in range(fragments):
        indices = range(fragment, entries, fragments)
        name, content = fragment_file([{"name": f"target_{i:07d}.jpg", "status": "segmented",
                                        "source": f"s3://bucket/target_{i:07d}.jpg", "record": record(i)}
                                       for i in indices])
        (parts / name).write_bytes(content)


def merge_child(arguments: argparse.Namespace) -> None:
    """One merge in this process; prints its peak RSS, what the merge itself added to the RSS of
    the imports (torch among them), and seconds."""
    from insid3_core.coco import coco_document
    from insid3_core.fragments import merge_fragments
    from insid3_core.io import write_json

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    folder = arguments.folder
    if arguments.merge_child == "fragments":
        summary = merge_fragments(folder / "parts", folder / "annotations.json", ["object"], {})
        assert summary.segmented == arguments.entries, summary.segmented
    else:
        records = {f"target_{i:07d}.jpg": record(i) for i in range(arguments.entries)}
        write_json(folder / "annotations_dict.json", coco_document(records, ["object"], {}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"merge_{arguments.merge_child} entries={arguments.entries} peak_rss_mib={peak:.0f} "
          f"added_mib={peak - imported:.0f} seconds={time.perf_counter() - start:.1f}")


def merge(arguments: argparse.Namespace, folder: Path) -> None:
    parts = folder / "parts"
    parts.mkdir()
    start = time.perf_counter()
    write_fragments(parts, arguments.entries, arguments.fragment)
    print(f"fragments={len(list(parts.iterdir()))} written_seconds={time.perf_counter() - start:.1f}")
    for kind in ("dict", "fragments"):
        subprocess.run([sys.executable, __file__, "--merge-child", kind, "--folder", str(folder),
                        "--entries", str(arguments.entries)], check=True)
    merged = json.loads((folder / "annotations.json").read_text())
    assert len(merged["images"]) == len(merged["annotations"]) == arguments.entries


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    if arguments.merge_child:
        merge_child(arguments)
        return
    folder = Path(tempfile.mkdtemp(prefix="insid3-ray-"))
    try:
        references_cost(arguments)
        if not arguments.skip_throughput:
            throughput(arguments, folder)
        merge(arguments, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
