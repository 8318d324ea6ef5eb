"""``insid3 segment --ray``: a bucket of targets segmented on a Ray cluster through Ray Data.

The job is one Ray Data stream:

1. **listing** (CPU tasks, one per ``TARGET``): a folder, glob, file or URI that any pyarrow
   filesystem reads (``s3://``, ``gs://``, ``file://``) streams out in chunks of
   :data:`LISTING_CHUNK` paths; no process holds the whole list. A folder's files that are not
   images are counted, and the counts put beside the fragments for the summary.
2. **prepare** (CPU tasks): a target whose mask exists and was made from the same content is
   skipped (its record is the one its mask carries, or one rebuilt from the mask's pixels, as on
   a single machine); the others are read once, digested, decoded
   and resized to the input size.
3. **segment** (an actor pool, ``--actors`` actors of ``--gpus-per-actor`` GPUs): each actor builds
   the engine from the job's :class:`~insid3_core.settings.EngineSettings`, encodes the references
   once on its own device, runs batches through it and writes the masks (on a disk: temporary
   file, then rename; on an object store: one put; without ``--overwrite`` a mask never replaces
   another, see :func:`place_mask`).

Each stage writes what it settles — skipped, failed or segmented, with its record — to a sorted
fragment under ``<out>/.insid3-parts/``. At the end the driver merges the fragments into
``annotations.json`` (:func:`insid3_core.fragments.merge_fragments`: a k-way merge of sorted
files, its memory bounded by the fan-in, not by the number of targets). A batch whose actor died
is run again by Ray on a restarted actor; the fragments it had written are the same records
under the same names, and the merge keeps each name once.

The references are read and checked on the driver, before Ray starts; their bytes and masks travel
to the actors with the job (a few images), and each actor encodes them on its device. Encoding on
the driver would mean building an engine there too, for an object as large as the files
(``benchmarks/ray_scaling.py``, CPU: build 2.1-2.5 s, one encode 0.08 s at 512 px and 0.37 s at
1024 px; 0.53 MB of files against 0.40-1.58 MB encoded).

Written here rather than taken from Ray: Ray Data's own writers (``write_images``, ``write_json``)
do not carry insid3's record in each PNG, cannot refuse to replace an existing mask, and leave the
one COCO document to the caller.
"""

from __future__ import annotations

import collections
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .coco import mask_file_name
from .fragments import JobSummary, fragment_file, merge_fragments
from .io import (
    IMAGE_EXTENSIONS, InputError, atomic_write, broken_link, folder_images, load_image_bytes, not_image_kind,
    oriented_size, target_path,
)
from .settings import EngineSettings

LISTING_CHUNK = 1024
"""Paths per block of the listing stage."""
PARTS = ".insid3-parts"
"""Folder of the fragments under ``--out`` while a job runs."""
LEFT_OUT_PREFIX = "left-out-"
"""Name of a fragments folder's file counting a folder's files that are not images."""
CPU_STAGE_CPUS = 0.5
"""Logical CPUs a listing or prepare task asks: PIL decodes outside the GIL, so two share a core;
and resources unlike the actors' keep Ray from fusing the decoding into the engine actors."""


@dataclass(frozen=True)
class ClusterOptions:
    """Where and how wide the job runs.

    Attributes
    ----------
    address : str
        ``local`` (a Ray runtime started on this machine) or a cluster address for ``ray.init``.
    actors : int
        Engine actors in the pool.
    gpus_per_actor : float or None
        GPUs per actor; ``None``: 1 when the cluster has GPUs, else 0.
    cpus_per_actor : float
        CPUs each actor reserves (logical; the backbone on a CPU uses what torch takes).
    """

    address: str = "local"
    actors: int = 1
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("--ray: an empty address; give 'local' or HOST:PORT")
        if self.actors < 1:
            raise ValueError(f"--actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor is not None and not 0 <= self.gpus_per_actor < math.inf:
            raise ValueError(f"--gpus-per-actor must be a number >= 0, got {self.gpus_per_actor}")
        if not 0 < self.cpus_per_actor < math.inf:
            raise ValueError(f"--cpus-per-actor must be a number > 0, got {self.cpus_per_actor}")


@dataclass(frozen=True)
class ReferencePayload:
    """The references as they travel to the actors: file contents and decoded masks.

    Attributes
    ----------
    images : dict of str to bytes
        Each reference (and negative) image file's content, by its name on the command line.
    classes : dict of str to list of (str, np.ndarray)
        Class name -> ``(image name, (H, W) bool mask)`` pairs, in the engine's class order.
    negatives : list of (str, np.ndarray)
    """

    images: dict[str, bytes]
    classes: dict[str, list[tuple[str, np.ndarray]]]
    negatives: list[tuple[str, np.ndarray]] = field(default_factory=list)

    def pairs(self) -> tuple[dict, list]:
        """``(classes, negatives)`` for :meth:`insid3_core.Segmenter.encode`: one decoded image
        object per file, so an image shared by several classes goes through the backbone once."""
        decoded = {name: load_image_bytes(data, name) for name, data in self.images.items()}
        classes = {label: [(decoded[name], mask) for name, mask in pairs] for label, pairs in self.classes.items()}
        return classes, [(decoded[name], mask) for name, mask in self.negatives]


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs: the engine settings, the outputs and the references.

    Attributes
    ----------
    settings : EngineSettings
        Kept :meth:`~insid3_core.settings.EngineSettings.anchored`: a relative ``weights`` or
        ``basis`` is made absolute here, where it was given.
    out : str or None
        Output folder: a path (local, or a disk every node mounts at the same path) or a URI of
        a pyarrow filesystem (``s3://bucket/masks``); ``None``: the actors return their
        predictions instead (:func:`iter_predictions`).
    categories : tuple of str
    instance_method : str or None
        One annotation per instance, split this way; ``None``: one per class.
    overwrite : bool
    references : ReferencePayload
    inputs : frozenset of str
        The resolved paths of the reference and settings files: no mask is written over them.
    """

    settings: EngineSettings
    out: str | None
    categories: tuple[str, ...]
    instance_method: str | None
    overwrite: bool
    references: ReferencePayload
    inputs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", self.settings.anchored())

    @property
    def parts(self) -> str:
        """Where the fragments go: ``<out>/.insid3-parts`` (a path or a URI)."""
        return joined(self.out, PARTS)


def reference_payload(classes: dict, negatives: list) -> ReferencePayload:
    """Read and check the references on the driver (:class:`InputError` naming a bad one).

    ``classes``: class name -> ``(image path, mask path or (H, W) bool array)`` pairs;
    ``negatives``: ``(image path, mask path)`` pairs.
    """
    from .io import reference_mask

    images: dict[str, bytes] = {}

    def checked(image, mask) -> tuple[str, np.ndarray]:
        name = str(image)
        if name not in images:
            try:
                images[name] = Path(image).read_bytes()
            except OSError as err:
                raise InputError(f"{name}: cannot read ({err.strerror or err})") from None
        return name, reference_mask(name, load_image_bytes(images[name], name), mask)

    return ReferencePayload(images, {label: [checked(*pair) for pair in pairs] for label, pairs in classes.items()},
                            [checked(*pair) for pair in negatives])


def check_target_spec(spec: str) -> None:
    """Raise :class:`InputError` unless ``spec`` names an image file, a folder, a glob with a
    match or a URI that exists; reads one entry, not the listing."""
    if "://" in spec:
        import pyarrow.fs

        try:
            filesystem, path = filesystem_of(spec)
            found = filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound
        except (OSError, ValueError, pyarrow.ArrowException) as err:
            raise InputError(f"{spec}: cannot list it ({err})") from None
        if not found:
            raise InputError(f"{spec}: no such file or folder")
        return
    path = Path(spec).expanduser()
    if path.is_dir() or path.is_file():
        return
    if broken_link(path):
        raise InputError(broken_link(path))
    if next(_listed(map(Path, glob.iglob(str(path), recursive=True))), None) is None:
        raise InputError(f"{spec}: no such file, and no image matches it as a pattern")


def listed_targets(spec: str, left_out: collections.Counter | None = None) -> Iterator[str]:
    """The images ``spec`` names, streamed: a folder's files (not its subfolders) and broken links
    (:func:`~insid3_core.io.target_path`), a glob's matches, a file; for a URI, the same through
    its pyarrow filesystem (as URIs). A folder's other files (hidden ones aside) are counted in
    ``left_out`` by :func:`~insid3_core.io.not_image_kind`."""
    left_out = collections.Counter() if left_out is None else left_out
    if "://" in spec:
        import pyarrow.fs

        filesystem, path = filesystem_of(spec)
        scheme = spec.split("://", 1)[0] + "://"
        info = filesystem.get_file_info(path)
        if info.type == pyarrow.fs.FileType.File:
            yield spec
            return
        for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=False)):
            if entry.type == pyarrow.fs.FileType.File and _is_image(entry.path):
                yield scheme + entry.path
            elif entry.type == pyarrow.fs.FileType.File and (kind := not_image_kind(entry.path)):
                left_out[kind] += 1
        return
    path = Path(spec).expanduser()
    if path.is_file():
        yield os.path.abspath(path)
        return
    if path.is_dir():
        with os.scandir(path) as entries:
            yield from map(str, folder_images((Path(entry.path) for entry in entries), left_out))
    else:
        yield from _listed(map(Path, glob.iglob(str(path), recursive=True)))


def _listed(paths: Iterator[Path]) -> Iterator[str]:
    for path in map(target_path, paths):
        if path:
            yield str(path)


def list_batch(batch: dict, parts: str) -> Iterator[dict]:
    """Ray Data UDF: a batch of ``spec`` rows out as batches of ``path`` rows; a folder's files
    that are not images are counted in a ``left-out-*.json`` file of the fragments folder ``parts``
    (named after the spec: a retried listing writes the same file)."""
    for spec in map(str, batch["spec"]):
        chunk, left_out = [], collections.Counter()
        for path in listed_targets(spec, left_out):
            chunk.append(path)
            if len(chunk) == LISTING_CHUNK:
                yield {"path": np.array(chunk, dtype=object)}
                chunk = []
        if chunk:
            yield {"path": np.array(chunk, dtype=object)}
        if left_out:
            name = f"{LEFT_OUT_PREFIX}{hashlib.sha256(spec.encode('utf-8')).hexdigest()[:20]}.json"
            put(joined(parts, name), json.dumps({"spec": spec, "left_out": left_out}).encode("utf-8"))


def left_out_counts(parts: Path, specs: list[str]) -> dict[str, dict[str, int]]:
    """The listing's counts of files that are not images (:func:`list_batch`), by spec in the
    order of ``specs``, read from the local fragments folder ``parts``."""
    found = {}
    for path in parts.glob(f"{LEFT_OUT_PREFIX}*.json"):
        entry = json.loads(path.read_text(encoding="utf-8"))
        found[entry["spec"]] = entry["left_out"]
    return {spec: found[spec] for spec in dict.fromkeys(specs) if spec in found}


def is_uri(location: str) -> bool:
    return "://" in location


def filesystem_of(location: str):
    """``(pyarrow filesystem, its path)`` of a URI; one filesystem per folder and process (an
    object store's client, with its credentials and connections, is made once, not per file)."""
    folder, _, name = location.rstrip("/").rpartition("/")
    if "://" not in folder or folder.endswith("://"):  # a bucket or a root itself: s3://bucket, file:///tmp
        return _folder_filesystem(location)
    filesystem, inner = _folder_filesystem(folder)
    return filesystem, f"{inner.rstrip('/')}/{name}"


@functools.lru_cache(maxsize=256)
def _folder_filesystem(folder: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(folder)


def joined(folder: str, name: str) -> str:
    """``folder/name`` of a path or a URI."""
    return f"{folder.rstrip('/')}/{name}" if is_uri(folder) else str(Path(folder) / name)


def read_bytes(location: str) -> bytes:
    """A file's bytes, from a local path or a pyarrow filesystem URI."""
    if is_uri(location):
        filesystem, inner = filesystem_of(location)
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()
    with open(location, "rb") as stream:
        return stream.read()


def put(location: str, data: bytes) -> None:
    """Write ``data`` to a path (temporary file, then rename) or a URI (one put)."""
    if is_uri(location):
        filesystem, inner = filesystem_of(location)
        with filesystem.open_output_stream(inner) as stream:
            stream.write(data)
        return
    with atomic_write(location) as stream:
        stream.write(data)


def exists(location: str) -> bool:
    if is_uri(location):
        import pyarrow.fs

        filesystem, inner = filesystem_of(location)
        return filesystem.get_file_info(inner).type != pyarrow.fs.FileType.NotFound
    return Path(location).exists()


def output_path(job: JobSpec, path: str) -> str:
    """``<out>/<stem>.png`` of a target path or URI (:func:`~insid3_core.coco.mask_file_name`)."""
    return joined(job.out, mask_file_name(path))


def settle(job: JobSpec, entries: list[dict]) -> str:
    """Write settled entries as one fragment of the job (see :mod:`insid3_core.fragments`);
    its name, ``""`` when there are none."""
    if not entries:
        return ""
    name, data = fragment_file(entries)
    put(joined(job.parts, name), data)
    return name


def prepare_batch(batch: dict, job: JobSpec) -> dict:
    """Ray Data UDF (CPU): settle the targets whose masks exist, read, digest, decode and resize
    the others.

    Returns, per target left to segment, ``key`` (the input's, else its path), ``path``,
    ``digest`` (16 hex digits of the source's SHA-256), ``pixels`` ``(B, 3, s, s)`` uint8,
    ``height``, ``width`` and ``error`` (empty). A target that fails goes to the fragments, or,
    when the job writes no masks (``job.out`` is ``None``), on with its ``error`` and zero pixels.
    """
    from .features import resized_pixels

    size = job.settings.image_size
    settled, kept = [], collections.defaultdict(list)
    keys = batch["key"] if "key" in batch else batch["path"]
    for key, path in zip((str(k) for k in keys), (str(p) for p in batch["path"])):
        image, digest, outcome = _prepared(job, path)
        if image is None and job.out is not None:
            settled.append(outcome)
            continue
        if image is None:
            pixels, height, width, error = np.zeros((3, size, size), np.uint8), 0, 0, outcome["error"]
        else:
            pixels, height, width, error = resized_pixels(image, size).numpy(), image.height, image.width, ""
        for name, value in zip(("key", "path", "digest", "pixels", "height", "width", "error"),
                               (key, path, digest, pixels, height, width, error)):
            kept[name].append(value)
    settle(job, settled)
    pixels = np.stack(kept.pop("pixels")) if kept["path"] else np.zeros((0, 3, size, size), np.uint8)
    columns = {name: np.array(kept[name], dtype=object) for name in ("key", "path", "digest", "error")}
    return {**columns, "pixels": pixels, "height": np.array(kept["height"], np.int64),
            "width": np.array(kept["width"], np.int64)}


def _prepared(job: JobSpec, path: str):
    """``(image, digest, settled)`` of one target: its decoded image and digest, or ``None`` and
    the fragment entry that settles it (skipped, or failed with a message)."""
    output = None if job.out is None else output_path(job, path)
    if output is not None and not is_uri(output):
        if not is_uri(path) and Path(output).resolve() == Path(path).resolve():
            return None, None, _failed(path, f"{path}: its output mask would overwrite it; choose another --out")
        if os.path.realpath(output) in job.inputs:
            return None, None, _failed(path, f"{path}: its output mask would overwrite the reference or settings "
                                             f"file {output}; choose another --out")
    try:
        data = read_bytes(path)
    except OSError as err:
        return None, None, _failed(path, f"{path}: cannot read ({err.strerror or err})")
    digest = hashlib.sha256(data).hexdigest()[:16]
    if output is not None and not job.overwrite and exists(output):
        return None, digest, _skipped(job, path, output, data, digest)
    try:
        return load_image_bytes(data, path), digest, None
    except InputError as err:
        return None, digest, _failed(path, str(err))


def _skipped(job: JobSpec, path: str, output: str, data: bytes, digest: str) -> dict:
    """The fragment entry of a target whose mask ``output`` exists: skipped with the mask's record
    (:func:`~insid3_core.outputs.written_record`, as on a single machine), or failed when that mask
    cannot be read, was made from other content (``digest`` is the target's) or is not the size
    of the target (``data``)."""
    from io import BytesIO

    from .outputs import written_record

    name = PurePosixPath(path).name
    try:
        record = written_record(output, name, job.categories, read_bytes(output) if is_uri(output) else None)
    except OSError as err:
        return _failed(path, f"{output}: cannot read the existing mask ({err.strerror or err})")
    except InputError as err:
        return _failed(path, str(err))
    made_from = record["image"]
    if made_from.get("source_sha256") not in (None, digest):
        return _failed(path, f"{output}: made from other content ({made_from.get('source')}); --overwrite redoes it")
    size = oriented_size(path, BytesIO(data))
    if size is not None and (made_from.get("width"), made_from.get("height")) != size:
        return _failed(path, f"{output}: {made_from.get('width')}x{made_from.get('height')}, the target is "
                             f"{size[0]}x{size[1]}; --overwrite redoes it")
    return {"name": name, "status": "skipped", "source": path, "record": record}


class WorkerError(Exception):
    """An engine actor cannot go on (its engine does not build on its node, its device ran out of
    memory, its masks cannot be written): the job stops and the message says why and where."""


class SegmentActor:
    """Ray Data actor: the engine on this actor's device, the references encoded once.

    An engine that cannot start or go on does not raise: Ray would restart the actor, retry, and end
    with its own error holding the message as text. The actor answers every batch with a
    ``fatal`` message instead, which :func:`stopped_by` turns into a :class:`WorkerError`."""

    def __init__(self, job: JobSpec):
        from .outputs import run_description

        self.job, self.fatal = job, ""
        try:
            self.segmenter = job.settings.build()
            classes, negatives = job.references.pairs()
            self.references = self.segmenter.encode(classes, negatives)
        except (ValueError, OSError, RuntimeError, MemoryError) as err:  # BackboneError is a RuntimeError
            if not (fatal := _worker_failure("could not start its engine", err)):
                raise
            self.fatal = fatal
            return
        self.run_id, self.run = run_description(
            job.settings, self.segmenter.backbone, self.segmenter.basis.shape[1],
            {label: [name for name, _ in pairs] for label, pairs in job.references.classes.items()},
            [name for name, _ in job.references.negatives], job.instance_method)

    def __call__(self, batch: dict) -> dict:
        """Segment a prepared batch. Writing masks: returns ``key`` and ``verdicts`` (the classes'
        verdicts, comma-separated); otherwise ``key`` and ``prediction`` (a
        :class:`~insid3_core.Prediction`, or an :class:`InputError` for a target that failed).
        Writing, also ``fragment``: on every row, the name of the fragment that settled the batch.
        And ``fatal``: empty, or on every row why this actor cannot go on."""
        keys = np.array([str(k) for k in batch["key"]], dtype=object)
        if not self.fatal:
            try:
                return {"key": keys, **self._segmented(batch), "fatal": np.full(len(keys), "", dtype=object)}
            except (OSError, RuntimeError, MemoryError) as err:
                if not (fatal := _worker_failure("stopped", err)):
                    raise
                self.fatal = fatal
        empty = {"prediction": None} if self.job.out is None else {"verdicts": "", "fragment": ""}
        return {"key": keys, **{name: np.full(len(keys), value, dtype=object) for name, value in empty.items()},
                "fatal": np.full(len(keys), self.fatal, dtype=object)}

    def _segmented(self, batch: dict) -> dict:
        """``prediction`` or ``verdicts`` of :meth:`__call__` (the masks written when writing)."""
        import torch

        errors = [str(e) for e in batch["error"]]
        good = [index for index, error in enumerate(errors) if not error]
        predictions: list = [InputError(error) if error else None for error in errors]
        if good:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
            features = self.segmenter.encoder.features(pixels)
            sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in good]
            for index, prediction in zip(good, self.segmenter.segment_features(self.references, features, sizes,
                                                                               pixels)):
                predictions[index] = prediction
        if self.job.out is None:
            return {"prediction": np.array(predictions, dtype=object)}
        fragment = self._write(batch, good, predictions)  # writing, the prepare stage settled every failure
        verdicts = [",".join(result.quality.verdict for result in prediction.classes.values())
                    for prediction in predictions]
        return {"verdicts": np.array(verdicts, dtype=object),
                "fragment": np.full(len(verdicts), fragment, dtype=object)}

    def _write(self, batch: dict, good: list[int], predictions: list) -> str:
        """Write the batch's masks and its fragment; the fragment's name (``""``: nothing to write)."""
        from .coco import result_record

        if not good:
            return ""
        if self.run is not None:  # here, not in __init__: an actor may finish starting after the job
            described = json.dumps({"run": self.run_id, **self.run}).encode()
            put(joined(self.job.parts, f"run-{self.run_id}.json"), described)
            self.run = None
        settled = []
        for index in good:
            path, prediction = str(batch["path"][index]), predictions[index]
            record = result_record(PurePosixPath(path).name, prediction.classes, self.job.instance_method,
                                   self.job.settings.min_instance_patches)
            record["image"]["run"] = self.run_id
            settled.append(place_mask(self.job, path, str(batch["digest"][index]), prediction.label_map, record))
        return settle(self.job, settled)


def place_mask(job: JobSpec, path: str, digest: str, label_map: np.ndarray, record: dict) -> dict:
    """Write a target's mask (:func:`insid3_core.outputs.output_mask_png`) and return its fragment
    entry. Without ``overwrite`` a mask never replaces a file: on a disk it is linked into place
    only where no file is; on an object store it is put only where none was found (an object
    store cannot link, so two targets of one mask name writing at the same instant may both
    put theirs: both are then segmented entries of one mask, which the merge fails, see
    :func:`insid3_core.fragments.merge_fragments`). A mask found made from the same content
    (this batch run again after its actor died) counts as written; any other stays, and the
    target fails."""
    from .outputs import output_mask_png

    output, name = output_path(job, path), PurePosixPath(path).name
    data = output_mask_png(label_map, len(job.categories), record, path, digest)
    placed = {"name": name, "status": "segmented", "source": path, "record": record}
    if job.overwrite:
        put(output, data)
        return placed
    if is_uri(output):
        if not exists(output):
            put(output, data)
            return placed
    else:
        staged = joined(job.parts, f"{PurePosixPath(output).stem}.{os.getpid()}.png")  # same disk: linkable
        put(staged, data)
        try:
            os.link(staged, output)
            return placed
        except FileExistsError:
            pass
        finally:
            Path(staged).unlink(missing_ok=True)
    existing = _carried(output) or {}
    if existing.get("image", {}).get("source_sha256") != digest:
        return _failed(path, f"{path}: another target's mask is at {output} (same file stem); "
                             "give the targets distinct names or another --out")
    return {**placed, "record": existing}


def _carried(location: str) -> dict | None:
    """The record of the output mask at a path or URI."""
    from io import BytesIO

    from .outputs import carried_record

    if not is_uri(location):
        return carried_record(location)
    try:
        return carried_record(BytesIO(read_bytes(location)))
    except OSError:
        return None


def _worker_failure(what: str, error: BaseException) -> str:
    """:class:`WorkerError`'s message (the engine actor on this node ``what``, and why) when
    ``error`` is one an actor reports: a backbone, settings or file problem, or a failed allocation
    (named with the settings that lower the memory a run needs); ``""`` for a defect, which
    the caller raises for Ray's traceback to show."""
    import ray

    from .backbone import BackboneError
    from .settings import out_of_memory_message

    reason = out_of_memory_message(error)
    if reason is None and isinstance(error, OSError) and error.filename is not None:
        reason = f"{error.filename}: {error.strerror or error}"
    if reason is None and not isinstance(error, (BackboneError, ValueError, OSError)):
        return ""
    return f"the engine actor on Ray node {ray.util.get_node_ip_address()} {what}: {reason or error}"


def stopped_by(batch: dict) -> str:
    """The first ``fatal`` message of an engine actor's batch (see :class:`SegmentActor`), or ``""``."""
    return next((str(message) for message in batch["fatal"] if message), "")


def _failed(path: str, message: str) -> dict:
    return {"name": PurePosixPath(path).name, "status": "failed", "source": path, "error": message}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def connect(options: ClusterOptions, what: str = "--ray") -> None:
    """``ray.init`` for ``options.address``; ``local`` starts a runtime on this machine with
    enough logical CPUs for the actors and the CPU stages beside them (a new one, even where
    ``RAY_ADDRESS`` or a ``ray start`` names a cluster). :class:`InputError`
    naming ``what`` (the option or setting) when Ray Data is not installed or the cluster cannot
    be reached."""
    try:
        import ray
        import ray.data  # noqa: F401  (the job's API; a bare ray without [data] lacks it)
    except ImportError as err:
        raise InputError(f"{what} needs Ray Data: pip install 'insid3[ray]' ({err})") from None
    if ray.is_initialized():
        return
    if not _reachable(options.address):  # ray.init would retry for minutes
        raise InputError(f"{what} {options.address}: no Ray cluster answers there")
    try:
        if options.address == "local":
            needed = int(np.ceil(options.actors * options.cpus_per_actor)) + 2
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False,
                     log_to_driver=False)
        else:
            ray.init(address=options.address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise InputError(f"{what} {options.address}: cannot start or reach a Ray cluster ({err})") from None


def _reachable(address: str) -> bool:
    """Whether a ``HOST:PORT`` address accepts a connection within 5 s (other addresses, ``local``,
    ``auto`` and ``ray://...``, are left to ``ray.init``)."""
    import socket

    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit() or "://" in address:
        return True
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError:
        return False
    return True


def segmented_stream(stream, job: JobSpec, options: ClusterOptions):
    """``stream`` (rows of ``path``, and ``key``) through the prepare tasks and the engine actor
    pool, on the cluster :func:`connect` reached."""
    import ray

    gpus = options.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= options.actors else 0
    batch_size = job.settings.batch_size
    stream = stream.map_batches(prepare_batch, fn_kwargs={"job": job}, batch_size=batch_size, batch_format="numpy",
                                num_cpus=CPU_STAGE_CPUS)
    return stream.map_batches(SegmentActor, fn_constructor_kwargs={"job": job}, batch_size=batch_size,
                              batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=options.actors),
                              num_cpus=options.cpus_per_actor, num_gpus=gpus)  # restarts, retries: Ray's defaults


def iter_predictions(job: JobSpec, targets: list[dict], options: ClusterOptions):
    """Yield ``(key, Prediction or InputError)`` of ``targets`` (``{"key", "path"}`` rows) as the
    actors finish them (not in input order), for callers that write the results themselves
    (``job.out`` is ``None``)."""
    import ray

    connect(options)
    stream = segmented_stream(ray.data.from_items(targets), job, options)
    for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
        if fatal := stopped_by(batch):
            raise WorkerError(fatal)
        yield from zip((str(key) for key in batch["key"]), batch["prediction"])


def run_job(job: JobSpec, specs: list[str], options: ClusterOptions, info: dict) -> JobSummary:
    """Run the stream (see the module docstring) and merge its fragments into
    ``<out>/annotations.json``; ``info`` is the document's ``info`` (this run's description is
    added from the actors' run files). An engine actor that cannot go on stops the job: what was
    settled is merged, then :class:`WorkerError` says why."""
    import ray

    connect(options)
    stream = ray.data.from_items([{"spec": spec} for spec in specs])
    stream = stream.map_batches(list_batch, batch_size=1, batch_format="numpy", num_cpus=CPU_STAGE_CPUS,
                                fn_kwargs={"parts": job.parts})
    stream = segmented_stream(stream, job, options)
    verdicts, fatal, fragments = collections.Counter(), "", set()
    for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
        if fatal := stopped_by(batch):
            break  # what was settled is still merged: the document lists every mask written so far
        for listed in batch["verdicts"]:
            verdicts.update(v for v in str(listed).split(",") if v)
        fragments.update(str(name) for name in batch["fragment"] if name)
    check_shared_parts(job, fragments)
    with tempfile.TemporaryDirectory(prefix="insid3-merge-") as scratch:
        parts = Path(job.parts)
        if is_uri(job.parts):  # the merge reads and writes local files: fetch the fragments
            import pyarrow.fs

            parts = Path(scratch) / PARTS
            parts.mkdir()
            pyarrow.fs.copy_files(job.parts, str(parts))
        runs, latest = dict(info.get("runs", {})), {}
        for run_file in sorted(parts.glob("run-*.json")):
            latest = json.loads(run_file.read_text(encoding="utf-8"))
            runs[latest["run"]] = {key: value for key, value in latest.items() if key != "run"}
        if latest:
            info = {**{key: value for key, value in latest.items() if key != "run"}, "run": latest["run"],
                    "runs": runs}
        document = joined(job.out, "annotations.json")
        merged = Path(scratch) / "annotations.json" if is_uri(document) else Path(document)
        summary = merge_fragments(parts, merged, list(job.categories), info)
        summary.left_out = left_out_counts(parts, specs)
        if is_uri(document):
            import pyarrow.fs

            pyarrow.fs.copy_files(str(merged), document)
    remove_parts(job)
    if fatal:
        raise WorkerError(f"{fatal}; {document} lists the masks written so far (run again to resume)")
    summary.verdicts, summary.smoke_test = verdicts, bool(latest.get("smoke_test"))
    return summary


def check_shared_parts(job: JobSpec, fragments: set[str]) -> None:
    """:class:`WorkerError` when fragments the engine actors wrote (``fragments``: their names)
    are not in this machine's fragments folder: ``--out`` is a disk the nodes do not share, and
    the masks written there are beyond the merge (on an object store every node shares it)."""
    if is_uri(job.parts):
        return
    unseen = sorted(name for name in fragments if not (Path(job.parts) / name).exists())
    if unseen:
        raise WorkerError(f"--out {job.out}: {len(unseen)} of the {len(fragments)} fragments the engine actors wrote "
                          f"are not in {job.parts} on this machine: the Ray nodes do not share this folder, and "
                          "the masks written on the others are not listed; give a folder every node mounts at the "
                          "same path, or an object-store URI (s3://bucket/masks)")


def remove_parts(job: JobSpec) -> None:
    """Delete the job's fragments folder (a path or a URI), if any."""
    if is_uri(job.parts):
        import pyarrow.fs

        filesystem, inner = filesystem_of(job.parts)
        if filesystem.get_file_info(inner).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_dir(inner)
    else:
        shutil.rmtree(job.parts, ignore_errors=True)


def start_parts(job: JobSpec) -> None:
    """A fresh fragments folder for ``job`` (an interrupted job's is dropped: its masks carry
    their records, so the next job finds them as skipped targets)."""
    remove_parts(job)
    if is_uri(job.parts):
        filesystem, inner = filesystem_of(job.parts)
        filesystem.create_dir(inner, recursive=True)
    else:
        Path(job.parts).mkdir(parents=True)


def check_output_store(out: str) -> None:
    """Create the output folder URI ``out`` and put and delete a probe in it; :class:`InputError`
    naming ``--out`` when that fails, so the job finds out before its work."""
    import pyarrow
    import pyarrow.fs

    try:
        filesystem, inner = filesystem_of(out)
        filesystem.create_dir(inner, recursive=True)
        probe = f"{inner.rstrip('/')}/.insid3-write-check-{os.getpid()}"
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"")
        filesystem.delete_file(probe)
    except (OSError, ValueError, pyarrow.ArrowException) as err:
        raise InputError(f"--out {out}: cannot write there ({err})") from None
