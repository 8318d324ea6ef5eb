"""The backend's work behind the HTTP routes: reference pools, predictions, webhook events."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from insid3_core.io import write_json

from .errors import BackendError
from .images import FETCH_THREADS, ImageFetcher
from .labelconfig import RegionTarget, region_target
from .payload import identifier, objects, optional_object, project_id, text
from .references import AnnotationStore, Pairs, merge, pool_version, scan_folder
from .results import prediction
from .regions import annotation_masks
from .settings import Settings
from .warmup import Warmups

log = logging.getLogger(__name__)
REFERENCE_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_EVENTS = ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED")
SYNC_EVENTS = ("ANNOTATIONS_CREATED", "START_TRAINING", "PROJECT_UPDATED")
RETRY_AFTER = 30
CALIBRATION_FILE = "calibration.json"  # in MODEL_DIR/projects/<id>/: the last pool's calibration and its version
PREPARE_ROUNDS = 3


class Backend:
    """Reference pools per project, the predictor, and the Label Studio API when configured.

    A project's references are brought up to date and encoded by a background job (started by
    ``/setup``, ``/train``, the webhook and ``/predict``), so requests return within Label
    Studio's timeouts.

    Parameters
    ----------
    settings : Settings
    predictor : labelstudio_backend.predictor.Predictor
        Built before serving: the backbone is loaded once.
    api : labelstudio_backend.api.LabelStudioApi or None
        Label Studio's API; ``None`` when ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` are unset
        (references then come from ``INSID3_REFERENCE_DIR`` and the webhook only).
    fetcher : ImageFetcher
    """

    def __init__(self, settings: Settings, predictor, api, fetcher: ImageFetcher) -> None:
        self.settings = settings
        self.predictor = predictor
        self.api = api
        self.fetcher = fetcher
        self.warmups = Warmups()
        self._project_locks: dict[int | None, threading.RLock] = {}
        self._locks_lock = threading.Lock()
        self._device_lock = threading.Lock()
        self._synced: set[int] = set()
        self._stores: dict[int, AnnotationStore] = {}

    def project_lock(self, project: int | None) -> threading.RLock:
        """The lock of ``project``'s references: held while they change or are encoded, so
        requests for one project never wait on another's downloads."""
        with self._locks_lock:
            return self._project_locks.setdefault(project, threading.RLock())

    def store(self, project: int) -> AnnotationStore:
        """Cached annotation references of ``project`` (one store per project, whose writes it serialises)."""
        with self._locks_lock:
            if project not in self._stores:
                self._stores[project] = AnnotationStore(self.settings.model_dir / "projects" / str(project) / "references")
            return self._stores[project]

    def pool(self, project: int | None) -> tuple[Pairs, str]:
        """``(label -> pairs, digest)`` of the reference folder and ``project``'s annotations.

        The folder's part of the digest hashes file contents; the annotations' part hashes the
        stamps they were cached from, so it costs no file read.
        """
        folder = scan_folder(self.settings.reference_dir)
        if project is None:
            return folder, pool_version(folder)
        store = self.store(project)
        digest = hashlib.sha256(f"{pool_version(folder)}|{store.version()}".encode()).hexdigest()[:12]
        return merge(folder, store.pairs()), digest

    def model_version(self, project: int | None) -> str:
        """Model version for ``project``'s current reference pool."""
        return self.predictor.model_version(self.pool(project)[1])

    def setup(self, project: int | None, label_config: str) -> str:
        """Check the config, start preparing the references in the background, return the model version."""
        target = region_target(label_config)
        self.warm(project, target)
        return self.model_version(project)

    def train(self, project: int | None, label_config: str, tasks: Iterable[dict] | None, wait: float | None) -> str:
        """Replace ``project``'s annotation references by those of ``tasks`` (Label Studio's
        ``/train``); ``None`` (a request without annotations) reads them again from the API, and
        is a 400 without one: it must not read as "the project has no annotations" and empty
        the cache.

        Runs in the background; waits at most ``wait`` seconds (``None``: until done) and
        returns the model version at that time.
        """
        target = region_target(label_config)
        if project is None:
            raise BackendError("train request has no project id")
        if tasks is None and self.api is None:
            raise BackendError("train request has no 'annotations', and without LABEL_STUDIO_URL and "
                               "LABEL_STUDIO_API_KEY the backend cannot read the project's own")
        future = self.warm(project, target, tasks=None if tasks is None else list(tasks), force=tasks is None)
        try:
            future.result(timeout=wait)
        except FutureTimeout:
            log.info("project %s: training goes on in the background", project)
        return self.model_version(project)

    def predict(self, tasks: Sequence[dict], project: int | None, label_config: str,
                wait: float | None) -> tuple[list, str]:
        """One prediction per task (every label with references, one region per instance when
        instances are on), and the model version used.

        A task whose image fails gets its :class:`BackendError` in place of a prediction.
        Raises :class:`BackendError` for the whole request: bad config, no references (422),
        or references still being prepared after ``wait`` seconds (503; ``None`` waits).
        """
        target = region_target(label_config)
        pool, version = self.references(project, target, wait)
        with self.fetcher.lease() as lease:
            return self._segment_tasks(tasks, target, pool, version, lease), version

    def predict_interactive(self, task: dict, project: int | None, label_config: str, regions: list[dict]) -> tuple[dict, str]:
        """Interactive pre-annotation of one task (see :mod:`labelstudio_backend.interactive`): the
        drawn ``regions`` are references from the task's own image (those of
        ``INSID3_NEGATIVE_LABEL`` negatives, as in a project's pool); the prediction holds every
        other instance of their other labels in it, and the model version.

        Raises :class:`BackendError` (422) when no drawn region is of the project's labels, or all
        are of the negative label.
        """
        from .interactive import drawn_masks, other_instances

        target = region_target(label_config)
        address = required_image_address(task, target)
        version = self.model_version(project)
        with self.fetcher.lease() as lease:
            image = self.fetcher.fetch(address, lease)
            drawn = drawn_masks(regions, target, (image.height, image.width), self.settings.max_pixels, lease)
            if not drawn:
                raise BackendError(f"the drawn regions hold no {target.kind} region or keypoint of the labels "
                                   f"{', '.join(target.labels)}", 422)
            classes, negatives = self.predictor.classes_and_negatives(
                {label: [(image, mask)] for label, mask in drawn.items()})
            if not classes:
                raise BackendError(f"only {self.predictor.negative_label!r} (negative) regions are drawn: draw a "
                                   "region or keypoint of another label", 422)
            segmenter = self.predictor.segmenter
            with self._device_lock:
                references = segmenter.encode(classes, negatives)
                (found,) = segmenter.segment(references, [image], workers=0)
            del image
        method = self.predictor.instances if self.predictor.instances != "off" else "necks"

        def split(label: str, result) -> list:
            return other_instances(result, drawn[label], method, self.predictor.min_instance_patches)

        return prediction(target, dict(found.classes), version, split, self.settings.polygon_tolerance), version

    def _segment_tasks(self, tasks: Sequence[dict], target: RegionTarget, pool, version: str, lease) -> list:
        """Predictions of ``tasks`` (a task's :class:`BackendError` in its place); the decoded images
        are freed on return, before ``lease`` gives their pixels back."""
        images = self._task_images(tasks, target, lease)
        with self._device_lock:
            segmented = iter(self.predictor.segment(pool, [i for i in images if not isinstance(i, BackendError)]))
        split = self.predictor.split
        return [
            image if isinstance(image, BackendError)
            else prediction(target, next(segmented), version, split, self.settings.polygon_tolerance)
            for image in images
        ]

    def references(self, project: int | None, target: RegionTarget, wait: float | None) -> tuple:
        """``(EncodedPool, model version)`` of the current pool, from the encoded cache or
        background jobs waited on at most ``wait`` seconds in all (``None``: until done).

        A job that finishes on a pool changed meanwhile is followed by another (a few at most).
        """
        deadline = None if wait is None else time.monotonic() + wait
        for _ in range(PREPARE_ROUNDS):
            if project is None or project in self._synced:
                pairs, key, version = self._target_pool(project, target)
                cached = self.predictor.cached(key) if pairs else None
                if cached is not None:
                    return cached, version
            try:
                pool, version = self.warm(project, target).result(
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                raise BackendError(
                    f"insid3 is still preparing the references of project {project} (reading its annotations and "
                    f"encoding them in the background); retry in {RETRY_AFTER} s", 503, retry_after=RETRY_AFTER,
                ) from None
            if pool is None:
                raise BackendError(
                    "no references yet: annotate a task with a mask (labels "
                    f"{', '.join(target.labels)}) or put reference pairs in INSID3_REFERENCE_DIR", 422
                )
        return pool, version

    def warm(self, project: int | None, target: RegionTarget, tasks: list | None = None, force: bool = False) -> Future:
        """Start (or join) the background job preparing ``project``'s references; see :meth:`prepare`."""
        return self.warmups.start(project, lambda: self.prepare(project, target, tasks, force),
                                  replace=tasks is not None or force)

    def prepare(self, project: int | None, target: RegionTarget, tasks: list | None = None,
                force: bool = False) -> tuple[dict | None, str]:
        """Bring the cache up to date (from ``tasks``, else from the API once unless ``force``) and encode it.

        Returns
        -------
        pool : labelstudio_backend.predictor.EncodedPool or None
            ``None`` when no label of ``target`` has a reference.
        model_version : str
        """
        with self.project_lock(project):  # held while encoding: a webhook cannot remove a file being read
            if project is not None:
                if tasks is not None:
                    self._replace(project, target, tasks)
                    self._synced.add(project)
                else:
                    self.sync(project, target, force)
            pairs, key, version = self._target_pool(project, target)
            if not pairs:
                return None, version
            try:
                with self._device_lock:
                    pool = self.predictor.references(pairs, key)
            except ValueError as err:
                raise BackendError(f"a reference cannot be used: {err}", 422) from err
        if pool.calibration is not None:
            where = self.settings.model_dir / "projects" / str(project if project is not None else "folder")
            write_json(where / CALIBRATION_FILE, {**pool.calibration.document(), "model_version": version})
        return pool, version

    def predicted_labels(self, project: int | None, target: RegionTarget) -> list[str]:
        """The labels a prediction for ``project`` segments: ``target``'s labels with references,
        less the negative label."""
        return list(self.predictor.classes_and_negatives(self._target_pool(project, target)[0])[0])

    def _target_pool(self, project: int | None, target: RegionTarget) -> tuple[Pairs, tuple, str]:
        """The pool's pairs of ``target``'s labels, their cache key and the model version."""
        pairs, digest = self.pool(project)
        pairs = {label: pairs[label] for label in target.labels if label in pairs}
        return pairs, (digest, *pairs), self.predictor.model_version(digest)

    def _task_images(self, tasks: Sequence[dict], target: RegionTarget, lease) -> list:
        """Each task's decoded image, or the :class:`BackendError` that says why it has none; the
        downloads run at once (:meth:`ImageFetcher.fetch_all`)."""
        images: list = []
        for task in tasks:
            try:
                images.append(required_image_address(task, target))
            except BackendError as err:
                images.append(err)
        addresses = [index for index, image in enumerate(images) if isinstance(image, str)]
        for index, image in zip(addresses, self.fetcher.fetch_all([images[index] for index in addresses], lease)):
            images[index] = image
        for task, image in zip(tasks, images):
            if isinstance(image, BackendError):
                log.warning("task %s: %s", task.get("id"), image.message)
        return images

    def webhook(self, payload: dict) -> dict:
        """Update the reference pool from an annotation event; returns the resulting model version.

        ``ANNOTATION_CREATED``/``UPDATED`` and deletions change the cache before answering; the
        full re-reads (``START_TRAINING``, ...) run in the background.
        """
        action = text(payload, "action")  # a malformed body is refused whatever its action
        project = webhook_project(payload)
        annotation = optional_object(payload, "annotation")
        annotations = objects(payload, "annotations", required=False) or [annotation]
        task = optional_object(payload, "task")
        if action not in (*DELETE_EVENTS, *REFERENCE_EVENTS, *SYNC_EVENTS):
            return {"status": "ignored", "action": action[:100]}
        if project is None:
            raise BackendError("webhook payload has no project id")
        if action in DELETE_EVENTS:
            with self.project_lock(project):
                for annotation in annotations:
                    self.store(project).remove(annotation_id(annotation))
        elif action in REFERENCE_EVENTS:
            target = self._webhook_target(payload, project)
            with self.project_lock(project):
                self.add_annotation(project, target, task, annotation)
            self.warm(project, target)
        else:
            self.warm(project, self._webhook_target(payload, project), force=True)
            return {"status": "started", "action": action, "model_version": self.model_version(project)}
        return {"status": "ok", "action": action, "model_version": self.model_version(project)}

    def add_annotation(self, project: int, target: RegionTarget, task: dict, annotation: dict,
                       wait: float | None = None) -> bool:
        """Cache ``annotation``'s masks as references; ``True`` when it has any.

        An annotation cached from the same content (its stamp) is not downloaded again. ``wait``:
        seconds to wait for pixels (:meth:`ImageFetcher.lease`).
        """
        identifier = annotation_id(annotation)
        store = self.store(project)
        address = image_address(task, target)
        stamp = annotation_stamp(annotation, target, address)
        if annotation.get("was_cancelled"):
            store.remove(identifier)
            return False
        if store.stamp(identifier) == stamp:
            return True
        with self.fetcher.lease(wait) as lease:
            masks = annotation_masks(annotation, target, self.settings.max_pixels, lease)
            if not masks:
                store.remove(identifier)
                return False
            shapes = {mask.shape for mask in masks.values()}
            image = self.fetcher.fetch(required_image_address(task, target), lease)
            if shapes != {(image.height, image.width)}:
                raise BackendError(
                    f"annotation {identifier}: region size {sorted(shapes)} differs from its image "
                    f"{image.height}x{image.width}", 422
                )
            store.put(identifier, image, masks, stamp)
            del image, masks  # freed before the lease gives their pixels (and the memory) back
        return True

    def sync(self, project: int, target: RegionTarget, force: bool = False) -> None:
        """Make the cached references match the project's annotations (once, unless ``force``)."""
        if project in self._synced and not force:
            return
        with self.project_lock(project):
            if self.api is not None:
                self._replace(project, target, self.api.annotated_tasks(project))
            self._synced.add(project)

    def _replace(self, project: int, target: RegionTarget, tasks: Iterable[dict]) -> None:
        """Cache every usable annotation of ``tasks`` and drop the others; a bad one is logged and skipped.

        Up to :data:`~labelstudio_backend.images.FETCH_THREADS` annotations download at once (a
        project's first sync is one image per annotation), each on a lease of its own that does not
        wait for pixels (``INSID3_MAX_PIXELS_IN_FLIGHT``): annotations holding some while waiting
        for more could hold all. One that found them taken is tried again alone once they are done,
        waiting as requests do.
        """
        def cached(pair: tuple, last_try: bool) -> int | BackendError | None:
            task, annotation = pair
            try:
                return annotation_id(annotation) if self.add_annotation(
                    project, target, task, annotation, wait=None if last_try else 0.0) else None
            except BackendError as err:
                if err.status == 503 and not last_try:
                    return err
                log.warning("project %s, task %s: annotation skipped: %s", project, task.get("id"), err.message)
            except Exception:  # one annotation Label Studio holds must not stop a project's references
                log.exception("project %s, task %s: annotation skipped", project, task.get("id"))
            return None

        pairs = [(task, annotation) for task in tasks if isinstance(task, dict)
                 for annotation in (task.get("annotations") if isinstance(task.get("annotations"), list) else [])]
        with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="insid3-sync") as pool:
            outcomes = list(pool.map(lambda pair: cached(pair, last_try=False), pairs))
        outcomes += [cached(pair, last_try=True) for pair, outcome in zip(pairs, outcomes)
                     if isinstance(outcome, BackendError)]
        seen = {outcome for outcome in outcomes if isinstance(outcome, int)}
        store = self.store(project)
        for stale in store.annotation_ids() - seen:
            store.remove(stale)

    def _webhook_target(self, payload: dict, project: int) -> RegionTarget:
        project_object = payload.get("project")
        config = text(project_object, "label_config") if isinstance(project_object, dict) else ""
        if config:
            return region_target(config)
        if self.api is None:
            raise BackendError("the webhook payload has no label_config and LABEL_STUDIO_URL/API key are not set")
        return region_target(self.api.label_config(project))


def image_address(task: dict, target: RegionTarget):
    """The task's image address (``task["data"][target.data_key]``), ``None`` when it has none."""
    data = task.get("data")
    return data.get(target.data_key) if isinstance(data, dict) else None


def required_image_address(task: dict, target: RegionTarget) -> str:
    """:func:`image_address`; :class:`BackendError` (422) when the task has none."""
    address = image_address(task, target)
    if not isinstance(address, str) or not address:
        raise BackendError(f"task {task.get('id')} has no image in data field {target.data_key!r}", 422)
    return address


def webhook_project(payload: dict) -> int | None:
    """The project id of a webhook payload (``project`` as an object or an id), ``None`` when it has none."""
    try:
        return project_id(payload.get("project"))
    except BackendError as err:
        raise BackendError(f"webhook payload has no project id: {err.message}") from None


def annotation_id(annotation) -> int:
    """The integer id of an annotation object; :class:`BackendError` when it has none."""
    try:
        return identifier(annotation.get("id") if isinstance(annotation, dict) else None, "annotation")
    except BackendError as err:
        raise BackendError(f"annotation without an id: {err.message}") from None


def annotation_stamp(annotation: dict, target: RegionTarget, address) -> str:
    """Digest of what an annotation's references are made from: its result, the image address and the control."""
    content = {"result": annotation.get("result"), "image": address, "control": target.from_name,
               "labels": target.labels}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
