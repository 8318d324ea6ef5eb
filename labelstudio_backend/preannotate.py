"""Push predictions for every task of a project, in batches, resumably."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .errors import BackendError


@dataclass
class Report:
    """What a pre-annotation run did.

    Attributes
    ----------
    model_version : str
    done : int
        Tasks given a prediction now.
    skipped : int
        Tasks that already had one of ``model_version`` (an interrupted run resumes where it stopped).
    failures : list of str
        ``task <id>: <reason>`` for tasks whose image could not be used.
    """

    model_version: str
    done: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)


def preannotate(backend, project: int, batch_size: int = 8, progress: bool = True) -> Report:
    """Predict every task of ``project`` lacking a prediction of the current model version.

    The references are read from the project's annotations first (unchanged ones are not
    downloaded again). Each batch of ``batch_size`` tasks is segmented in one pass and its
    predictions stored in one API request (a task whose image did not fit in
    ``INSID3_MAX_PIXELS_IN_FLIGHT`` beside its batch-mates' is tried again alone), so an
    interrupted run loses at most one batch and
    the next run skips the tasks already done. Then every task's verdict columns are set from
    its current prediction (:func:`sync_verdicts`). Raises :class:`BackendError` when nothing can be
    predicted (bad config, no references, Label Studio unreachable).
    """
    from tqdm import tqdm

    from .labelconfig import region_target

    label_config = backend.api.label_config(project)
    target = region_target(label_config)
    backend.prepare(project, target, force=True)
    version = backend.model_version(project)
    pending = list(backend.api.tasks_without(project, version))
    report = Report(version, skipped=backend.api.task_count(project) - len(pending))
    with tqdm(total=len(pending), desc=f"project {project} ({version})", unit="task", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            predictions, _ = backend.predict(batch, project, label_config, wait=None)
            for index, item in enumerate(predictions):  # a 413 of the batch's pixels together: alone it may fit
                if len(batch) > 1 and isinstance(item, BackendError) and item.status == 413:
                    (predictions[index],), _ = backend.predict([batch[index]], project, label_config, wait=None)
            stored = []
            for task, item in zip(batch, predictions):
                if isinstance(item, BackendError):
                    report.failures.append(f"task {task['id']}: {item.message}")
                else:
                    stored.append({"task": task["id"], **item})
            if stored:
                backend.api.import_predictions(project, stored)
            report.done += len(stored)
            bar.update(len(batch))
    sync_verdicts(backend.api, project, version, backend.predicted_labels(project, target))
    return report


def sync_verdicts(api, project: int, version: str, labels: list[str]) -> int:
    """Set the verdict columns (:data:`~labelstudio_backend.results.VERDICT_FIELDS`) of every task
    from its prediction of ``version`` (which segments ``labels``), so filtering and sorting by
    them sees the current model version only; a task with none (its image failed) that carries
    older ones gets ``insid3_verdict`` ``not predicted``. Returns the number of tasks updated."""
    from .results import VERDICT_FIELDS, verdict_fields

    updated = 0
    for task in api.tasks(project):
        current = [p for p in task.get("predictions") or [] if p.get("model_version") == version]
        data = task.get("data") or {}
        if current:
            fields = verdict_fields(current[-1], labels)
        elif any(name in data for name in VERDICT_FIELDS):
            fields = {"insid3_verdict": "not predicted", "insid3_verdicts": "", "insid3_score": None,
                      "insid3_model_version": version}
        else:
            continue
        if any(data.get(name) != value for name, value in fields.items()):
            api.update_task_data(task["id"], {**data, **fields})
            updated += 1
    return updated
