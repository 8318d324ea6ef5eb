"""Review operators: a quality report, saved views per failure category, and tagging the
current selection as references."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from .curation import BINS, default_field, predicted_fields, summarize, verdict_view
from .segment import FAILURES

CATEGORIES = ("ok",) + FAILURES
HISTOGRAM_LAYOUT = {  # readable in the operator's output and the panel: tall enough, titled axes, room for ticks
    "height": 320, "margin": {"l": 60, "r": 20, "t": 20, "b": 50},
    "xaxis": {"title": {"text": "score"}, "range": [0, 1], "dtick": 0.1},
    "yaxis": {"title": {"text": "masks"}, "rangemode": "tozero"},
    "bargap": 0.05,
}
HISTOGRAM_CONFIG = {"displayModeBar": False, "responsive": True}  # no toolbar over the bars


def predicted_field_input(ctx, inputs) -> str | None:
    """Add the ``field`` choice (Segmentation and Detections fields; by default the one insid3
    wrote last); return the chosen or default one."""
    default = default_field(ctx.dataset)
    inputs.enum("field", predicted_fields(ctx.dataset), default=default, required=True,
                label="Predicted mask field", view=types.Dropdown(label="Predicted mask field"))
    return ctx.params.get("field") or default


def histogram_figure(histogram: dict, threshold: float | None = None) -> tuple[list, dict]:
    """Plotly ``(data, layout)`` of a :class:`~fiftyone_plugin.curation.FieldSummary` histogram:
    one bar per bin, whole-number ticks of masks, and a vertical line at ``threshold``."""
    edges, counts = histogram["edges"], histogram["counts"]
    centres = [round((a + b) / 2, 3) for a, b in zip(edges[:-1], edges[1:])]
    bars = {"type": "bar", "x": centres, "y": counts, "width": 1.0 / BINS, "marker": {"color": "#ff6d04"},
            "hovertemplate": "score %{x:.2f}: %{y} masks<extra></extra>"}
    whole_ticks = max(1, -(-max(counts, default=0) // 6))  # about six ticks, never a fraction of a mask
    layout = {**HISTOGRAM_LAYOUT, "yaxis": {**HISTOGRAM_LAYOUT["yaxis"], "dtick": whole_ticks}}
    if threshold is not None:
        layout["shapes"] = [{"type": "line", "x0": threshold, "x1": threshold, "y0": 0, "y1": 1, "yref": "paper",
                             "line": {"color": "#1f77b4", "width": 3}}]
    return [bars], layout


class QualityReport(foo.Operator):
    """Counts per quality category and a histogram of the scores of a predicted mask field."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="quality_report",
            label="insid3: quality report of a mask field",
            description="Masks per failure category and the score histogram",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Report on")
        predicted_field_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Quality report"))

    def execute(self, ctx):
        summary = summarize(ctx.target_view(), ctx.params["field"])
        return {"field": summary.field, "counts": summary.verdicts, "histogram": summary.histogram}

    def resolve_output(self, ctx):
        outputs = types.Object()
        results = ctx.results or {}
        counts = types.Object()
        for category in CATEGORIES:
            counts.int(category, label=category, view=types.View(read_only=True))
        outputs.define_property("counts", counts, label="Masks per category")
        histogram = results.get("histogram")
        if histogram:
            data, layout = histogram_figure(histogram)
            outputs.plot("score_histogram", label="Scores", config=HISTOGRAM_CONFIG, layout=layout, data=data)
        return types.Property(outputs, view=types.View(label="Quality report"))


class SaveFailureViews(foo.Operator):
    """Save one view per failure category of a predicted mask field, replacing only the views it
    saved itself (told apart by their description); a user's view of the same name is kept."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="save_failure_views",
            label="insid3: save failure views",
            description="A saved view per failure category (too_small, too_large, fragmented, empty, unreadable)",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        predicted_field_input(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Save failure views"))

    def execute(self, ctx):
        dataset, field = ctx.dataset, ctx.params["field"]
        saved, kept = [], []
        for category in FAILURES:
            view = verdict_view(dataset, field, category)
            if len(view):
                name, description = failure_view_name(field, category), f"{field}: masks judged {category}"
                if dataset.has_saved_view(name) and dataset.get_saved_view_info(name).get("description") != description:
                    kept.append(name)  # a view of the user's own under that name: never replaced
                    continue
                dataset.save_view(name, view, description=description, overwrite=True)
                saved.append(name)
        if kept:
            ctx.ops.notify(f"Kept your own saved view(s) {', '.join(kept)}: rename them to save insid3's",
                           variant="warning")
        if saved:
            ctx.ops.notify(f"Saved {len(saved)} view(s) of '{field}': {', '.join(saved)}", variant="success")
            ctx.ops.reload_dataset()  # the saved views list shows them without a page reload
        elif not kept:
            ctx.ops.notify(f"No failure in '{field}': no view saved", variant="info")
        return {"views": saved, "kept": kept}


def failure_view_name(field: str, category: str) -> str:
    """Name of the saved view of one failure category, e.g. ``insid3 too_small``."""
    return f"{field} {category}"


class TagReferences(foo.Operator):
    """Tag the selected samples as references for ``segment_by_example``."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="tag_references",
            label="insid3: tag selection as references",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("reference_tag", default="reference", label="Reference tag")
        if not ctx.selected:
            message = "Select the samples whose masks show the object, then run this again"
            inputs.view("problem", types.Error(label=message), invalid=True, error_message=message)
        return types.Property(inputs, view=types.View(label="Tag references"))

    def execute(self, ctx):
        tag = ctx.params.get("reference_tag") or "reference"
        samples = ctx.dataset.select(ctx.selected)
        samples.tag_samples(tag)
        ctx.ops.notify(f"Tagged {len(samples)} sample(s) '{tag}'", variant="success")
        ctx.ops.reload_dataset()  # the tag shows in the grid and the sidebar without a page reload
        return {"tagged": len(samples)}

