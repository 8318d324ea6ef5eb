"""Peak host and GPU memory of segmenting one target, per input size, each size in a fresh process.

Example::

    python benchmarks/memory.py --device cpu --backbone vit_small_patch16_dinov3 --sizes 512 1024 1536 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def measure(device: str, backbone_name: str, size: int, precision: str, clustering: str) -> dict:
    """Segment one example target at ``size`` and report peaks (run in a fresh process)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from insid3_core import EngineConfig, Segmenter, random_backbone

    backbone = random_backbone(backbone_name, device, precision)
    segmenter = Segmenter(backbone, EngineConfig(image_size=size, clustering=clustering), cache=False)
    references = segmenter.encode(
        {"object": [(EXAMPLES / "reference" / "disks.png", EXAMPLES / "reference" / "disks_mask.png")]}
    )
    start = time.perf_counter()
    segmenter.segment(references, [EXAMPLES / "targets" / "scene_01.png"], batch_size=1)
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() / 2**30 if backbone.device.type == "cuda" else 0.0
    return {
        "size": size,
        "patches": (size // 16) ** 2,
        "seconds": round(seconds, 2),
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": round(gpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="vit_small_patch16_dinov3")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--clustering", default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1536, 2048])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        print(json.dumps(measure(arguments.device, arguments.backbone, arguments.one, arguments.precision,
                                 arguments.clustering)))
        return
    print(f"# device={arguments.device} backbone={arguments.backbone} (random weights) "
          f"precision={arguments.precision} clustering={arguments.clustering}, one target, batch 1")
    print("| size | patches N | seconds | peak host GiB | peak GPU GiB |")
    print("|---|---|---|---|---|")
    for size in arguments.sizes:
        command = [sys.executable, __file__, "--device", arguments.device, "--backbone", arguments.backbone,
                   "--precision", arguments.precision, "--clustering", arguments.clustering, "--one", str(size)]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            print(f"| {size} | failed: {run.stderr.strip().splitlines()[-1]} |")
            continue
        row = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"| {row['size']} | {row['patches']} | {row['seconds']} | {row['peak_host_gib']} | {row['peak_gpu_gib']} |")


if __name__ == "__main__":
    main()
