"""Operator ``@insid3/fiftyone/segment_by_example``: tagged references (and negatives) in, a mask
field and/or an instance field out."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

import fiftyone.operators as foo
from insid3_core.config import SMOKE_TEST_NOTE
import fiftyone.operators.types as types

from . import settings as plugin_settings
from .plan import check_run, choices, is_multiclass, single_label, target_samples
from .references import BACKGROUND, ReferenceProblem, class_value, mask_classes, segmentation_fields
from .segment import failure_tag, segment_collection

ENGINE_LABELS = {"weights": "Weights", "backbone": "timm backbone", "device": "Device", "precision": "Precision",
                 "image_size": "Image size", "svd_components": "SVD components", "basis": "Positional basis",
                 "tau": "Tau", "merge_threshold": "Merge threshold", "clustering": "Clustering",
                 "refinement": "Refinement", "min_area_ratio": "Minimum area ratio",
                 "max_area_ratio": "Maximum area ratio", "max_components": "Maximum components",
                 "batch_size": "Batch size", "workers": "Workers"}
"""The form's engine inputs (every EngineSettings option but the instance ones, which the output
choice shows), under the option's own name."""
SCHEDULING_HINT = ("To schedule large runs (Schedule in the Execute menu), start the App with "
                   "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true and run `fiftyone delegated launch`")
MASK_DIR_HELP = "write masks as PNG files under <folder>/<output field>/ (mask_path); empty: inline"


class SegmentByExample(foo.Operator):
    """Segment target samples like the masks of the samples tagged as references."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_by_example",
            label="insid3: segment by example",
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
        if not any(ctx.params.get(name) or plugin_settings.default(name, dataset) for name in ("weights", "backbone")):
            inputs.view("smoke_test", types.Warning(  # at the top: the masks would carry no semantics
                label="No DINOv3 weights configured",
                description=f"The {SMOKE_TEST_NOTE}"))
        inputs.str("reference_tag", default=chosen["reference_tag"], label="Reference tag",
                   description="samples carrying this tag are the examples")
        fields = segmentation_fields(dataset)
        inputs.enum("reference_field", fields, default=chosen["reference_field"], label="Reference mask field",
                    view=types.Dropdown(label="Reference mask field"))
        class_inputs(inputs, dataset, chosen)
        inputs.str("negative_tag", default=chosen["negative_tag"], label="Negative tag",
                   description="samples carrying this tag mark 'not this' regions with their reference-field mask")
        output_inputs(inputs, dataset, chosen)
        inputs.bool("overwrite", default=False, label="Overwrite",
                    description="replace the values of existing output fields")
        engine_inputs(inputs, dataset)
        if not scheduling_available():
            inputs.view("scheduling", types.Notice(label=SCHEDULING_HINT))
        return types.Property(inputs, view=types.View(label="Segment by example"))

    def resolve_execution_options(self, ctx):
        try:
            targets = len(target_samples(ctx, choices(ctx)))
        except ReferenceProblem:  # the form says why; nothing runs
            targets = 0
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
    plan, problem = check_run(ctx, chosen)
    if problem:
        raise ValueError(problem)
    engine = plugin_settings.engine_settings(ctx.params, ctx.dataset)
    outputs = dataclasses.replace(plan.outputs, instance_method=engine.instance_method,
                                  min_instance_patches=engine.min_instance_patches,
                                  mask_dir=plugin_settings.plugin_setting("mask_dir", ctx.params, ctx.dataset))
    segmenter = cached_segmenter(engine)
    try:
        classes = segmenter.encode(plan.references, plan.negatives)
    except InputError as err:
        raise ValueError(f"reference unusable: {err}") from err
    remember_form_values(ctx)  # once the engine has loaded and read the references with them
    record_provenance(ctx.dataset, outputs.fields, engine, segmenter, classes)
    counts = collections.Counter()
    job = explained(segment_collection(segmenter, classes, plan.collection, target_samples(ctx, chosen, plan.collection),
                                       outputs, engine.batch_size, counts, ray_predictions(ctx, engine, plan)))

    def report() -> str:
        return summary(counts, outputs.fields, segmenter.backbone.is_smoke_test, ctx.dataset.media_type == "video")

    return job, engine.batch_size, counts, outputs, report


def ray_predictions(ctx, engine, plan):
    """For a delegated run with the plugin setting ``ray_address``: a function sending the targets'
    paths through a Ray cluster's engine actors (``ray_actors`` of them, see
    :func:`insid3_core.distributed.iter_predictions`); ``None`` otherwise (this process segments)."""
    address = plugin_settings.plugin_setting("ray_address", ctx.params, ctx.dataset) if ctx.delegated else None
    if not address:
        return None
    from insid3_core.distributed import ClusterOptions, JobSpec, connect, iter_predictions, reference_payload

    options = ClusterOptions(address, plugin_settings.plugin_setting("ray_actors", ctx.params, ctx.dataset))
    connect(options, "plugin setting 'ray_address'")
    job = JobSpec(engine, None, tuple(plan.references), None, False, reference_payload(plan.references, plan.negatives))
    return lambda paths: iter_predictions(job, [{"path": path} for path in paths], options)


def remember_form_values(ctx) -> None:
    """Write the engine options and the mask folder given to a run into the dataset's plugin
    settings, so the next form on this dataset starts from them; only values a segmenter was
    built with are kept, so a run that cannot start leaves the settings as they were."""
    from insid3_core.settings import EngineSettings

    names = (*EngineSettings.names(), "mask_dir")
    given = {name: ctx.params[name] for name in names if ctx.params.get(name) not in (None, "")}
    stored = (ctx.dataset.app_config.plugins or {}).get(plugin_settings.PLUGIN_NAME) or {}
    if any(stored.get(name) != value for name, value in given.items()):
        plugin_settings.store(ctx.dataset, given)
        ctx.dataset.save()


def record_provenance(dataset, fields, engine, segmenter, references) -> None:
    """``dataset.info["insid3"][field]``: the settings, weights and references each field was made
    with (``EngineSettings.describe()``, as ``insid3 segment`` writes beside its masks)."""
    from insid3_core import __version__

    made_with = {"version": __version__, "backbone": segmenter.backbone.name, "weights_id": segmenter.backbone.identity,
                 "smoke_test": segmenter.backbone.is_smoke_test,
                 "settings": {**engine.describe(), "svd_components": int(segmenter.basis.shape[1])},
                 "references": {name: list(encoded.names) for name, encoded in references.classes.items()}}
    info = dict(dataset.info or {})
    info["insid3"] = {**info.get("insid3", {}), **{field: made_with for field in fields}}
    dataset.info = info
    dataset.save()


def scheduling_available() -> bool:
    """Whether the App offers delegated ("Schedule") runs: FiftyOne's open-source orchestrator needs
    ``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true``."""
    import fiftyone as fo

    return bool(getattr(fo.config, "allow_legacy_orchestrators", True))


def engine_inputs(inputs, dataset, mask_dir: bool = True) -> None:
    """An input per engine option (its default for ``dataset``), and the mask folder."""
    from insid3_core.settings import EngineSettings

    for name, label in ENGINE_LABELS.items():
        option = EngineSettings.__dataclass_fields__[name].metadata
        default = plugin_settings.default(name, dataset)
        if option["choices"]:
            choices = types.Dropdown(label=label, description=option["help"])
            for choice in option["choices"]:
                choices.add_choice(choice, label=choice)
            inputs.enum(name, choices.values(), default=default, view=choices)
            continue
        field = {int: inputs.int, float: inputs.float}.get(option["kind"], inputs.str)
        field(name, default=default, label=label, description=option["help"])
    if mask_dir:
        inputs.str("mask_dir", default=plugin_settings.default("mask_dir", dataset), label="Mask folder",
                   description=MASK_DIR_HELP)


def class_inputs(inputs, dataset, chosen: dict) -> None:
    """The class choices of a multi-class reference field: every class, several, or one."""
    field = chosen["reference_field"]
    classes = mask_classes(dataset, field) if field else {}
    named = {value: label for value, label in classes.items() if str(value) not in BACKGROUND}
    if len(named) < 2:
        return
    inputs.bool("all_classes", default=False, label="Every class in one pass",
                description="segment every class of the mask targets into one multi-class mask")
    if chosen["all_classes"]:
        return
    several = types.DropdownView(multiple=True, label="Classes in one pass",
                                 description="several classes segmented together into one multi-class mask")
    for value, label in named.items():
        several.add_choice(str(value), label=f"{label} ({value})")
    inputs.list("reference_classes", types.String(), view=several)
    if chosen["reference_classes"]:
        return
    dropdown = types.Dropdown(label="Reference class", description="empty: every nonzero pixel")
    for value, label in classes.items():
        dropdown.add_choice(str(value), label=f"{label} ({value})")
    inputs.enum("reference_class", dropdown.values(), view=dropdown)


def output_inputs(inputs, dataset, chosen: dict) -> None:
    """What the run writes: a mask, instances or both, the fields and the instance options."""
    from insid3_core.instances import INSTANCE_METHODS

    kinds = types.RadioGroup(label="Output")
    kinds.add_choice("segmentation", label="Mask", description="a Segmentation per target")
    kinds.add_choice("instances", label="Instances",
                     description="Detections: a box and an instance mask per object")
    kinds.add_choice("both", label="Mask and instances")
    inputs.enum("output", kinds.values(), default="segmentation", view=kinds)
    inputs.str("output_field", default=chosen["output_field"], label="Output field")
    if chosen["output"] == "both":
        inputs.str("instances_field", default=chosen["instances_field"], label="Instances field")
    if chosen["output"] == "segmentation":
        return
    if not is_multiclass(chosen):
        try:
            label = single_label(dataset, chosen["reference_field"],
                                 class_value(dataset, chosen["reference_field"], chosen["reference_class"]))
        except ValueError:
            label = "object"
        inputs.str("instance_label", default=label, label="Instance label", description="label of the detections")
    method = types.Dropdown(label="Instance method")
    for name in INSTANCE_METHODS:
        method.add_choice(name, label=name)
    inputs.enum("instance_method", method.values(), view=method,
                default=plugin_settings.default("instance_method", dataset),
                description="necks: regions split where objects touch; components: connected regions; "
                            "clusters: regions of one feature cluster")
    inputs.int("min_instance_patches", default=plugin_settings.default("min_instance_patches", dataset),
               label="Minimum instance patches", description="instances of fewer feature patches are dropped")


def explained(job: Iterator) -> Iterator:
    """``job``'s progress; running out of memory raises a ``RuntimeError`` naming the settings that
    lower the memory a run needs (:func:`insid3_core.settings.out_of_memory_message`)."""
    from insid3_core.settings import out_of_memory_message

    try:
        yield from job
    except (RuntimeError, MemoryError) as err:
        message = out_of_memory_message(err)
        if message is None:
            raise
        raise RuntimeError(message) from err


def run_delegated(ctx) -> dict:
    """A delegated run: progress through ``ctx.set_progress``; the returned dict is the run's output."""
    job, _, counts, outputs, report = start_run(ctx)
    total = 0
    for done, total in job:
        ctx.set_progress(progress=done / total, label=f"Segmented {done}/{total}")
    return {"output_field": outputs.segmentation_field or outputs.instances_field,
            "instances_field": outputs.instances_field, "classes": [label for label, _ in outputs.classes],
            "targets": total, "masks_written": sum(counts.values()), "verdicts": dict(counts), "summary": report()}


def run_immediate(ctx):
    """An immediate run: a progress bar in the App, then a notification and a reload.

    A failure is shown as an error notification before it is raised: the App drops an exception
    raised inside a generator, so the user would otherwise see the form close and nothing else.
    """
    try:
        job, batch_size, _, _, report = start_run(ctx)
        for done, total in job:
            if done % batch_size == 0 or done == total:
                yield ctx.ops.set_progress(progress=done / total, label=f"Segmented {done}/{total}")
    except Exception as err:
        yield ctx.ops.notify(f"Segment by example failed: {err}", variant="error")
        raise
    yield ctx.ops.notify(report(), variant="success")
    yield ctx.ops.reload_dataset()


def summary(counts: collections.Counter, fields: list[str], smoke_test: bool, frames: bool = False) -> str:
    """One line on a run: samples per category and the tags that mark the failures (on a
    video's ``frames``, label tags)."""
    parts = ", ".join(f"{category} {count}" for category, count in sorted(counts.items()))
    failures = sorted(failure_tag(fields[0], category) for category in counts if category != "ok")
    tagged = f"; review {'label ' if frames else ''}tags {', '.join(failures)}" if failures else ""
    warning = f" ({SMOKE_TEST_NOTE})" if smoke_test else ""
    where = " and ".join(f"'{field}'" for field in fields)
    return f"{sum(counts.values())} masks in {where}: {parts}{tagged}{warning}"
