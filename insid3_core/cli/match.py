"""``insid3 match``: transfer reference keypoints to target images (see :mod:`insid3_core.keypoints`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import number
from ..io import InputError, check_output_files, load_image, write_json
from ..keypoints import check_inside, check_refinement, encode_points, iter_match, load_points


# what matching points never uses: the clustering, the mask, its verdicts and instances
ENGINE_UNUSED = ("tau", "merge_threshold", "clustering", "refinement", "min_area_ratio", "max_area_ratio",
                 "max_components", "instance_method", "min_instance_patches")


def register(commands) -> None:
    """Add ``match`` to the ``insid3`` sub-commands (argparse ``add_subparsers()``)."""
    from ..settings import EngineSettings

    match = commands.add_parser("match", help="transfer reference keypoints to target images")
    match.add_argument("targets", nargs="+", metavar="TARGET", help="image files, folders or glob patterns")
    match.add_argument("--ref", nargs=2, required=True, metavar=("IMAGE", "POINTS"),
                       help='reference image and a JSON list of [x, y] or {"name", "x", "y"} in its pixels')
    match.add_argument("--out", required=True, type=Path, metavar="OUT.json", help="output JSON file")
    match.add_argument("--overwrite", action="store_true", help="replace an existing OUT.json")
    match.add_argument("--original-features", action="store_true",
                       help="match the backbone's original features instead of the debiased ones")
    match.add_argument("--window", type=int, default=3,
                       help="odd side, in patches, of the soft-argmax window refining each match (1: patch centres)")
    match.add_argument("--temperature", type=number, default=0.05, help="soft-argmax temperature on cosine similarity")
    match.add_argument("--mutual", action="store_true",
                       help="report per point whether the match passes the mutual-nearest-neighbour check")
    EngineSettings.add_arguments(match, exclude=ENGINE_UNUSED)
    match.set_defaults(handler=run_match)


def run_match(arguments: argparse.Namespace) -> int:
    """Match the points in every target and write one JSON document; exit 1 if a target failed."""
    from . import UsageError
    from .common import build_segmenter, resolve_targets, settings_files
    from ..settings import EngineSettings

    image, points_file = arguments.ref
    try:
        check_refinement(arguments.window, arguments.temperature)
    except ValueError as err:
        raise UsageError(f"--{err}") from None
    names, points = load_points(points_file)
    targets = resolve_targets(arguments.targets)
    if arguments.out.suffix.lower() != ".json":
        raise UsageError(f"--out {arguments.out}: expected a .json file")
    check_output_files([arguments.out], "--out", arguments.overwrite,
                       inputs=[image, points_file, *targets, *settings_files(arguments)])
    settings = EngineSettings.from_arguments(arguments)
    shown = load_image(image)  # decoded once; an unreadable reference, or points off it, told before the model loads
    check_inside(points, (shown.height, shown.width), names, points_file)
    segmenter = build_segmenter(settings)
    reference = encode_points(
        segmenter.encoder, shown, points, names, debiased=not arguments.original_features, source=points_file
    )
    print(f"insid3: {len(reference)} point(s), {len(targets)} target(s) on {segmenter.backbone.device}",
          file=sys.stderr)
    matched, failures = [], []
    stream = iter_match(segmenter.encoder, reference, targets, settings.batch_size, settings.workers,
                        arguments.window, arguments.temperature, arguments.mutual)
    for target, result in stream:
        if isinstance(result, InputError):
            failures.append({"image": str(target), "error": str(result)})
            continue
        matched.append(target_record(target, result, names))
    write_json(arguments.out, {
        "reference": {
            "image": image,
            "width": reference.size[1],
            "height": reference.size[0],
            "points": [{"name": n, "x": float(x), "y": float(y)} for n, (x, y) in zip(names, points)],
        },
        "features": "debiased" if reference.debiased else "original",
        "backbone": segmenter.backbone.name,
        "weights": segmenter.backbone.identity,
        "smoke_test": segmenter.backbone.is_smoke_test,
        "image_size": segmenter.config.image_size,
        "svd_components": int(segmenter.basis.shape[1]),
        "window": arguments.window,
        "temperature": arguments.temperature,
        "targets": matched,
        "failed": failures,
    })
    print(f"insid3: matched {len(matched)}, failed {len(failures)} -> {arguments.out}", file=sys.stderr)
    for failure in failures:
        print(f"insid3: FAILED {failure['error']}", file=sys.stderr)  # the error names its file
    return 1 if failures else 0


def target_record(target, result, names) -> dict:
    """One target's entry of the output JSON: its size and each point's position and score."""
    points = []
    for index, name in enumerate(names):
        point = {
            "name": name,
            "x": round(float(result.points[index, 0]), 3),
            "y": round(float(result.points[index, 1]), 3),
            "score": round(float(result.scores[index]), 5),
        }
        if result.mutual is not None:
            point["mutual"] = bool(result.mutual[index])
        points.append(point)
    return {"image": str(target), "width": result.size[1], "height": result.size[0], "points": points}
