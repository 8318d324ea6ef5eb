"""Operator ``@insid3/fiftyone/calibrate_references``: the tagged references segment each other
over a grid of settings (:func:`insid3_core.calibration.calibrate`); the chosen settings go to the
dataset's plugin settings, where the next ``segment_by_example`` form starts from them."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import settings as plugin_settings
from .plan import choices, plan_references, run_collection
from .references import ReferenceProblem, segmentation_fields

INFO_KEY = "insid3_calibration"
"""``dataset.info`` key holding the last calibration's ``calibration.json`` document."""
SHOWN_POINTS = 10


class CalibrateReferences(foo.Operator):
    """Choose tau, merge threshold and svd components from the references by leave-one-out episodes."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="calibrate_references",
            label="insid3: calibrate from references",
            description="Each reference sample is segmented from the others over a grid of settings; "
                        "the best become this dataset's settings",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx):
        from .operators import class_inputs, engine_inputs

        inputs = types.Object()
        dataset, chosen = ctx.dataset, choices(ctx)
        _, _, problem = calibration_plan(ctx, chosen)
        if problem:
            inputs.view("problem", types.Error(label=problem), invalid=True, error_message=problem)
        inputs.str("reference_tag", default=chosen["reference_tag"], label="Reference tag",
                   description="samples carrying this tag segment each other")
        inputs.enum("reference_field", segmentation_fields(dataset), default=chosen["reference_field"],
                    label="Reference mask field", view=types.Dropdown(label="Reference mask field"))
        class_inputs(inputs, dataset, chosen)
        inputs.str("negative_tag", default=chosen["negative_tag"], label="Negative tag")
        inputs.bool("apply", default=True, label="Use the chosen settings on this dataset",
                    description="store them in the dataset's plugin settings: the next runs start from them")
        engine_inputs(inputs, dataset, mask_dir=False)
        return types.Property(inputs, view=types.View(label="Calibrate from references"))

    def execute(self, ctx):
        from insid3_core.calibration import calibrate

        from .models import segmenter as cached_segmenter

        chosen = choices(ctx)
        found, engine, problem = calibration_plan(ctx, chosen)
        if problem:
            raise ValueError(problem)
        labels = {str(value): str(label) for label, value in found.classes}
        classes = {labels.get(str(key), str(key)): pairs for key, pairs in found.references.items()}
        field = chosen["reference_field"]
        mask_names = [f"{image} [{field}]" for pairs in classes.values() for image, _ in pairs]

        def progress(done: int, total: int) -> None:
            if ctx.delegated:
                ctx.set_progress(progress=done / total, label=f"Calibrating: episode {done}/{total}")

        calibration = calibrate(engine, classes, found.negatives, mask_names=mask_names, progress=progress,
                                segmenter=cached_segmenter(engine))
        document = calibration.document()
        info = dict(ctx.dataset.info or {})
        info[INFO_KEY] = document
        ctx.dataset.info = info
        if ctx.params.get("apply", True):
            plugin_settings.store(ctx.dataset, calibration.settings)
        ctx.dataset.save()
        message = (f"Calibrated: leave-one-out IoU {100 * calibration.default_score:.1f} -> "
                   f"{100 * calibration.best_score:.1f} with {describe(calibration)}")
        flagged = sum(1 for reference in calibration.references if reference.flag)
        if flagged:
            message += f"; {flagged} reference(s) to check"
        ctx.ops.notify(message, variant="warning" if flagged else "success")
        return results(document, message)

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("summary", label="Calibration", view=types.MarkdownView(read_only=True))
        for key, title, columns in (
            ("settings", "Settings", (("option", "Option"), ("run", "Run's value"), ("chosen", "Chosen"))),
            ("references", "References", (("class", "Class"), ("image", "Image"), ("iou_default", "IoU (run's)"),
                                          ("iou_best", "IoU (chosen)"), ("flag", "Check"))),
            ("grid", f"Best {SHOWN_POINTS} settings", (("tau", "Tau"), ("merge_threshold", "Merge threshold"),
                                                      ("svd_components", "SVD components"),
                                                      ("refinement", "Refinement"), ("score", "Mean IoU"))),
        ):
            table = types.TableView()
            for column, label in columns:
                table.add_column(column, label=label)
            outputs.list(key, types.Object(), label=title, view=table)
        return types.Property(outputs, view=types.View(label="Calibration"))


def calibration_plan(ctx, chosen: dict):
    """The references and engine settings of a calibration, or what stops it for the App user:
    ``(ReferencePlan, EngineSettings, None)``, or ``(None, None, problem)``."""
    from .models import engine_problem

    try:
        found = plan_references(run_collection(ctx, chosen), chosen)  # a video dataset's frames view
        engine = plugin_settings.engine_settings(ctx.params, ctx.dataset)
    except (ReferenceProblem, ValueError) as problem:  # SettingsError too
        return None, None, str(problem)
    images = {image for pairs in found.references.values() for image, _ in pairs}
    if len(images) < 2:
        return None, None, (f"Calibration needs references on at least two samples (each is segmented from the "
                            f"others); {len(images)} sample carries the tag '{chosen['reference_tag']}'")
    problem = engine_problem(engine)
    return (None, None, problem) if problem else (found, engine, None)


def describe(calibration) -> str:
    """The chosen values that differ from the run's, e.g. ``tau 0.8, merge_threshold 0.1``."""
    changed = [f"{name} {value}" for name, value in calibration.settings.items() if calibration.defaults[name] != value]
    return ", ".join(changed) or "the run's own settings"


def results(document: dict, message: str) -> dict:
    """The operator's output: a summary and the settings, references and best grid rows as table rows."""
    return {
        "summary": message,
        "settings": [{"option": name, "run": document["defaults"][name], "chosen": value}
                     for name, value in document["settings"].items()],
        "references": [{"class": r["class"], "image": r["image"], "iou_default": percent(r["iou_default"]),
                        "iou_best": percent(r["iou_best"]), "flag": r["flag"] or "ok"} for r in document["references"]],
        "grid": [{**point["settings"], "score": percent(point["score"])}
                 for point in sorted(document["grid"], key=lambda point: -point["score"])[:SHOWN_POINTS]],
    }


def percent(value: float | None) -> float | None:
    """A fraction as a percentage with one decimal (``None`` stays ``None``)."""
    return None if value is None else round(100 * value, 1)
