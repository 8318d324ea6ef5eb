"""``insid3 eval``: few-shot episodes on a dataset in its standard layout, with a JSON and Markdown report."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import SMOKE_TEST_NOTE
from ..datasets import DEFAULT_SPLITS, FOLD_EPISODES, LAYOUTS, Dataset, Episode, load_dataset, make_episodes
from ..engine import Segmenter
from ..evaluation import ratio, run_episodes, summarise
from ..io import atomic_write, check_output_files, check_writable_folder, write_json, write_mask_png

MAX_EPISODES = 1_000_000
"""Most episodes one run draws (they are listed before the first one runs)."""


def register(commands) -> None:
    """Add ``eval`` to the ``insid3`` sub-commands (argparse ``add_subparsers()``)."""
    from ..settings import EngineSettings

    evaluate = commands.add_parser(
        "eval", help="few-shot evaluation (mIoU, FB-IoU) on COCO-20i, FSS-1000, ISIC, SUIM or a class folder",
        description="Run seeded few-shot episodes on a dataset in its standard layout and write "
                    "report.json, report.md and overlay figures to --out.",
    )
    evaluate.add_argument("layout", choices=LAYOUTS, help="dataset layout")
    evaluate.add_argument("root", type=Path, metavar="ROOT", help="dataset folder")
    evaluate.add_argument("--out", required=True, metavar="DIR", help="report folder")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an earlier report in DIR")
    evaluate.add_argument("--shots", type=int, default=1, metavar="K", help="references per episode (default 1)")
    evaluate.add_argument("--episodes", type=int, metavar="N",
                          help=f"episodes per fold for coco20i (default {FOLD_EPISODES}), per class otherwise "
                               "(default: every image once as a query)")
    evaluate.add_argument("--queries", type=int, default=1, metavar="Q",
                          help="targets per episode, segmented in batches against the same references (default 1)")
    evaluate.add_argument("--folds", type=int, nargs="+", metavar="F",
                          help="folds to run (default all: 0-3 for coco20i)")
    evaluate.add_argument("--seed", type=int, default=0, help="episode sampling seed (default 0)")
    evaluate.add_argument("--split", metavar="NAME",
                          help=", ".join(f"{layout}: default {split}" for layout, split in DEFAULT_SPLITS.items()))
    evaluate.add_argument("--classes", type=Path, metavar="FILE",
                          help="keep only the classes listed in FILE, one a line (e.g. FSS-1000's test split)")
    evaluate.add_argument("--figures", type=int, default=4, metavar="N",
                          help="overlay figures of N episodes (default 4)")
    evaluate.add_argument("--save-masks", action="store_true", help="also write every predicted mask to DIR/masks/")
    EngineSettings.add_arguments(evaluate, exclude=("instance_method", "min_instance_patches"))
    evaluate.set_defaults(handler=run_eval)


def run_eval(arguments: argparse.Namespace) -> int:
    """Run the episodes and write ``report.json``, ``report.md``, ``figures/`` (and ``masks/``)."""
    from . import UsageError
    from .common import build_segmenter
    from ..settings import EngineSettings

    for name in ("shots", "queries", "episodes"):
        if getattr(arguments, name) is not None and getattr(arguments, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(arguments, name)}")
    if arguments.episodes is not None and arguments.episodes > MAX_EPISODES:
        raise UsageError(f"--episodes must be at most {MAX_EPISODES}, got {arguments.episodes}")
    if arguments.seed < 0 or arguments.figures < 0:
        raise UsageError("--seed and --figures must be >= 0")
    if importlib.util.find_spec("matplotlib") is None:  # before any episode runs
        raise UsageError("insid3 eval needs matplotlib for its figures: pip install 'insid3[eval]'")
    out, root = (Path(os.path.realpath(Path(path).expanduser())) for path in (arguments.out, arguments.root))
    if arguments.out.strip() and (out == root or root in out.parents):
        raise UsageError(f"--out {arguments.out} is inside the dataset {arguments.root}: its masks and figures would "
                         "become part of the dataset; choose a folder outside it")
    check_writable_folder(arguments.out, "--out")  # before any episode runs
    arguments.out = Path(arguments.out).expanduser()
    check_output_files([arguments.out / "report.json", arguments.out / "report.md"], "--out", arguments.overwrite)
    for folder, written in (("masks", arguments.save_masks), ("figures", arguments.figures > 0)):
        earlier = arguments.out / folder
        if written and (earlier.is_symlink() or earlier.exists()) and not earlier.is_dir():
            raise UsageError(f"--out: {earlier} is a file where the {folder} folder goes; move it away")
        if written and not arguments.overwrite and earlier.is_dir() and any(earlier.iterdir()):
            raise UsageError(f"--out: {earlier} holds files of an earlier run; pass --overwrite to replace "
                             "them, or choose another --out")
    from ..report import markdown

    dataset = load_dataset(arguments.layout, arguments.root, arguments.split, arguments.classes)
    episodes, skipped = make_episodes(dataset, arguments.shots, arguments.queries, arguments.episodes,
                                      arguments.folds, arguments.seed)
    engine = EngineSettings.from_arguments(arguments)
    segmenter = build_segmenter(engine)
    print(f"insid3: {len(episodes)} episode(s) of {arguments.layout} ({len(dataset.classes)} classes, "
          f"{arguments.shots}-shot) on {segmenter.backbone.device}", file=sys.stderr)
    started = time.perf_counter()
    records, figures, entries = collect(segmenter, episodes, arguments, engine)
    seconds = time.perf_counter() - started

    results = summarise(entries)
    for fold, scores in results["folds"].items():
        scores["episodes"] = sum(1 for episode in episodes if episode.fold == fold)
    report = {
        "insid3": __version__,
        **settings(arguments, dataset, skipped, segmenter, engine),
        "results": results,
        "episodes_run": len(episodes),
        "seconds": seconds,
        "figures": figures,
        "episodes": records,
    }
    out: Path = arguments.out
    write_json(out / "report.json", report)
    with atomic_write(out / "report.md", "w") as stream:
        stream.write(markdown(report))
    if arguments.overwrite:
        written = {figure["path"] for figure in figures} | {
            query["mask"] for record in records for query in record["queries"] if "mask" in query}
        remove_earlier_outputs(out, written)
    print(f"insid3: mIoU {100 * results['miou']:.1f}, FB-IoU {100 * results['fb_iou']:.1f} over "
          f"{len(results['folds'])} fold(s), {len(episodes)} episodes in {seconds:.1f} s -> {out / 'report.md'}",
          file=sys.stderr)
    if segmenter.backbone.is_smoke_test:
        print(f"insid3: reminder: these numbers come from the {SMOKE_TEST_NOTE}",
              file=sys.stderr)
    return 0


def remove_earlier_outputs(out: Path, written: set[str]) -> None:
    """Delete the figures and masks of an earlier run (``figures/episode_*.png``,
    ``masks/episode_*.png``) that this run's report, which replaced its report, does not name
    (``written``: paths relative to ``out``); other files there are kept."""
    for folder in ("figures", "masks"):
        for path in sorted((out / folder).glob("episode_*.png")):
            if path.relative_to(out).as_posix() not in written and path.is_file() and not path.is_symlink():
                path.unlink()


def collect(
    segmenter: Segmenter, episodes: list[Episode], arguments: argparse.Namespace, engine
) -> tuple[list[dict], list[dict], list[tuple[int, str, np.ndarray]]]:
    """Run the episodes, saving masks and figures on the way.

    Returns
    -------
    records : list of dict
        Per episode: index, fold, class, references and per query its numbers.
    figures : list of dict
        Episode index and figure path (relative to ``--out``).
    entries : list of (fold, class, counts)
        For :func:`insid3_core.evaluation.summarise`.
    """
    from tqdm import tqdm

    from ..report import episode_figure

    out: Path = arguments.out
    count = min(arguments.figures, len(episodes))
    shown = set(np.linspace(0, len(episodes) - 1, count).round().astype(int).tolist())
    records, figures, entries = [], [], []
    stream = run_episodes(segmenter, episodes, engine.batch_size, engine.workers)
    with tqdm(total=sum(len(e.queries) for e in episodes), desc="eval", unit="query", file=sys.stderr) as progress:
        for outcome in stream:
            progress.update(1)
            episode = outcome.episode
            entries.append((episode.fold, episode.label, outcome.counts))
            if not records or records[-1]["index"] != episode.index:
                records.append({"index": episode.index, "fold": episode.fold, "class": episode.label,
                                "references": [str(s.image) for s in episode.supports], "queries": []})
            position = len(records[-1]["queries"])
            query = {"image": str(outcome.query.image), "truth": outcome.query.source,
                     "intersection": int(outcome.counts[1, 0]), "union": int(outcome.counts[1, 1]),
                     "iou": ratio(*outcome.counts[1]), "score": outcome.score}
            if arguments.save_masks:
                mask = Path("masks") / f"episode_{episode.index:05d}_{position}_{outcome.query.image.stem}.png"
                write_mask_png(out / mask, outcome.prediction)
                query["mask"] = mask.as_posix()
            records[-1]["queries"].append(query)
            if position == 0 and episode.index in shown:
                figure = Path("figures") / f"episode_{episode.index:05d}.png"
                title = (f"episode {episode.index} · fold {episode.fold} · {episode.label} · "
                         f"IoU {100 * query['iou']:.1f}")
                episode_figure(out / figure, [(s.image, s.mask()) for s in episode.supports], outcome.query.image,
                               outcome.prediction, outcome.truth, title)
                figures.append({"episode": episode.index, "path": figure.as_posix()})
    return records, figures, entries


def settings(arguments: argparse.Namespace, dataset: Dataset, skipped: dict[str, str], segmenter: Segmenter,
             engine) -> dict:
    """The report's ``dataset``, ``protocol`` and ``engine`` sections (``engine``: the
    :class:`~insid3_core.settings.EngineSettings` of the run)."""
    by_fold = dataset.sampling == "fold"
    return {
        "dataset": {
            "layout": dataset.layout, "root": str(dataset.root),
            "split": arguments.split or DEFAULT_SPLITS.get(dataset.layout),
            "classes": len(dataset.classes), "folds": {fold: list(names) for fold, names in dataset.folds.items()},
            "skipped_classes": skipped,
        },
        "protocol": {
            "shots": arguments.shots,
            "episodes": arguments.episodes or (FOLD_EPISODES if by_fold else None),
            "episodes_per": "fold" if by_fold else "class",
            "queries": arguments.queries,
            "folds": sorted(dataset.folds) if arguments.folds is None else sorted(set(arguments.folds)),
            "seed": arguments.seed,
        },
        "engine": {
            "backbone": segmenter.backbone.name, "weights": segmenter.backbone.identity,
            "smoke_test": segmenter.backbone.is_smoke_test, "image_size": segmenter.config.image_size,
            "svd_components": int(segmenter.basis.shape[1]), "tau": segmenter.config.tau,
            "merge_threshold": segmenter.config.merge_threshold, "device": str(segmenter.backbone.device),
            "precision": engine.precision, "batch_size": engine.batch_size,
        },
    }
