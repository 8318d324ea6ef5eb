"""A run of ``segment_by_example`` from the operator's parameters: its references per class,
its negatives, its targets and the fields it writes, checked before anything is written."""

from __future__ import annotations

from dataclasses import dataclass

from .labels import Outputs
from .references import (
    BACKGROUND,
    ReferenceProblem,
    check_files,
    chosen_classes,
    class_references,
    class_value,
    field_mask_targets,
    mask_classes,
    negative_pairs,
    reference_pairs,
    segmentation_fields,
)
from .segment import OutputProblem, check_output_field, default_output_field

OUTPUTS = ("segmentation", "instances", "both")
SINGLE_VALUE = 255  # the value of the one class of a single-class Segmentation


@dataclass(frozen=True)
class Plan:
    """What a run segments and writes.

    Attributes
    ----------
    references : dict
        ``{class key: [(image path, (H, W) bool mask), ...]}`` for
        :meth:`insid3_core.Segmenter.encode`, in the order of ``outputs.classes``.
    negatives : list of (str, np.ndarray)
        ``(image path, (H, W) bool mask)`` of the "not this" regions.
    outputs : Outputs
        Fields and classes to write (instance options and mask folder left at their defaults).
    collection : fiftyone.core.collections.SampleCollection
        What the run reads references from and writes to (:func:`run_collection`).
    """

    references: dict
    negatives: list
    outputs: Outputs
    collection: object


def choices(ctx) -> dict:
    """The run's parameters: given values, else their defaults for ``ctx.dataset``."""
    params, dataset = ctx.params, ctx.dataset
    fields = segmentation_fields(dataset)
    output_field = params.get("output_field") or default_output_field(dataset)
    return {
        "reference_tag": params.get("reference_tag") or "reference",
        "negative_tag": params.get("negative_tag") or "negative",
        "reference_field": params.get("reference_field")
        or ("ground_truth" if "ground_truth" in fields else next(iter(fields), None)),
        "reference_class": params.get("reference_class"),
        "reference_classes": list(params.get("reference_classes") or []),
        "all_classes": bool(params.get("all_classes", False)),
        "output": params.get("output") or "segmentation",
        "output_field": output_field,
        "instances_field": params.get("instances_field") or f"{output_field}_instances",
        "instance_label": params.get("instance_label"),
        "overwrite": bool(params.get("overwrite", False)),
    }


def is_multiclass(chosen: dict) -> bool:
    """Whether the run segments several classes into one multi-class mask."""
    return chosen["all_classes"] or bool(chosen["reference_classes"])


def run_collection(ctx, chosen: dict):
    """What a run reads references from and writes to: ``ctx.dataset``, or the frames view of a
    video dataset (:func:`fiftyone_plugin.video.frames_collection`)."""
    from .video import frames_collection, is_video

    if not is_video(ctx.dataset):
        return ctx.dataset
    try:
        return frames_collection(ctx.dataset, chosen)
    except (OSError, RuntimeError, ValueError) as err:
        raise ReferenceProblem(f"The frames of the videos cannot be extracted ({err}); FiftyOne needs ffmpeg for "
                               "video") from None


def target_samples(ctx, chosen: dict, collection=None):
    """The chosen target view (dataset, current view or selection) without references and
    negatives; for videos, their frames in ``collection`` (the run's frames view).

    A view of patches stands for the images they are patches of, a frames view of a video
    dataset for those frames: their ids are not the dataset's sample ids, and masks written under
    them would land nowhere. A clips view is refused (:class:`ReferenceProblem`): its videos hold
    frames outside its clips.
    """
    from .video import is_video, target_frames

    view = ctx.target_view()
    if view._is_clips:
        raise ReferenceProblem("The target is a clips view: choose the videos, or their frames view (to_frames)")
    tags = [chosen["reference_tag"], chosen["negative_tag"]]
    if view._is_patches:
        view = ctx.dataset.select(view.distinct("sample_id"))
    if not is_video(ctx.dataset):
        return view.match_tags(tags, bool=False)
    frames = collection if collection is not None else run_collection(ctx, chosen)
    if view._is_frames:
        return frames.select(view.values("id")).match_tags(tags, bool=False)
    return target_frames(view.match_tags(tags, bool=False), frames, chosen)


def check_run(ctx, chosen: dict) -> tuple[Plan | None, str | None]:
    """The run's :class:`Plan`, or ``None`` and what stops the run, for the App user."""
    from insid3_core.io import check_writable_folder

    from . import settings
    from .models import engine_problem

    try:
        collection = run_collection(ctx, chosen)
        plan = plan_run(collection, chosen)
        engine = settings.engine_settings(ctx.params, ctx.dataset)
        mask_dir = settings.plugin_setting("mask_dir", ctx.params, ctx.dataset)
        for name in ("ray_actors", "delegation_threshold"):  # checked here, used by delegated runs and the
            settings.plugin_setting(name, ctx.params, ctx.dataset)  # choice of delegation
        if mask_dir:
            check_writable_folder(mask_dir, "Mask folder")
        targets = len(target_samples(ctx, chosen, collection))
    except (ReferenceProblem, OutputProblem, ValueError) as problem:  # SettingsError, InputError too
        return None, str(problem)
    if not targets:
        return None, "No target sample: the chosen target holds only references and negatives"
    problem = engine_problem(engine)
    return (None, problem) if problem else (plan, None)


def plan_run(dataset, chosen: dict) -> Plan:
    """Read and check the references, negatives and output fields of a run on ``dataset`` (the
    dataset, or a video dataset's frames view).

    Raises
    ------
    ReferenceProblem, OutputProblem
    """
    found = plan_references(dataset, chosen)
    segmentation_field, instances_field = output_fields(dataset, chosen)
    outputs = Outputs(found.classes, is_multiclass(chosen), segmentation_field, instances_field,
                      mask_targets=found.mask_targets if segmentation_field else None)
    return Plan(found.references, found.negatives, outputs, dataset)


@dataclass(frozen=True)
class ReferencePlan:
    """The references of a run, their files checked.

    Attributes
    ----------
    references : dict
        ``{class key: [(image path, (H, W) bool mask), ...]}``.
    negatives : list of (str, np.ndarray)
    classes : tuple of (str, int or str)
        Each class's label and mask value, in the order of ``references``.
    mask_targets : dict or None
        The output's mask targets: the reference field's for several classes (``None`` when it
        has none), ``{255: label}`` for one class.
    """

    references: dict
    negatives: list
    classes: tuple
    mask_targets: dict | None


def plan_references(dataset, chosen: dict) -> ReferencePlan:
    """The chosen references and negatives of ``dataset``.

    Raises
    ------
    ReferenceProblem
    """
    field = chosen["reference_field"]
    if is_multiclass(chosen):
        wanted = chosen_classes(dataset, field, chosen["reference_classes"], chosen["all_classes"])
        found = class_references(dataset, chosen["reference_tag"], field, wanted, skip_absent=chosen["all_classes"])
        references = {str(value): pairs for value, pairs in found.items()}
        classes = tuple((wanted[value], value) for value in found)
        mask_targets = field_mask_targets(dataset, field)
    else:
        value = class_value(dataset, field, chosen["reference_class"])
        label = chosen["instance_label"] or single_label(dataset, field, value)
        references = {label: reference_pairs(dataset, chosen["reference_tag"], field, value)}
        classes, mask_targets = ((label, SINGLE_VALUE),), {SINGLE_VALUE: label}
    negatives = negative_pairs(dataset, chosen["negative_tag"], field, chosen["reference_tag"])
    for role, pairs in (("reference", [pair for pairs in references.values() for pair in pairs]), ("negative", negatives)):
        check_files(pairs, role)
    return ReferencePlan(references, negatives, classes, mask_targets)


def output_fields(dataset, chosen: dict) -> tuple[str | None, str | None]:
    """The ``Segmentation`` and ``Detections`` fields of the run (``None``: not written), checked."""
    import fiftyone as fo

    output = chosen["output"]
    if output not in OUTPUTS:
        raise OutputProblem(f"output '{output}' is none of {', '.join(OUTPUTS)}")
    segmentation_field = None if output == "instances" else chosen["output_field"]
    instances_field = {"segmentation": None, "instances": chosen["output_field"],
                       "both": chosen["instances_field"]}[output]
    if segmentation_field and segmentation_field == instances_field:
        raise OutputProblem(f"the masks and the instances both go to '{segmentation_field}'; name two fields")
    for name, kind in ((segmentation_field, fo.Segmentation), (instances_field, fo.Detections)):
        if name:
            check_output_field(dataset, name, chosen["reference_field"], chosen["overwrite"], kind)
    return segmentation_field, instances_field


def single_label(dataset, field: str, value) -> str:
    """The label of a single-class run's detections.

    The mask target of the chosen class ``value``; for every nonzero pixel (``None``), the
    one non-background mask target of ``field`` when there is exactly one, else ``object``.
    """
    classes = mask_classes(dataset, field) if field else {}
    if value is not None:
        return str(classes.get(value, value))
    named = [label for key, label in classes.items() if str(key) not in BACKGROUND]
    return str(named[0]) if len(named) == 1 else "object"
