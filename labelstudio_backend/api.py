"""The Label Studio API calls the backend makes, through ``label-studio-sdk``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TypeVar

from .errors import BackendError

T = TypeVar("T")


class LabelStudioApi:
    """Read projects, tasks and annotations, write predictions and task data; every failure a
    :class:`BackendError`.

    Parameters
    ----------
    base_url : str
    api_key : str
        Legacy token or personal access token (the SDK refreshes the latter).
    """

    def __init__(self, base_url: str, api_key: str) -> None:
        from label_studio_sdk.client import LabelStudio

        self.base_url = base_url
        self.client = LabelStudio(base_url=base_url, api_key=api_key, timeout=120)

    def label_config(self, project: int) -> str:
        """The project's labelling config."""
        return self.call(lambda: self.client.projects.get(id=project).label_config, f"project {project}")

    def tasks(self, project: int, annotated_only: bool = False, page_size: int = 100) -> Iterator[dict]:
        """The project's tasks as dicts, with annotations and predictions."""
        return self._iterate(
            lambda: self.client.tasks.list(project=project, fields="all", only_annotated=annotated_only or None,
                                           page_size=page_size),
            f"tasks of project {project}",
        )

    def annotated_tasks(self, project: int) -> Iterator[dict]:
        """Tasks that have at least one annotation."""
        return (task for task in self.tasks(project, annotated_only=True) if task.get("annotations"))

    def tasks_without(self, project: int, model_version: str, page_size: int = 100) -> Iterator[dict]:
        """Tasks (id and data only) holding no prediction of ``model_version``, through a Data Manager filter."""
        query = {"filters": {"conjunction": "and", "items": [{
            "filter": "filter:tasks:predictions_model_versions", "operator": "not_contains", "type": "List",
            "value": [model_version],
        }]}}
        return self._iterate(
            lambda: self.client.tasks.list(project=project, fields="task_only", query=json.dumps(query),
                                           page_size=page_size),
            f"tasks of project {project}",
        )

    def task_count(self, project: int) -> int:
        """Number of tasks in ``project``."""
        return self.call(lambda: self.client.projects.get(id=project).task_number or 0, f"project {project}")

    def import_predictions(self, project: int, predictions: list[dict]) -> None:
        """Store ``predictions`` (each ``task``, ``result``, ``score``, ``model_version``) in one request."""
        from label_studio_sdk import PredictionRequest

        self.call(
            lambda: self.client.projects.import_predictions(id=project, request=[PredictionRequest(**p) for p in predictions]),
            f"predictions of project {project}",
        )

    def update_task_data(self, task: int, data: dict) -> None:
        """Replace task ``task``'s data by ``data``."""
        self.call(lambda: self.client.tasks.update(id=task, data=data), f"task {task}")

    def call(self, function: Callable[[], T], what: str) -> T:
        """``function()``, its API or connection failure raised as a :class:`BackendError` (502) naming ``what``."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            return function()
        except ApiError as err:
            raise BackendError(f"Label Studio API error on {what}: HTTP {err.status_code}: {err.body}", 502) from err
        except httpx.HTTPError as err:
            raise BackendError(f"cannot reach Label Studio at {self.base_url} ({what}): {err}", 502) from err

    def _iterate(self, pager: Callable, what: str) -> Iterator[dict]:
        """The items of an SDK pager as dicts; errors while paging are :class:`BackendError` too."""
        pages = iter(self.call(pager, what))
        while True:
            item = self.call(lambda: next(pages, None), what)
            if item is None:
                return
            yield item.model_dump(mode="json")
