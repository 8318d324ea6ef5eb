"""The calibration report: ``calibration.md`` and its plot of score against tau and merge
threshold (matplotlib, Agg, no pyplot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import SMOKE_TEST_NOTE
from .report import percent

SHOWN_POINTS = 20
"""Rows of the grid table (best first); calibration.json holds every point."""


def markdown(document: dict, figure: str | None = None) -> str:
    """The Markdown report of a ``calibration.json`` ``document``; ``figure``: the plot's path
    relative to the report."""
    chosen, defaults = document["settings"], document["defaults"]
    varied = [name for name in chosen if name != "image_size"]
    lines = [
        "# insid3 calibrate",
        "",
        f"Leave-one-out mean IoU **{percent(document['default_score'])} with the run's settings -> "
        f"{percent(document['best_score'])} with the chosen ones**, over {len(document['grid'])} grid points "
        f"at {chosen['image_size']} px on `{document['engine']['backbone']}`.",
        "",
    ]
    if document["engine"]["smoke_test"]:
        lines += [f"> These numbers come from the {SMOKE_TEST_NOTE}.", ""]
    lines += ["## Settings", "", "| option | run's value | chosen |", "|---|---|---|"]
    lines += [f"| {name} | {defaults[name]} | {chosen[name]} |" for name in chosen]
    lines += ["", "Apply them with `insid3 segment ... --settings calibration.json` (explicit options win over "
              "the file), the FiftyOne plugin setting `settings`, or `INSID3_SETTINGS` for the Label Studio backend.",
              ""]
    if figure:
        lines += [f"![score against tau and merge threshold]({figure})", ""]
    lines += ["## References", "", "| class | image | mask | IoU (run's settings) | IoU (chosen) | check |",
              "|---|---|---|---|---|---|"]
    for reference in document["references"]:
        shown = [percent(reference[key]) if reference[key] is not None else "-" for key in ("iou_default", "iou_best")]
        lines.append(f"| {reference['class']} | `{reference['image']}` | `{reference['mask']}` | {shown[0]} | "
                     f"{shown[1]} | {reference['flag'] or 'ok'} |")
    ranked = sorted(document["grid"], key=lambda point: -point["score"])[:SHOWN_POINTS]
    lines += ["", f"## Grid (best {len(ranked)} of {len(document['grid'])})", "",
              "| " + " | ".join(varied) + " | mean IoU |", "|" + "---|" * (len(varied) + 1)]
    lines += ["| " + " | ".join(str(point["settings"][name]) for name in varied) + f" | {percent(point['score'])} |"
              for point in ranked]
    return "\n".join(lines) + "\n"


def score_figure(path: Path, document: dict) -> None:
    """Heat maps of the mean IoU over tau (rows) and merge threshold (columns), one panel per
    ``svd_components`` value, at the chosen refinement; the chosen point is framed in red, the
    run's own settings in dashed red."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from .io import atomic_write

    chosen = document["settings"]
    points = [p for p in document["grid"] if p["settings"]["refinement"] == chosen["refinement"]]
    taus = sorted({p["settings"]["tau"] for p in points})
    merges = sorted({p["settings"]["merge_threshold"] for p in points})
    components = sorted({p["settings"]["svd_components"] for p in points})
    figure = Figure(figsize=(1.6 + (0.7 * len(merges) + 0.6) * len(components), 1.3 + 0.5 * len(taus)), dpi=120,
                    layout="constrained")
    axes = figure.subplots(1, len(components), squeeze=False)[0]
    for axis, k in zip(axes, components):
        scores = np.full((len(taus), len(merges)), np.nan)
        for point in points:
            if point["settings"]["svd_components"] == k:
                settings = point["settings"]
                scores[taus.index(settings["tau"]), merges.index(settings["merge_threshold"])] = point["score"]
        image = axis.imshow(scores, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for row, column in np.ndindex(scores.shape):
            if np.isfinite(scores[row, column]):
                axis.text(column, row, percent(scores[row, column]), ha="center", va="center", fontsize=8,
                          color="white" if scores[row, column] < 0.6 else "black")
        for settings, style in ((document["defaults"], "--"), (chosen, "-")):
            if settings["svd_components"] == k and settings["refinement"] == chosen["refinement"]:
                row, column = taus.index(settings["tau"]), merges.index(settings["merge_threshold"])
                axis.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red",
                                         linewidth=2, linestyle=style))
        axis.set_xticks(range(len(merges)), [f"{m:g}" for m in merges])
        axis.set_yticks(range(len(taus)), [f"{t:g}" for t in taus])
        axis.set_xlabel("merge threshold")
        if axis is axes[0]:
            axis.set_ylabel("tau")
        axis.set_title(f"svd_components {k}", fontsize=9)
    figure.suptitle("leave-one-out mean IoU (red: chosen, dashed: the run's settings)", fontsize=9)
    figure.colorbar(image, ax=list(axes), label="leave-one-out mean IoU")
    with atomic_write(path) as stream:
        figure.savefig(stream, format="png")
