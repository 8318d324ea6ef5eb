"""Cost of ``insid3 calibrate`` against one segment run, for several reference counts, in one process.

For R references (two-texture scenes of ``tests/scenes.py``, 320x256):

(a) one segment run: encode the R references and segment one target with them;
(b) the calibration: R leave-one-out episodes over the default grid (48 settings), the
    references through the backbone once, each target clustered once per tau.

Each count prints ``references=<R> calibration_s=<b> segment_run_s=<a> ratio=<b/a>
per_episode_ratio=<b/(R a)>``; a Markdown table closes the run.

Example::

    python benchmarks/calibration.py --device cpu --weights insid3_core/weights/tiny_dinov3_meta.pth \\
        --image-size 512 --references 3 5 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.throughput import add_model_arguments, make_backbone, synchronize  # noqa: E402
from insid3_core import EngineConfig, Segmenter  # noqa: E402
from insid3_core.calibration import calibrate  # noqa: E402
from insid3_core.settings import EngineSettings  # noqa: E402
from scenes import ringed_scene  # noqa: E402


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--references", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--svd-components", type=int, help="default: the backbone's")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (the fastest counts)")
    return parser.parse_args(argv)


def fastest(function, repeats: int, device) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    arguments = parse_arguments(argv)
    backbone = make_backbone(arguments, "float32")
    settings = EngineSettings(image_size=arguments.image_size, svd_components=arguments.svd_components,
                              device=arguments.device)
    segmenter = Segmenter(backbone, EngineConfig(image_size=arguments.image_size,
                                                 svd_components=arguments.svd_components))
    target = ringed_scene(1000)[0]
    rows = []
    for count in arguments.references:
        references = [ringed_scene(seed) for seed in range(count)]
        segment_run = fastest(lambda: segmenter.segment(segmenter.encode({"object": references}), [target]),
                              arguments.repeats, backbone.device)
        calibration = fastest(lambda: calibrate(settings, {"object": references}, segmenter=segmenter),
                              arguments.repeats, backbone.device)
        ratio = calibration / segment_run
        print(f"references={count} calibration_s={calibration:.3f} segment_run_s={segment_run:.3f} "
              f"ratio={ratio:.2f} per_episode_ratio={ratio / count:.2f}", flush=True)
        rows.append((count, calibration, segment_run, ratio))
    print("\n| references | calibration (s) | one segment run (s) | ratio | ratio per episode |")
    print("|---|---|---|---|---|")
    for count, calibration, segment_run, ratio in rows:
        print(f"| {count} | {calibration:.2f} | {segment_run:.2f} | {ratio:.1f} | {ratio / count:.2f} |")


if __name__ == "__main__":
    main()
