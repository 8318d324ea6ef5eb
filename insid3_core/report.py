"""The evaluation report: Markdown tables and overlay figures (matplotlib, Agg, no pyplot)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import SMOKE_TEST_NOTE
from .io import atomic_write, load_image

PREDICTION_COLOUR = "#ff00ff"
TRUTH_COLOUR = "#00e5ff"
REFERENCE_COLOUR = "#ffffff"


def percent(value: float) -> str:
    """A fraction in [0, 1] as a percentage with one decimal."""
    return f"{100 * value:.1f}"


def markdown(report: dict) -> str:
    """The Markdown report of :func:`insid3_core.cli.eval.run_eval`'s JSON ``report``."""
    results, protocol, dataset, engine = report["results"], report["protocol"], report["dataset"], report["engine"]
    lines = [
        f"# insid3 eval: {dataset['layout']} {protocol['shots']}-shot",
        "",
        f"**mIoU {percent(results['miou'])}** · **FB-IoU {percent(results['fb_iou'])}** "
        f"(mean over {len(results['folds'])} fold(s); {report['episodes_run']} episodes, "
        f"{sum(f['queries'] for f in results['folds'].values())} queries, {report['seconds']:.1f} s)",
        "",
    ]
    if engine["smoke_test"]:
        lines += [f"> These numbers come from the {SMOKE_TEST_NOTE}.", ""]
    lines += ["## Configuration", "", "| setting | value |", "|---|---|"]
    settings = {
        "dataset": f"{dataset['layout']} at `{dataset['root']}`"
                   + (f" ({dataset['split']})" if dataset["split"] else ""),
        "shots": protocol["shots"],
        "episodes": protocol["episodes"] if protocol["episodes"] is not None else "every image once as a query",
        "episodes per": protocol["episodes_per"],
        "queries per episode": protocol["queries"],
        "folds": ", ".join(map(str, protocol["folds"])),
        "seed": protocol["seed"],
        "backbone": f"{engine['backbone']} ({engine['weights']})",
        **{key: engine[key]
           for key in ("image_size", "svd_components", "tau", "merge_threshold", "device", "precision")},
    }
    lines += [f"| {key} | {value} |" for key, value in settings.items()]
    lines += ["", "## Folds", "", "| fold | classes | episodes | queries | mIoU | FB-IoU |",
              "|---|---|---|---|---|---|"]
    for fold, scores in results["folds"].items():
        lines.append(f"| {fold} | {len(scores['classes'])} | {scores['episodes']} | {scores['queries']} "
                     f"| {percent(scores['miou'])} | {percent(scores['fb_iou'])} |")
    lines.append(f"| **mean** | | | | **{percent(results['miou'])}** | **{percent(results['fb_iou'])}** |")
    for fold, scores in results["folds"].items():
        lines += ["", f"## Fold {fold}: classes", "", "| class | queries | IoU |", "|---|---|---|"]
        lines += [f"| {name} | {c['queries']} | {percent(c['iou'])} |" for name, c in scores["classes"].items()]
        lines.append(f"| *background* | {scores['queries']} | {percent(scores['background']['iou'])} |")
    if dataset["skipped_classes"]:
        lines += ["", "## Classes left out", ""]
        lines += [f"- {name}: {reason}" for name, reason in dataset["skipped_classes"].items()]
    if report["figures"]:
        lines += ["", "## Episodes", "",
                  "References with their mask (yellow); target with the truth (cyan) and the prediction "
                  "(magenta, dashed).", ""]
        for figure in report["figures"]:
            lines += [f"![episode {figure['episode']}]({figure['path']})", ""]
    return "\n".join(lines).rstrip() + "\n"


def episode_figure(
    path: str | Path,
    references: Sequence[tuple[Path, np.ndarray]],
    target: Path,
    prediction: np.ndarray,
    truth: np.ndarray,
    title: str,
) -> None:
    """Write a PNG: each reference with its mask contour, then the target with truth and prediction.

    Parameters
    ----------
    path : str or Path
    references : sequence of (image path, mask)
        Masks ``(H_i, W_i)`` bool.
    target : Path
    prediction, truth : np.ndarray
        ``(H, W)`` bool, the target's size.
    title : str
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = len(references) + 1
    figure = Figure(figsize=(3.2 * panels, 3.6), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for axis, (image, mask) in zip(axes, references):
        _overlay(axis, image, [(mask, REFERENCE_COLOUR, "solid")], f"reference {Path(image).name}")
    contours = [(truth, TRUTH_COLOUR, "solid"), (prediction, PREDICTION_COLOUR, "dashed")]
    _overlay(axes[-1], target, contours, f"target {target.name}")
    axes[-1].legend(handles=[Line2D([], [], color=TRUTH_COLOUR, label="truth"),
                             Line2D([], [], color=PREDICTION_COLOUR, linestyle="dashed", label="prediction")],
                    loc="lower right", fontsize=7, framealpha=0.7)
    figure.suptitle(title, fontsize=10)
    with atomic_write(path) as stream:
        figure.savefig(stream, format="png", dpi=100)


def _overlay(axis, image: Path, contours: Sequence[tuple[np.ndarray, str, str]], label: str) -> None:
    axis.imshow(np.asarray(load_image(image)))
    for mask, colour, style in contours:
        if mask.any() and not mask.all():
            axis.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.5, linestyles=style)
    axis.set_title(label, fontsize=8)
    axis.set_axis_off()
