"""``insid3 segment``: masks and a COCO annotations.json for folders of targets, resumable."""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import numpy as np

from ..coco import coco_document, mask_file_name, records_from_document, result_record
from ..config import SMOKE_TEST_NOTE
from ..io import (
    InputError, check_references, check_writable_folder, file_digest, json_value, oriented_size, overwritten_inputs,
    remove_stale_temporaries, write_json, writer_lock,
)
from ..loader import default_workers, executor
from ..outputs import RUN_DESCRIPTION, run_description, write_output_mask, written_record
from ..quality import VERDICTS
from ..settings import EngineSettings
from . import UsageError
from .common import (add_reference_arguments, build_segmenter, check_mask_names, listed_output_folder,
                     reference_classes, reference_files, relisting_target, resolve_targets, settings_files)


def register(commands) -> None:
    """Add ``segment`` to the ``insid3`` sub-commands (entry point ``insid3.commands``)."""
    segment = commands.add_parser("segment", help="segment target images from (image, mask) references")
    segment.add_argument("targets", nargs="+", metavar="TARGET", help="image files, folders or glob patterns")
    add_reference_arguments(segment)
    segment.add_argument("--out", required=True, metavar="DIR",
                         help="output folder (with --ray also a URI: s3://bucket/masks, gs://..., file://...)")
    segment.add_argument("--instances", action="store_true",
                         help="one annotation per instance (COCO instance JSON, split by --instance-method) "
                              "instead of one per class")
    segment.add_argument("--overwrite", action="store_true", help="re-segment targets whose mask already exists")
    cluster = segment.add_argument_group("Ray cluster (pip install 'insid3[ray]')")
    cluster.add_argument("--ray", metavar="ADDRESS",
                         help="run on a Ray cluster through Ray Data: 'local' starts one on this machine; TARGETs "
                              "may then also be URIs (s3://, gs://, file://)")
    cluster.add_argument("--actors", type=int, default=1, metavar="N", help="engine actors in the pool (default 1)")
    cluster.add_argument("--gpus-per-actor", type=float, metavar="G",
                         help="GPUs per actor (default: 1 when the cluster has a GPU per actor, else 0)")
    cluster.add_argument("--cpus-per-actor", type=float, default=1.0, metavar="C",
                         help="CPUs per actor (default 1; Ray gives a CPU actor's torch that many threads)")
    EngineSettings.add_arguments(segment)
    segment.set_defaults(handler=run_segment)


def load_document(path: Path, overwrite: bool) -> dict | None:
    """An earlier run's annotations.json, to merge this run's records into (``None``: none yet)."""
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read the existing annotations ({err.strerror or err})") from None
    return parse_document(data, path, overwrite)


def parse_document(data: bytes, path, overwrite: bool) -> dict | None:
    """:func:`load_document` of the content ``data`` of ``path`` (a path or a URI)."""
    try:
        document = json_value(data.decode("utf-8"))
        if not isinstance(document, dict):
            raise TypeError(f"it holds a JSON {type(document).__name__}, not an object")
        if not isinstance(document.get("info"), dict) or document["info"].get("description") != RUN_DESCRIPTION:
            raise ValueError(f"its info.description is not {RUN_DESCRIPTION!r}, so another tool wrote it")
        if not isinstance(document["info"].get("runs", {}), dict):
            raise TypeError("its info.runs is not an object")
        records_from_document(document)
        return document
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        if overwrite:
            return None
        detail = f"an entry lacks the key {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise UsageError(
            f"{path}: existing file is not an insid3 COCO document ({detail}); move it away or pass --overwrite"
        ) from None


def write_target_mask(path: Path, label_map: np.ndarray, classes: int, record: dict, target: Path) -> None:
    """:func:`~insid3_core.outputs.write_output_mask` with the target's digest, both in a writer
    thread (hashing the target there keeps it off the loop that feeds the device)."""
    write_output_mask(path, label_map, classes, record, target, file_digest(target))


def settle(writes: list, records: dict[str, dict], wait: bool, failures: list[str]) -> list:
    """Move the records of written masks (``(future, name, record)`` in ``writes``) into ``records``,
    so annotations.json never lists a mask before it exists, and a mask that could not be written
    (disk full, a file system's limits) into ``failures``; returns the writes still running."""
    running = []
    for future, name, record in writes:
        if wait or future.done():
            try:
                future.result()
            except OSError as err:
                failures.append(f"{name}: its mask could not be written ({err.strerror or err})")
                continue
            records[name] = record
        else:
            running.append((future, name, record))
    return running


def run_segment(arguments: argparse.Namespace) -> int:
    settings = EngineSettings.from_arguments(arguments)
    if not arguments.out.strip():
        raise UsageError("--out: an empty name; give a folder (or, with --ray, a URI)")
    if arguments.ray is None and (arguments.actors != 1 or arguments.gpus_per_actor is not None
                                  or arguments.cpus_per_actor != 1.0):
        raise UsageError("--actors, --gpus-per-actor and --cpus-per-actor set a Ray job: give --ray too")
    if arguments.ray is not None:
        return run_on_ray(arguments, settings)
    if "://" in arguments.out:
        raise UsageError(f"--out {arguments.out}: a URI needs --ray (a folder otherwise)")
    out = Path(arguments.out).expanduser()
    check_writable_folder(out, "--out")  # before any work
    references = reference_classes(arguments)
    classes = references.classes
    negatives = [(Path(image), Path(mask)) for image, mask in arguments.negative]
    targets = resolve_targets(arguments.targets)
    relisting = relisting_target(out, arguments.targets, {mask_file_name(target.name) for target in targets})
    if relisting:
        raise UsageError(f"--out {out}: TARGET {relisting} lists that folder, so the next run would take the masks "
                         "written there for targets: choose another --out")
    check_mask_names(targets)
    inputs = set(reference_files(arguments)) | set(targets) | set(settings_files(arguments))
    outputs = {target: out.resolve() / mask_file_name(target.name) for target in targets}
    clobbered = overwritten_inputs(outputs.values(), inputs)
    if clobbered:
        raise UsageError(f"output masks would overwrite input files: {', '.join(clobbered)}; choose another --out")
    folders = [str(path) for path in outputs.values() if path.is_dir()]
    if folders:
        raise UsageError(f"--out: {', '.join(folders[:5])} is a folder where a mask goes; move it away")
    annotations_path = out / "annotations.json"
    if annotations_path.is_dir():
        raise UsageError(f"--out: {annotations_path} is a folder where the annotations file goes; move it away")
    with writer_lock(out, "--out"):  # one run at a time merges into annotations.json
        remove_stale_temporaries(out, [annotations_path.name, *(path.name for path in outputs.values())])
        document = load_document(annotations_path, arguments.overwrite)
        records = earlier_records(document, list(classes), annotations_path, arguments.overwrite)
        pending = [t for t in targets if arguments.overwrite or not outputs[t].exists()]
        replaced = {mask_file_name(target.name): target.name for target in pending}  # a.jpg's replaces a.png's
        records = {name: record for name, record in records.items()
                   if replaced.get(mask_file_name(name), name) == name}
        for target in targets:
            if target not in pending and target.name not in records:
                records[target.name] = written_record(outputs[target], target.name, list(classes))
        check_sources([t for t in targets if t not in pending], records, outputs)
        runs = dict(document.get("info", {}).get("runs", {})) if document else {}
        if not pending:
            write_json(annotations_path, coco_document(records, list(classes), {**(document or {}).get("info", {}),
                                                                                "runs": runs}))
            print(f"insid3: all {len(targets)} target(s) already have their mask in {out}; nothing to segment "
                  "(--overwrite redoes them)", file=sys.stderr)
            return 0
        check_references([pair for pairs in classes.values() for pair in pairs] + negatives,
                         references.mask_names + [str(mask) for _, mask in negatives])

        segmenter = build_segmenter(settings)
        encoded = segmenter.encode(classes, negatives)
        run_id, run = run_description(
            settings, segmenter.backbone, segmenter.basis.shape[1],
            {name: list(references.names) for name, references in encoded.classes.items()},
            [str(image) for image, _ in negatives], settings.instance_method if arguments.instances else None)
        runs[run_id] = run
        info = {**run, "run": run_id, "runs": runs}
        print(f"insid3: {len(targets)} target(s), {len(targets) - len(pending)} already done, "
              f"{len(pending)} to segment on {segmenter.backbone.device}", file=sys.stderr)

        from tqdm import tqdm

        failures: list[str] = []
        verdicts = collections.Counter()
        workers = default_workers(segmenter.backbone.device) if settings.workers is None else settings.workers
        instance_method = settings.instance_method if arguments.instances else None
        writes = []
        try:
            with tqdm(total=len(pending), desc="segment", unit="img", file=sys.stderr) as progress, \
                    executor(min(workers, 2), "insid3-write") as writer:
                stream = segmenter.iter_segment(encoded, pending, settings.batch_size, workers)
                for done, (target, result) in enumerate(stream, start=1):
                    progress.update(1)
                    if isinstance(result, InputError):
                        failures.append(str(result))
                        continue
                    record = result_record(target.name, result.classes, instance_method, settings.min_instance_patches)
                    record["image"]["run"] = run_id
                    writes.append((writer.submit(write_target_mask, outputs[target], result.label_map, len(classes),
                                                 record, target), target.name, record))
                    verdicts.update(class_result.quality.verdict for class_result in result.classes.values())
                    progress.set_postfix(verdicts, refresh=False)
                    if done % settings.batch_size == 0:
                        writes = settle(writes, records, wait=False, failures=failures)
                        write_json(annotations_path, coco_document(records, list(classes), info))
        finally:  # also on Ctrl-C: every mask written so far is listed, and only those
            settle(writes, records, wait=True, failures=failures)
            write_json(annotations_path, coco_document(records, list(classes), info))

        summary = ", ".join(f"{verdict} {verdicts[verdict]}" for verdict in VERDICTS if verdicts[verdict])
        print(f"insid3: segmented {len(pending) - len(failures)}, skipped {len(targets) - len(pending)}, "
              f"failed {len(failures)} -> {out}", file=sys.stderr)
        if summary:
            print(f"insid3: quality: {summary}", file=sys.stderr)
        for message in failures:  # each names its file
            print(f"insid3: FAILED {message}", file=sys.stderr)
        if segmenter.backbone.is_smoke_test:
            print(f"insid3: reminder: {SMOKE_TEST_NOTE}", file=sys.stderr)
        return 1 if failures else 0


def run_on_ray(arguments: argparse.Namespace, settings: EngineSettings) -> int:
    """``insid3 segment --ray``: the same outputs through :mod:`insid3_core.distributed`; the
    output folder, the references and the TARGET arguments are checked here, before Ray starts."""
    from ..distributed import (
        ClusterOptions, JobSpec, check_output_store, check_target_spec, connect, exists, is_uri, joined, read_bytes,
        WorkerError, reference_payload, run_job, settle, start_parts,
    )
    from ..fragments import earlier_entries, print_summary

    try:
        options = ClusterOptions(arguments.ray, arguments.actors, arguments.gpus_per_actor, arguments.cpus_per_actor)
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = arguments.out if is_uri(arguments.out) else str(Path(arguments.out).expanduser().resolve())
    if is_uri(out):
        check_output_store(out)
    else:
        check_writable_folder(out, "--out")
        listing = listed_output_folder(out, arguments.targets)
        if listing:
            raise UsageError(f"--out {out}: TARGET {listing} lists that folder; with --ray the masks written there "
                             "could be listed as targets, or replace images of the same name: choose another --out")
    classes = reference_classes(arguments).classes
    for spec in arguments.targets:
        check_target_spec(spec)
    payload = reference_payload(classes, [(Path(image), Path(mask)) for image, mask in arguments.negative])
    with contextlib.nullcontext() if is_uri(out) else writer_lock(out, "--out"):
        annotations = joined(out, "annotations.json")
        document = parse_document(read_bytes(annotations), annotations, arguments.overwrite) if exists(annotations) \
            else None
        records = earlier_records(document, list(classes), annotations, arguments.overwrite)
        job = JobSpec(settings, out, tuple(classes), settings.instance_method if arguments.instances else None,
                      arguments.overwrite, payload,
                      frozenset(map(str, [*reference_files(arguments), *settings_files(arguments)])))
        connect(options)
        start_parts(job)
        settle(job, earlier_entries(records))
        try:
            summary = run_job(job, arguments.targets, options, dict(document.get("info", {})) if document else {})
        except WorkerError as err:
            raise UsageError(str(err)) from None
        print_summary(summary, out)
        if summary.smoke_test:
            print(f"insid3: reminder: {SMOKE_TEST_NOTE}", file=sys.stderr)
        return 1 if summary.failed else 0


def earlier_records(document: dict | None, categories: list[str], path, overwrite: bool) -> dict[str, dict]:
    """The records of the annotations ``document`` at ``path`` (``None``: there is none) that this
    run of ``categories`` adds to; with ``overwrite``, none when their categories differ.

    An earlier run of other categories, or of the same ones in another order, is refused: a
    multi-class mask's label value ``i`` is its ``i``-th category, so the masks of one folder
    would disagree on what a value means (and single-class masks hold no class values at all).
    """
    records = records_from_document(document) if document else {}
    earlier = [category["name"] for category in document.get("categories", [])] if records else []
    if earlier and earlier != categories:
        if overwrite:
            return {}
        reordered = sorted(earlier) == sorted(categories)
        remedy = " in another order (label values 1, 2, ... follow it): give --class-ref in the earlier order, " \
            if reordered else "; "
        raise UsageError(f"{path} holds masks of {', '.join(map(repr, earlier))}, this run segments "
                         f"{', '.join(map(repr, categories))}{remedy}use another --out, or --overwrite to start it "
                         "afresh")
    return records


def check_sources(skipped: list[Path], records: dict[str, dict], outputs: dict[Path, Path]) -> None:
    """Refuse to skip a target whose existing mask was made from another file (another folder's
    image of the same name, or the same file since changed) or is not the target's size."""
    stale = []
    for target in skipped:
        image = records.get(target.name, {}).get("image", {})
        made_from = image.get("source_sha256")
        try:
            changed = made_from is not None and made_from != file_digest(target)
        except OSError as err:
            raise UsageError(f"{target}: cannot read it to check its existing mask {outputs[target]} "
                             f"({err.strerror or err})") from None
        if changed:
            stale.append(f"{outputs[target]} (made from {image.get('source')})")
            continue
        size = oriented_size(target)
        if size is not None and (image.get("width"), image.get("height")) != size:
            stale.append(f"{outputs[target]} ({image.get('width')}x{image.get('height')}, the target is {size[0]}x{size[1]})")
    if stale:
        raise UsageError(f"existing masks were made from other content than, or are not the size of, {len(stale)} target(s): "
                         f"{'; '.join(stale[:5])}; pass --overwrite to redo them, or use another --out")
