"""The Label Studio API calls the backend makes, through ``label-studio-sdk``."""

from __future__ import annotations

from collections.abc import Iterator

from .errors import BackendError


class LabelStudioApi:
    """Read projects, tasks and annotations, and write predictions.

    Parameters
    ----------
    base_url : str
    api_key : str
        Legacy token or personal access token (the SDK refreshes the latter).
    """

    def __init__(self, base_url: str, api_key: str) -> None:
        from label_studio_sdk.client import LabelStudio

        self.client = LabelStudio(base_url=base_url, api_key=api_key, timeout=120)

    def label_config(self, project: int) -> str:
        """The project's labelling config."""
        return self._call(lambda: self.client.projects.get(id=project).label_config, f"project {project}")

    def tasks(self, project: int, annotated_only: bool = False, page_size: int = 100) -> Iterator[dict]:
        """The project's tasks as dicts, with annotations and predictions."""
        pager = self._call(
            lambda: self.client.tasks.list(project=project, fields="all", only_annotated=annotated_only or None,
                                           page_size=page_size),
            f"tasks of project {project}",
        )
        for task in pager:
            yield task.model_dump(mode="json")

    def annotated_tasks(self, project: int) -> Iterator[dict]:
        """Tasks that have at least one annotation."""
        return (task for task in self.tasks(project, annotated_only=True) if task.get("annotations"))

    def create_prediction(self, project: int, task: int, prediction: dict) -> None:
        """Store ``prediction`` (``result``, ``score``, ``model_version``) on ``task``."""
        self._call(
            lambda: self.client.predictions.create(task=task, project=project, result=prediction["result"],
                                                   score=prediction["score"], model_version=prediction["model_version"]),
            f"prediction of task {task}",
        )

    @staticmethod
    def _call(function, what: str):
        from label_studio_sdk.core.api_error import ApiError

        try:
            return function()
        except ApiError as err:
            raise BackendError(f"Label Studio API error on {what}: HTTP {err.status_code}: {err.body}", 502) from err
