"""``insid3 calibrate``: choose settings from the references by leave-one-out episodes (see
:mod:`insid3_core.calibration`), with a check of each reference."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from ..calibration import GRID_OPTIONS, calibrate, calibration_episodes, grid_option
from ..config import SMOKE_TEST_NOTE
from ..io import atomic_write, check_output_files, check_references, check_writable_folder, write_json
from ..settings import EngineSettings
from . import UsageError
from .common import add_reference_arguments, reference_classes, reference_files, settings_files

ENGINE_UNUSED = ("instance_method", "min_instance_patches")  # episodes score the class masks

OUTPUTS = ("calibration.json", "calibration.md", "calibration.png")


def register(commands) -> None:
    """Add ``calibrate`` to the ``insid3`` sub-commands (entry point ``insid3.commands``)."""
    parser = commands.add_parser(
        "calibrate", help="choose tau, merge threshold and svd components from the references (leave-one-out)",
        description="Each reference image is segmented from the others over a grid of settings; the settings "
                    "with the best mean IoU against the references' own masks are written to "
                    "DIR/calibration.json (apply them with insid3 segment --settings DIR/calibration.json), "
                    "with DIR/calibration.md, its plot, and a check of each reference.",
    )
    add_reference_arguments(parser)
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                        help=f"values of one option to try (repeat; NAME one of {', '.join(GRID_OPTIONS)}); "
                             "default: tau 0.5,0.6,0.7,0.8, merge_threshold 0.1,0.2,0.3,0.4 and svd_components "
                             "at 0.5, 1 and 1.5 times the run's (one value holds an option fixed); the run's own "
                             "values are always tried")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier calibration in DIR")
    EngineSettings.add_arguments(parser, exclude=ENGINE_UNUSED)
    parser.set_defaults(handler=run_calibrate)


def run_calibrate(arguments: argparse.Namespace) -> int:
    """Run the episodes, write ``calibration.json``, ``calibration.md`` and ``calibration.png``."""
    from tqdm import tqdm

    from ..calibration_report import markdown, score_figure
    from .common import build_segmenter

    settings = EngineSettings.from_arguments(arguments)
    grid = {}
    for name, values in map(grid_option, arguments.grid):
        if name in grid:
            raise UsageError(f"--grid {name} is given twice; list its values in one: --grid {name}=V1,V2,...")
        grid[name] = values
    check_writable_folder(arguments.out, "--out")
    out = Path(arguments.out).expanduser()
    check_output_files([out / name for name in OUTPUTS], "--out", arguments.overwrite,
                       inputs=[*reference_files(arguments), *settings_files(arguments)])
    if importlib.util.find_spec("matplotlib") is None:  # before the backbone loads
        raise UsageError("insid3 calibrate needs matplotlib for its plot: pip install 'insid3[eval]'")
    references = reference_classes(arguments)
    negatives = [(Path(image), Path(mask)) for image, mask in arguments.negative]
    check_references([pair for pairs in references.classes.values() for pair in pairs] + negatives,
                     references.mask_names + [str(mask) for _, mask in negatives])
    calibration_episodes(references.classes)  # before the backbone loads
    segmenter = build_segmenter(settings)  # the smoke-test banner, if any, before the progress bar

    started = time.perf_counter()
    progress = None  # shown from the first episode on, when its total is known

    def advance(done: int, total: int) -> None:
        nonlocal progress
        if progress is None:
            progress = tqdm(desc="calibrate", unit="episode", total=total, file=sys.stderr)
        progress.update(done - progress.n)

    try:
        calibration = calibrate(settings, references.classes, negatives, grid, references.mask_names, advance,
                                segmenter)
    finally:
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - started
    document = {**calibration.document(), "seconds": seconds}
    write_json(out / "calibration.json", document)
    score_figure(out / "calibration.png", document)
    with atomic_write(out / "calibration.md", "w") as stream:
        stream.write(markdown(document, "calibration.png"))

    chosen = ", ".join(f"{name} {value}" for name, value in calibration.settings.items()
                       if calibration.defaults[name] != value) or "the run's own settings"
    print(f"insid3: leave-one-out mean IoU {100 * calibration.default_score:.1f} -> "
          f"{100 * calibration.best_score:.1f} ({chosen}) over {len(calibration.grid)} settings in {seconds:.1f} s "
          f"-> {out / 'calibration.json'}", file=sys.stderr)
    for reference in calibration.references:
        if reference.flag:
            print(f"insid3: check {reference.image} ({reference.category}): {reference.flag}", file=sys.stderr)
    print(f"insid3: apply with: insid3 segment ... --settings {out / 'calibration.json'}", file=sys.stderr)
    if calibration.engine["smoke_test"]:
        print(f"insid3: reminder: {SMOKE_TEST_NOTE}", file=sys.stderr)
    return 0
