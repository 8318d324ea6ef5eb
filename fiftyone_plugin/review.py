"""Review operators: a quality report, saved views per failure category, and tagging the
current selection as references."""

from __future__ import annotations

import numpy as np

import fiftyone.operators as foo
import fiftyone.operators.types as types

from .segment import FAILURES, failure_tags

CATEGORIES = ("ok",) + FAILURES
BINS = 10
HISTOGRAM_LAYOUT = {  # readable in the operator's output: tall enough, titled axes, room for their ticks
    "height": 320, "margin": {"l": 60, "r": 20, "t": 20, "b": 50},
    "xaxis": {"title": {"text": "score"}, "range": [0, 1], "dtick": 0.1},
    "yaxis": {"title": {"text": "masks"}, "rangemode": "tozero"},
    "bargap": 0.05,
}
HISTOGRAM_CONFIG = {"displayModeBar": False, "responsive": True}  # no toolbar over the bars


def predicted_field_input(ctx, inputs) -> str | None:
    """Add the ``field`` choice (Segmentation and Detections fields; by default the one insid3
    wrote last); return the chosen or default one."""
    import fiftyone as fo

    fields = sorted(ctx.dataset.get_field_schema(embedded_doc_type=(fo.Segmentation, fo.Detections)))
    made = [field for field in ((ctx.dataset.info or {}).get("insid3") or {}) if field in fields]
    default = made[-1] if made else "insid3" if "insid3" in fields else next(iter(fields), None)
    inputs.enum("field", fields, default=default, required=True, label="Predicted mask field",
                view=types.Dropdown(label="Predicted mask field"))
    return ctx.params.get("field") or default


def quality_counts(collection, field: str) -> dict:
    """Samples per category of ``field`` in ``collection`` (unreadable ones by their tag)."""
    verdicts = collection.count_values(f"{field}.verdict")
    counts = {category: int(verdicts.get(category, 0)) for category in CATEGORIES}
    counts["unreadable"] = len(collection.match_tags(failure_tags(field, "unreadable")))
    return counts


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
        collection, field = ctx.target_view(), ctx.params["field"]
        scores = np.array([s for s in collection.values(f"{field}.score") if s is not None], dtype=float)
        counts, edges = np.histogram(scores, bins=BINS, range=(0.0, 1.0))
        return {
            "field": field,
            "counts": quality_counts(collection, field),
            "histogram": {"edges": edges.round(3).tolist(), "counts": counts.tolist()},
        }

    def resolve_output(self, ctx):
        outputs = types.Object()
        results = ctx.results or {}
        counts = types.Object()
        for category in CATEGORIES:
            counts.int(category, label=category, view=types.View(read_only=True))
        outputs.define_property("counts", counts, label="Masks per category")
        histogram = results.get("histogram")
        if histogram:
            centres = [(a + b) / 2 for a, b in zip(histogram["edges"][:-1], histogram["edges"][1:])]
            outputs.plot("score_histogram", label="Scores", config=HISTOGRAM_CONFIG, layout=HISTOGRAM_LAYOUT,
                         data=[{"type": "bar", "x": centres, "y": histogram["counts"], "width": 1.0 / BINS,
                                "marker": {"color": "#ff6d04"}, "hovertemplate": "score %{x:.2f}: %{y} masks<extra></extra>"}])
        return types.Property(outputs, view=types.View(label="Quality report"))


class SaveFailureViews(foo.Operator):
    """Save one view per failure category of a predicted mask field."""

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
        from fiftyone import ViewField as F

        dataset, field = ctx.dataset, ctx.params["field"]
        saved = []
        for category in FAILURES:
            if category == "unreadable":
                view = dataset.match_tags(failure_tags(field, category))
            else:
                view = dataset.match(F(f"{field}.verdict") == category)
            if len(view):
                name = failure_view_name(field, category)
                dataset.save_view(name, view, description=f"{field}: masks judged {category}", overwrite=True)
                saved.append(name)
        if saved:
            ctx.ops.notify(f"Saved {len(saved)} view(s) of '{field}': {', '.join(saved)}", variant="success")
            ctx.ops.reload_dataset()  # the saved views list shows them without a page reload
        else:
            ctx.ops.notify(f"No failure in '{field}': no view saved", variant="info")
        return {"views": saved}


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

