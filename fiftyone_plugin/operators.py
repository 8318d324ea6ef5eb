"""Operator ``@insid3/fiftyone/segment_by_example``: tagged references in, a mask field out."""

from __future__ import annotations

import collections

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import settings as plugin_settings
from .references import ReferenceProblem, class_value, mask_classes, reference_pairs, segmentation_fields
from .segment import OutputProblem, check_output_field, default_output_field, failure_tag, segment_collection

ENGINE_INPUTS = (
    ("weights", "Weights", "Meta DINOv3 .pth checkpoint or timm model name; empty: the random-weight TEST checkpoint"),
    ("image_size", "Image size", "square input side, a multiple of 16"),
    ("svd_components", "SVD components", "positional directions removed; empty: the backbone's default"),
    ("tau", "Tau", "clusters merge while their average cosine distance is below 1 - tau"),
    ("merge_threshold", "Merge threshold", "clusters scoring above it form the mask"),
    ("device", "Device", "auto, cpu, cuda, cuda:N or mps"),
    ("batch_size", "Batch size", "targets per backbone call"),
    ("mask_dir", "Mask folder", "write masks as PNG files under <folder>/<output field>/ (mask_path); empty: inline"),
)


def choices(ctx) -> dict:
    """The run's parameters: given values, else their defaults for ``ctx.dataset``."""
    params, dataset = ctx.params, ctx.dataset
    fields = segmentation_fields(dataset)
    return {
        "reference_tag": params.get("reference_tag") or "reference",
        "reference_field": params.get("reference_field")
        or ("ground_truth" if "ground_truth" in fields else next(iter(fields), None)),
        "reference_class": params.get("reference_class"),
        "output_field": params.get("output_field") or default_output_field(dataset),
        "overwrite": bool(params.get("overwrite", False)),
    }


def target_samples(ctx, reference_tag: str):
    """The chosen target view (dataset, current view or selection) without the references."""
    return ctx.target_view().match_tags(reference_tag, bool=False)


def check_run(ctx, chosen: dict) -> tuple:
    """Check references, output field and targets before anything is written.

    Returns
    -------
    pairs : list of (str, np.ndarray) or None
        The references' image paths and masks, ``None`` on a problem.
    problem : str or None
        What stops the run, for the App user.
    """
    dataset = ctx.dataset
    try:
        value = class_value(dataset, chosen["reference_field"], chosen["reference_class"])
        pairs = reference_pairs(dataset, chosen["reference_tag"], chosen["reference_field"], value)
        check_output_field(dataset, chosen["output_field"], chosen["reference_field"], chosen["overwrite"])
    except (ReferenceProblem, OutputProblem) as problem:
        return None, str(problem)
    if not len(target_samples(ctx, chosen["reference_tag"])):
        return None, "No target sample: the chosen target holds only references"
    return pairs, None


class SegmentByExample(foo.Operator):
    """Segment target samples like the masks of the samples tagged as references."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_by_example",
            label="Segment by example",
            description="Segment targets like the masks of reference samples (INSID3, DINOv3, no training)",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Segment")
        dataset = ctx.dataset
        chosen = choices(ctx)
        _, problem = check_run(ctx, chosen)
        if problem:  # first, where the user sees it; it also keeps the run from starting
            inputs.view("problem", types.Error(label=problem), invalid=True, error_message=problem)
        inputs.str("reference_tag", default=chosen["reference_tag"], label="Reference tag",
                   description="samples carrying this tag are the examples")
        fields = segmentation_fields(dataset)
        inputs.enum("reference_field", fields, default=chosen["reference_field"], label="Reference mask field",
                    view=types.Dropdown(label="Reference mask field"))
        classes = mask_classes(dataset, chosen["reference_field"]) if chosen["reference_field"] else {}
        if len([value for value in classes if str(value) not in ("0", "#000000")]) > 1:
            dropdown = types.Dropdown(label="Reference class", description="empty: every nonzero pixel")
            for value, label in classes.items():
                dropdown.add_choice(str(value), label=f"{label} ({value})")
            inputs.enum("reference_class", dropdown.values(), view=dropdown)
        inputs.str("output_field", default=chosen["output_field"], label="Output field")
        inputs.bool("overwrite", default=False, label="Overwrite",
                    description="replace the values of an existing output field")
        for name, label, description in ENGINE_INPUTS:
            default = plugin_settings.default(name, dataset)
            kind = {int: inputs.int, float: inputs.float}.get(plugin_settings.CASTS.get(name), inputs.str)
            kind(name, default=default, label=label, description=description)
        if not (ctx.params.get("weights") or plugin_settings.default("weights", dataset)):
            inputs.view("smoke_test", types.Warning(
                label="No DINOv3 weights configured",
                description="The random-weight TEST checkpoint gives smoke-test masks, not DINOv3 quality"))
        return types.Property(inputs, view=types.View(label="Segment by example"))

    def resolve_execution_options(self, ctx):
        targets = len(target_samples(ctx, choices(ctx)["reference_tag"]))
        threshold = plugin_settings.default("delegation_threshold", ctx.dataset)
        return foo.ExecutionOptions(
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=targets > threshold,
        )

    def resolve_run_name(self, ctx):
        return f"segment_by_example -> {choices(ctx)['output_field']}"

    def execute(self, ctx):
        if ctx.delegated:
            return run_delegated(ctx)
        return run_immediate(ctx)


def start_run(ctx):
    """Check the inputs, encode the references and return the run's job, its counts and its summary."""
    from insid3_core import InputError

    from .models import segmenter as cached_segmenter

    chosen = choices(ctx)
    pairs, problem = check_run(ctx, chosen)
    if problem:
        raise ValueError(problem)
    engine = plugin_settings.resolve(ctx.params, ctx.dataset)
    segmenter = cached_segmenter(engine)
    try:
        references = segmenter.encode_references(pairs)
    except InputError as err:
        raise ValueError(f"reference unusable: {err}") from err
    counts = collections.Counter()
    targets = target_samples(ctx, chosen["reference_tag"])
    job = segment_collection(segmenter, references, ctx.dataset, targets, chosen["output_field"],
                             engine["batch_size"], engine["mask_dir"], counts)

    def report() -> str:
        return summary(counts, chosen["output_field"], segmenter.backbone.is_smoke_test)

    return job, engine["batch_size"], counts, chosen["output_field"], report


def run_delegated(ctx) -> dict:
    """A delegated run: progress through ``ctx.set_progress``; the returned dict is the run's output."""
    job, _, counts, output_field, report = start_run(ctx)
    total = 0
    for done, total in job:
        ctx.set_progress(progress=done / total, label=f"Segmented {done}/{total}")
    return {"output_field": output_field, "targets": total, "masks_written": sum(counts.values()),
            "verdicts": dict(counts), "summary": report()}


def run_immediate(ctx):
    """An immediate run: a progress bar in the App, then a notification and a reload."""
    job, batch_size, _, _, report = start_run(ctx)
    for done, total in job:
        if done % batch_size == 0 or done == total:
            yield ctx.ops.set_progress(progress=done / total, label=f"Segmented {done}/{total}")
    yield ctx.ops.notify(report(), variant="success")
    yield ctx.ops.reload_dataset()


def summary(counts: collections.Counter, output_field: str, smoke_test: bool) -> str:
    """One line on a run: samples per category and the tags that mark the failures."""
    parts = ", ".join(f"{category} {count}" for category, count in sorted(counts.items()))
    failures = sorted(failure_tag(category) for category in counts if category != "ok")
    tagged = f"; review tags {', '.join(failures)}" if failures else ""
    warning = " (random-weight TEST checkpoint: smoke-test masks)" if smoke_test else ""
    return f"{sum(counts.values())} masks in '{output_field}': {parts}{tagged}{warning}"
