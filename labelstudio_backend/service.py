"""The backend's work behind the HTTP routes: reference pools, predictions, webhook events."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np

from .errors import BackendError
from .images import ImageFetcher
from .labelconfig import BrushTarget, brush_target
from .references import AnnotationStore, Pairs, merge, pool_version, scan_folder
from .results import prediction
from .rle import rle_to_mask
from .settings import Settings

log = logging.getLogger(__name__)
REFERENCE_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_EVENTS = ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED")
SYNC_EVENTS = ("ANNOTATIONS_CREATED", "START_TRAINING", "PROJECT_UPDATED")


class Backend:
    """Reference pools per project, the predictor, and the Label Studio API when configured.

    Parameters
    ----------
    settings : Settings
    predictor : labelstudio_backend.predictor.Predictor
        Built before serving, so that ``/setup`` answers within Label Studio's 3 s timeout.
    api : labelstudio_backend.api.LabelStudioApi or None
        Label Studio's API; ``None`` when ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` are unset
        (references then come from ``INSID3_REFERENCE_DIR`` only).
    fetcher : ImageFetcher
    """

    def __init__(self, settings: Settings, predictor, api, fetcher: ImageFetcher) -> None:
        self.settings = settings
        self.predictor = predictor
        self.api = api
        self.fetcher = fetcher
        self._lock = threading.RLock()
        self._device_lock = threading.Lock()
        self._synced: set[int] = set()

    def store(self, project: int) -> AnnotationStore:
        """Cached annotation references of ``project``."""
        return AnnotationStore(self.settings.model_dir / "projects" / str(project) / "references")

    def pool(self, project: int | None) -> tuple[Pairs, str]:
        """``(label -> pairs, digest)`` of the reference folder and ``project``'s annotations."""
        folder = scan_folder(self.settings.reference_dir)
        pairs = folder if project is None else merge(folder, self.store(project).pairs())
        return pairs, pool_version(pairs)

    def model_version(self, project: int | None) -> str:
        """Model version for ``project``'s current reference pool."""
        return self.predictor.model_version(self.pool(project)[1])

    def setup(self, project: int | None, label_config: str) -> str:
        """Check the config and return the model version (fast: Label Studio waits 3 s)."""
        brush_target(label_config)
        return self.model_version(project)

    def train(self, project: int | None, label_config: str, tasks: Sequence[dict]) -> str:
        """Replace ``project``'s annotation references by those of ``tasks`` (Label Studio's ``/train``)."""
        target = brush_target(label_config)
        if project is None:
            raise BackendError("train request has no project id")
        with self._lock:
            self._replace(project, target, tasks)
            self._synced.add(project)
        return self.model_version(project)

    def predict(self, tasks: Sequence[dict], project: int | None, label_config: str) -> tuple[list, str]:
        """One prediction per task (all labels with references), and the model version used.

        A task whose image fails gets its :class:`BackendError` in place of a prediction and the
        others go on; when every task fails, the first error is raised.
        """
        target = brush_target(label_config)
        if project is not None:
            self.sync(project, target)
        pairs, digest = self.pool(project)
        pairs = {label: found for label, found in pairs.items() if label in target.labels}
        if not pairs:
            raise BackendError(
                "no references yet: annotate a task with a brush mask (labels "
                f"{', '.join(target.labels)}) or put reference pairs in INSID3_REFERENCE_DIR", 422
            )
        predictor = self.predictor
        version = predictor.model_version(digest)
        try:
            with self._device_lock:
                references = predictor.references(pairs, digest)
        except ValueError as err:
            raise BackendError(f"a reference cannot be used: {err}", 422) from err
        images = self._task_images(tasks, target)
        with self._device_lock:
            segmented = iter(predictor.segment(references, [i for i in images if not isinstance(i, BackendError)]))
        predictions = [
            image if isinstance(image, BackendError) else prediction(target, next(segmented), version) for image in images
        ]
        failures = [item for item in predictions if isinstance(item, BackendError)]
        if failures and len(failures) == len(tasks):
            raise failures[0]
        return predictions, version

    def _task_images(self, tasks: Sequence[dict], target: BrushTarget) -> list:
        images = []
        for task in tasks:
            address = (task.get("data") or {}).get(target.data_key)
            try:
                if not isinstance(address, str) or not address:
                    raise BackendError(f"task {task.get('id')} has no image in data field {target.data_key!r}", 422)
                images.append(self.fetcher.fetch(address))
            except BackendError as err:
                log.warning("task %s: %s", task.get("id"), err.message)
                images.append(err)
        return images

    def webhook(self, payload: dict) -> dict:
        """Update the reference pool from an annotation event; returns the resulting model version."""
        action = payload.get("action", "")
        project = (payload.get("project") or {}).get("id")
        if project is None:
            raise BackendError("webhook payload has no project id")
        annotation = payload.get("annotation") or {}
        if action in DELETE_EVENTS:
            ids = [annotation["id"]] if "id" in annotation else [a["id"] for a in payload.get("annotations", [])]
            for annotation_id in ids:
                self.store(project).remove(annotation_id)
        elif action in REFERENCE_EVENTS:
            if "id" not in annotation:
                raise BackendError(f"{action} webhook payload has no annotation id")
            target = brush_target((payload.get("project") or {}).get("label_config") or self._label_config(project))
            task = payload.get("task") or {}
            self.add_annotation(project, target, task, annotation)
        elif action in SYNC_EVENTS:
            target = brush_target((payload.get("project") or {}).get("label_config") or self._label_config(project))
            self.sync(project, target, force=True)
        else:
            return {"status": "ignored", "action": action}
        return {"status": "ok", "action": action, "model_version": self.model_version(project)}

    def add_annotation(self, project: int, target: BrushTarget, task: dict, annotation: dict) -> bool:
        """Store ``annotation``'s brush masks as references; ``True`` when it had any."""
        masks = annotation_masks(annotation, target)
        store = self.store(project)
        if not masks or annotation.get("was_cancelled"):
            store.remove(annotation["id"])
            return False
        address = (task.get("data") or {}).get(target.data_key)
        if not isinstance(address, str):
            raise BackendError(f"task {task.get('id')} has no image in data field {target.data_key!r}", 422)
        image = self.fetcher.fetch(address)
        shapes = {mask.shape for mask in masks.values()}
        if shapes != {(image.height, image.width)}:
            raise BackendError(
                f"annotation {annotation['id']}: brush size {sorted(shapes)} differs from its image "
                f"{image.height}x{image.width}", 422
            )
        store.put(annotation["id"], image, masks)
        return True

    def sync(self, project: int, target: BrushTarget, force: bool = False) -> None:
        """Make the cached references match the project's annotations (once, unless ``force``)."""
        if self.api is None or (project in self._synced and not force):
            return
        with self._lock:
            self._replace(project, target, self.api.annotated_tasks(project))
            self._synced.add(project)

    def _replace(self, project: int, target: BrushTarget, tasks) -> None:
        """Cache every usable annotation of ``tasks`` and drop the others; a bad one is logged and skipped."""
        seen = set()
        for task in tasks:
            for annotation in task.get("annotations") or []:
                try:
                    if self.add_annotation(project, target, task, annotation):
                        seen.add(annotation["id"])
                except BackendError as err:
                    log.warning("project %s, task %s: annotation skipped: %s", project, task.get("id"), err.message)
        store = self.store(project)
        for stale in store.annotation_ids() - seen:
            store.remove(stale)

    def _label_config(self, project: int) -> str:
        if self.api is None:
            raise BackendError("the webhook payload has no label_config and LABEL_STUDIO_URL/API key are not set")
        return self.api.label_config(project)


def annotation_masks(annotation: dict, target: BrushTarget) -> dict[str, np.ndarray]:
    """``label -> (H, W) bool`` union of an annotation's brush regions on ``target``."""
    masks: dict[str, np.ndarray] = {}
    for item in annotation.get("result") or []:
        value = item.get("value") or {}
        if item.get("type") != "brushlabels" or item.get("from_name") != target.from_name or "rle" not in value:
            continue
        try:
            mask = rle_to_mask(value["rle"], int(item["original_height"]), int(item["original_width"]))
        except (ValueError, TypeError, KeyError) as err:
            raise BackendError(f"annotation {annotation.get('id')}: brush region cannot be decoded ({err})", 422) from err
        for label in value.get("brushlabels") or []:
            masks[label] = masks[label] | mask if label in masks else mask
    return masks
