"""Push predictions for every task of a project, in batches, resumably."""

from __future__ import annotations

import sys

from .errors import BackendError
from .labelconfig import brush_target


def pending_tasks(tasks, model_version: str) -> list[dict]:
    """Tasks without a prediction of ``model_version`` (those done by an earlier run are skipped)."""
    return [
        task for task in tasks
        if not any(p.get("model_version") == model_version for p in task.get("predictions") or [])
    ]


def preannotate(backend, project: int, batch_size: int = 8, progress: bool = True) -> tuple[str, int, int, list[str]]:
    """Predict and store every task of ``project`` lacking a prediction of the current model version.

    Returns
    -------
    model_version : str
    done : int
        Tasks given a prediction now.
    skipped : int
        Tasks that already had one (an interrupted run resumes where it stopped).
    failures : list of str
        ``task <id>: <reason>`` for tasks whose image could not be used.
    """
    from tqdm import tqdm

    label_config = backend.api.label_config(project)
    backend.sync(project, brush_target(label_config), force=True)
    version = backend.model_version(project)
    tasks = list(backend.api.tasks(project))
    pending = pending_tasks(tasks, version)
    done, failures = 0, []
    with tqdm(total=len(pending), desc=f"project {project} ({version})", unit="task", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            try:
                predictions, _ = backend.predict(batch, project, label_config)
            except BackendError as err:
                if len(batch) > 1 or err.status >= 500:
                    raise
                predictions = [err]
            for task, item in zip(batch, predictions):
                if isinstance(item, BackendError):
                    failures.append(f"task {task['id']}: {item.message}")
                else:
                    backend.api.create_prediction(project, task["id"], item)
                    done += 1
            bar.update(len(batch))
    return version, done, len(tasks) - len(pending), failures
