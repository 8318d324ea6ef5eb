"""Panel ``insid3: review masks``: a predicted field's verdicts, classes and scores, each count a
click that loads its samples; a score threshold to drag; approve, reject and copy to ground truth.

A thin layer over :mod:`fiftyone_plugin.curation`: the panel keeps the field, the threshold and the
ground-truth choice in its state and renders a fresh :func:`~fiftyone_plugin.curation.summarize`
after every event.
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import curation
from .review import HISTOGRAM_CONFIG, histogram_figure

DEFAULT_THRESHOLD = 0.5
DEFAULT_GROUND_TRUTH = "ground_truth"


class ReviewPanel(foo.Panel):
    """Review a predicted mask field the way FiftyOne's model evaluation panel reviews a model."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="review_masks",
            label="insid3: review masks",
            icon="fact_check",
            surfaces="grid",
            help_markdown="Counts per verdict and class (click to see the samples), the score histogram "
                          "with a threshold, approve/reject tags `insid3:<field>:approved|rejected`, "
                          "and copying approved masks into a ground-truth field.",
        )

    def on_load(self, ctx):
        ctx.panel.state.field = ctx.panel.state.field or curation.default_field(ctx.dataset)
        if ctx.panel.state.threshold is None:
            ctx.panel.state.threshold = DEFAULT_THRESHOLD

    def on_change_dataset(self, ctx):
        self.on_load(ctx)

    def on_change_selected(self, ctx):
        """Re-rendered: the approve and reject buttons name the selection."""

    def on_change_view(self, ctx):
        """Re-rendered: without a selection, approve and reject act on the new view."""

    def choose_field(self, ctx):
        ctx.panel.state.field = ctx.params.get("value")

    def move_threshold(self, ctx):
        value = ctx.params.get("value")
        if isinstance(value, (int, float)):
            ctx.panel.state.threshold = min(max(float(value), 0.0), 1.0)

    def show_verdict(self, ctx):
        ctx.ops.set_view(view=curation.verdict_view(ctx.dataset, self._field(ctx), ctx.params["verdict"]))

    def show_decision(self, ctx):
        ctx.ops.set_view(view=curation.decision_view(ctx.dataset, self._field(ctx), ctx.params["decision"]))

    def show_class(self, ctx):
        view = curation.class_view(ctx.dataset, self._field(ctx), ctx.params["label"],
                                   failed=bool(ctx.params.get("failed")))
        ctx.ops.set_view(view=view)

    def show_below(self, ctx):
        ctx.ops.set_view(view=curation.score_view(ctx.dataset, self._field(ctx), high=self._threshold(ctx)))

    def show_above(self, ctx):
        ctx.ops.set_view(view=curation.score_view(ctx.dataset, self._field(ctx), low=self._threshold(ctx)))

    def show_bin(self, ctx):
        """A click on a histogram bar: the samples of that bar's score range."""
        centre = ctx.params.get("x")
        if not isinstance(centre, (int, float)):
            return
        half = 0.5 / curation.BINS
        view = curation.score_view(ctx.dataset, self._field(ctx), max(centre - half, 0.0), min(centre + half, 1.0))
        ctx.ops.set_view(view=view)

    def approve(self, ctx):
        self._decide(ctx, "approved")

    def reject(self, ctx):
        self._decide(ctx, "rejected")

    def copy_approved(self, ctx):
        field = self._field(ctx)
        target = (ctx.panel.get_state("copy.ground_truth") or DEFAULT_GROUND_TRUTH).strip()
        try:
            result = curation.copy_approved(ctx.dataset, field, target,
                                            replace=bool(ctx.panel.get_state("copy.replace")))
        except ValueError as err:
            ctx.ops.notify(f"Nothing copied: {err}", variant="error")
            return
        kept = f"; kept the existing ground truth of {result.kept} (tick replace to overwrite)" if result.kept else ""
        ctx.ops.notify(f"Copied {result.copied} approved mask(s) of '{field}' into '{target}'{kept}",
                       variant="success" if result.copied else "info")
        ctx.ops.reload_dataset()

    def render(self, ctx):
        panel = types.Object()
        fields = curation.predicted_fields(ctx.dataset)
        field = self._field(ctx)
        if field is None:
            panel.md("No mask field to review yet: run **insid3: segment by example** first.", name="empty")
            return types.Property(panel, view=types.GridView(orientation="vertical", pad=2))
        choice = types.Dropdown(label="Predicted mask field")
        for name in fields:
            choice.add_choice(name, label=name)
        panel.enum("field", choice.values(), default=field, view=choice, on_change=self.choose_field)
        summary = curation.summarize(ctx.dataset, field)
        self._counts(panel, summary)
        self._scores(panel, ctx, summary)
        self._decisions(panel, ctx, summary)
        panel.md(curation.run_description(ctx.dataset, field), name="run")
        return types.Property(panel, view=types.GridView(orientation="vertical", pad=2, gap=2))

    def _counts(self, panel, summary) -> None:
        panel.md(f"#### {summary.predicted} masks in `{summary.field}` ({summary.kind})", name="counts_title")
        verdicts = panel.h_stack("verdicts", gap=1, align_x="left")
        for verdict, count in summary.verdicts.items():
            verdicts.btn(f"verdict_{verdict}", label=f"{verdict} · {count}", on_click=self.show_verdict,
                         params={"verdict": verdict}, variant="contained" if verdict == "ok" else "outlined",
                         disabled=not count)
        if summary.classes:
            classes = panel.h_stack("classes", gap=1, align_x="left")
            for number, found in enumerate(summary.classes):
                classes.btn(f"class_{number}", label=f"{found.label} · {found.found}", on_click=self.show_class,
                            params={"label": found.label}, variant="outlined", disabled=not found.found)
                if found.failed:
                    classes.btn(f"class_{number}_failed", label=f"{found.label} failed · {found.failed}",
                                on_click=self.show_class, params={"label": found.label, "failed": True},
                                variant="outlined")

    def _scores(self, panel, ctx, summary) -> None:
        threshold = self._threshold(ctx)
        data, layout = histogram_figure(summary.histogram, threshold)
        panel.plot("scores", data=data, layout=layout, config=HISTOGRAM_CONFIG, on_click=self.show_bin, height="340px")
        panel.float("threshold", min=0.0, max=1.0, default=threshold, on_change=self.move_threshold,
                    view=types.SliderView(label="Threshold", value_precision=2))
        below = len(curation.score_view(ctx.dataset, summary.field, high=threshold))
        above = len(curation.score_view(ctx.dataset, summary.field, low=threshold))
        videos = " video(s)" if curation.is_frame_field(summary.field) else ""  # what the click loads
        scores = panel.h_stack("threshold_views", gap=1, align_x="left")
        scores.btn("below", label=f"{below}{videos} below {threshold:.2f}", on_click=self.show_below,
                   variant="contained", disabled=not below)
        scores.btn("above", label=f"{above}{videos} at or above {threshold:.2f}", on_click=self.show_above,
                   variant="outlined", disabled=not above)

    def _decisions(self, panel, ctx, summary) -> None:
        decisions = panel.h_stack("decisions", gap=1, align_x="left")
        for decision, count in summary.decisions.items():
            decisions.btn(f"decision_{decision}", label=f"{decision} · {count}", on_click=self.show_decision,
                          params={"decision": decision}, variant="outlined", disabled=not count)
        which = f"{len(ctx.selected)} selected" if ctx.selected else "the samples in view"
        actions = panel.h_stack("actions", gap=1, align_x="left")
        actions.btn("approve", label=f"Approve {which}", on_click=self.approve, variant="contained", icon="check")
        actions.btn("reject", label=f"Reject {which}", on_click=self.reject, variant="outlined", icon="close")
        copy = panel.h_stack("copy", gap=1, align_x="left", align_y="center")
        copy.str("ground_truth", default=DEFAULT_GROUND_TRUTH, label="Ground-truth field")
        copy.bool("replace", default=False, label="Replace existing ground truth")
        approved = summary.decisions["approved"]
        label = (f"Copy the masks of {approved} approved video(s)" if curation.is_frame_field(summary.field)
                 else f"Copy {approved} approved masks")
        copy.btn("copy_approved", label=label, on_click=self.copy_approved, variant="contained", disabled=not approved)

    def _decide(self, ctx, decision: str) -> None:
        field = self._field(ctx)
        samples = ctx.dataset.select(ctx.selected) if ctx.selected else ctx.view
        tagged = curation.decide(samples, field, decision)
        unit = "video(s)" if curation.is_frame_field(field) else "sample(s)"
        ctx.ops.notify(f"{decision.capitalize()} {tagged} {unit} of '{field}' "
                       f"(tag {curation.decision_tag(field, decision)})", variant="success" if tagged else "info")
        ctx.ops.reload_dataset()

    @staticmethod
    def _field(ctx) -> str | None:
        """The field in the panel's state while the dataset has it, else the default one."""
        chosen = ctx.panel.state.field
        return chosen if chosen in curation.predicted_fields(ctx.dataset) else curation.default_field(ctx.dataset)

    @staticmethod
    def _threshold(ctx) -> float:
        value = ctx.panel.state.threshold
        return DEFAULT_THRESHOLD if value is None else float(value)
