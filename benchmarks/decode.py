"""Can the input side keep up? JPEG decode-and-resize rate of the engine's loader threads.

On 1280x960 JPEGs (the example scenes, upscaled), in one process:

(a) the engine's loader (``insid3_core.loader.load_batches``: PIL decode, EXIF orientation,
    bilinear resize) with 1, 2, ... worker threads;
(b) ``torchvision.io.decode_jpeg`` on the CPU, and with ``device="cuda"`` (nvjpeg) when a GPU is
    there, resizing on the same device (decode rate only: it skips EXIF orientation, so the
    engine does not use it yet).

Each prints ``<name> images_per_s=<r>``; the engine needs 40+ targets/s beside a fast GPU.

Example::

    python benchmarks/decode.py --images 64 --workers 1 2 --image-size 1024
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from insid3_core.loader import load_batches  # noqa: E402

EXAMPLES = ROOT / "examples"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    return parser.parse_args(argv)


def write_jpegs(folder: Path, count: int) -> list[Path]:
    scenes = sorted((EXAMPLES / "targets").glob("*.png"))
    paths = []
    for index in range(count):
        image = Image.open(scenes[index % len(scenes)]).convert("RGB").resize((1280, 960), Image.BILINEAR)
        path = folder / f"target_{index:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def rate(function, count: int) -> float:
    start = time.perf_counter()
    function()
    return count / (time.perf_counter() - start)


def torchvision_decode(paths: list[Path], image_size: int, device: str) -> None:
    from torchvision.io import decode_jpeg, read_file

    for start in range(0, len(paths), 16):
        data = [read_file(str(path)) for path in paths[start:start + 16]]
        images = decode_jpeg(data, device=device)
        resized = [F.interpolate(image[None].float(), size=(image_size, image_size), mode="bilinear",
                                 antialias=False) for image in images]
        if device == "cuda":
            torch.cuda.synchronize()
        del resized


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(Path(folder), arguments.images)
        print(f"# {len(paths)} JPEGs of 1280x960 -> {arguments.image_size} px, {torch.get_num_threads()} torch threads")
        for workers in arguments.workers:
            def loader() -> None:
                for _ in load_batches(paths, arguments.image_size, arguments.batch_size, workers, False):
                    pass

            print(f"loader_{workers}_workers images_per_s={rate(loader, len(paths)):.1f}", flush=True)
        print(f"torchvision_cpu images_per_s={rate(lambda: torchvision_decode(paths, arguments.image_size, 'cpu'), len(paths)):.1f}")
        if torch.cuda.is_available():
            torchvision_decode(paths[:16], arguments.image_size, "cuda")  # warm-up
            print(f"torchvision_cuda images_per_s="
                  f"{rate(lambda: torchvision_decode(paths, arguments.image_size, 'cuda'), len(paths)):.1f}")


if __name__ == "__main__":
    main()
