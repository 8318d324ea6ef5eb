"""Edge refinement against bilinear upsampling on the synthetic example episodes.

The reference ``examples/reference/disks.png`` with its mask is matched in the 8 targets of
``examples/targets``; every feature-resolution mask is brought to the target's size twice:

* **bilinear** — the release's step 7 (:func:`insid3_core.upsample.upsample_mask`);
* **guided** — :func:`insid3_core.refine.refine_masks` at the input size ``s``, then the same
  bilinear resize to ``(H, W)``.

Two sources of low-resolution masks are scored against ``examples/masks``:

* **engine** — what the engine predicts with the given backbone (by default the bundled
  random-weight test checkpoint, whose masks are a smoke test);
* **truth at feature resolution** — the true mask reduced to the patch grid (a patch is in when
  more than half of it is), which isolates the upsampling step from the features.

Printed: mean IoU and mean boundary F-score at DAVIS's tolerance (``ceil(0.008 * diagonal)``,
6 px on these 520x400 images) and at 2 px, and each upsampling's time per image (fastest of 3
runs of the whole batch).

Example::

    python benchmarks/refinement.py --image-size 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from insid3_core import TEST_CHECKPOINT, EngineConfig, Segmenter, load_backbone  # noqa: E402
from insid3_core.features import resized_pixels  # noqa: E402
from insid3_core.io import load_image, load_mask  # noqa: E402
from insid3_core.metrics import boundary_f_score, mask_iou  # noqa: E402
from insid3_core.refine import refine_masks  # noqa: E402
from insid3_core.upsample import upsample_mask  # noqa: E402

EXAMPLES = ROOT / "examples"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=TEST_CHECKPOINT,
                        help="DINOv3 checkpoint (default: the bundled random-weight test one)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--svd-components", type=int, default=None)
    parser.add_argument("--radius", type=int, default=None, help="guided filter radius (default: one patch)")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--subsample", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=2.0, help="the second, tighter boundary tolerance in px")
    return parser.parse_args(argv)


def truth_at_grid(truth: np.ndarray, image_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(h, w)`` bool: patches more than half covered by the true mask resized to ``(s, s)``."""
    square = F.interpolate(torch.from_numpy(truth).float()[None, None], size=(image_size, image_size), mode="bilinear",
                           align_corners=False)
    return F.adaptive_avg_pool2d(square, grid)[0, 0] > 0.5


def to_original(square: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The second half of step 7: ``(s, s)`` bool -> ``(H, W)`` bool, bilinear then ``> 0.5``."""
    full = F.interpolate(square.float()[None, None], size=size, mode="bilinear", align_corners=False)
    return full[0, 0].cpu().numpy() > 0.5


def timed(function, repeats: int = 3):
    """``function()``'s result and its fastest time in ms over ``repeats`` runs (device synchronised)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1000)
    return result, best


def scores(masks: list[np.ndarray], truths: list[np.ndarray], tolerance: float) -> tuple[float, float, float]:
    """Mean IoU, boundary F at DAVIS's tolerance, boundary F at ``tolerance``."""
    return (
        float(np.mean([mask_iou(m, t) for m, t in zip(masks, truths)])),
        float(np.mean([boundary_f_score(m, t).f for m, t in zip(masks, truths)])),
        float(np.mean([boundary_f_score(m, t, tolerance).f for m, t in zip(masks, truths)])),
    )


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    backbone = load_backbone(arguments.weights, device=arguments.device)
    segmenter = Segmenter(backbone, EngineConfig(image_size=arguments.image_size,
                                                 svd_components=arguments.svd_components), cache=False)
    s = arguments.image_size
    targets = sorted((EXAMPLES / "targets").glob("*.png"))
    truths = [load_mask(EXAMPLES / "masks" / target.name) for target in targets]
    images = [load_image(target) for target in targets]
    pixels = torch.stack([resized_pixels(image, s) for image in images]).to(backbone.device)
    sizes = [truth.shape for truth in truths]
    references = segmenter.encode({"object": [(EXAMPLES / "reference" / "disks.png",
                                                EXAMPLES / "reference" / "disks_mask.png")]})
    predictions = segmenter.segment(references, targets)
    sources = {
        "engine": torch.from_numpy(np.stack([p.classes["object"].lowres_mask for p in predictions])),
        "truth at feature resolution": torch.stack([truth_at_grid(t, s, segmenter.grid) for t in truths]),
    }
    options = {"radius": arguments.radius, "eps": arguments.eps, "subsample": arguments.subsample}
    weights = "random-weight test checkpoint" if backbone.is_smoke_test else backbone.identity
    print(f"backbone {backbone.name} ({weights}), s={s}, grid {segmenter.grid[0]}x{segmenter.grid[1]}, "
          f"{len(targets)} targets, device {backbone.device}, refine {options}")
    print(f"| low-res masks | upsampling | IoU | boundary F (DAVIS tol.) | boundary F ({arguments.tolerance:g} px) "
          "| ms/image |")
    print("|---|---|---|---|---|---|")
    for name, lowres in sources.items():
        bilinear, bilinear_ms = timed(lambda: [upsample_mask(m, s, size).numpy() for m, size in zip(lowres, sizes)])
        squares, guided_ms = timed(lambda: refine_masks(pixels, lowres.to(backbone.device), **options))
        guided = [to_original(square, size) for square, size in zip(squares, sizes)]
        bilinear_ms, guided_ms = bilinear_ms / len(targets), guided_ms / len(targets)
        for label, masks, ms in (("bilinear", bilinear, bilinear_ms), ("guided", guided, guided_ms)):
            iou, f_davis, f_tight = scores(masks, truths, arguments.tolerance)
            print(f"| {name} | {label} | {iou:.4f} | {f_davis:.4f} | {f_tight:.4f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
