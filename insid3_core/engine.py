"""The batch engine: references encoded once, targets segmented in batches."""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .backbone import Backbone
from .config import BATCH_SIZE, EngineConfig, cache_dir, check_integer, clustering_bytes
from .encoder import Encoder, load_references
from .io import ImageLike, InputError, MaskLike
from .loader import default_workers, executor, load_batches
from .matching import reference_prototype
from .quality import QualityThresholds, quality_report
from .timing import StageTimer
from .pipeline import TargetMasks, lowres_masks
from .results import Prediction, References, ReferenceSet, SegmentationResult
from .streams import device_threads, ready_marker, worker_stream
from .upsample import full_resolution



def device_memory(device: torch.device) -> int:
    """Bytes of memory on ``device``: the GPU's own, else the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_image_size_fits(image_size: int, patch_size: int, device: torch.device) -> None:
    """``ValueError`` naming the largest size that fits when one target at ``image_size`` could not
    be clustered in ``device``'s memory (checked before anything that size is allocated)."""
    available = device_memory(device)
    if clustering_bytes(image_size, patch_size) <= available:
        return
    largest = patch_size
    while clustering_bytes(largest * 2, patch_size) <= available:
        largest *= 2
    raise ValueError(
        f"image_size {image_size} needs about {clustering_bytes(image_size, patch_size) / 2**30:,.0f} GiB "
        f"to cluster one target ({(image_size // patch_size) ** 2:,} patches), more than the "
        f"{available / 2**30:.0f} GiB of {device}; use at most about {largest}"
    )


class Segmenter:
    """Segment targets by example with a frozen DINOv3 backbone.

    Parameters
    ----------
    backbone : Backbone
    config : EngineConfig
    quality : QualityThresholds
    basis_file : str, Path or None
        ``(C, k)`` ``.npy`` positional basis to use instead of computing one.
    cache : Path, None or False
        Folder caching positional bases; ``None`` uses :func:`insid3_core.config.cache_dir`,
        ``False`` disables the cache.
    timer : StageTimer or None
        Accumulates seconds per stage (backbone, matching, clustering, aggregation, output).

    Examples
    --------
    >>> segmenter = Segmenter(load_backbone("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"))
    >>> references = segmenter.encode({"cat": [("cat.jpg", "cat_mask.png")]})
    >>> predictions = segmenter.segment(references, ["a.jpg", "b.jpg"], batch_size=8)
    >>> predictions[0].mask, predictions[0].classes["cat"].score, predictions[0].quality.verdict
    """

    def __init__(
        self,
        backbone: Backbone,
        config: EngineConfig = EngineConfig(),
        quality: QualityThresholds = QualityThresholds(),
        basis_file: str | Path | None = None,
        cache: Path | None | Literal[False] = None,
        timer: StageTimer | None = None,
    ) -> None:
        check_image_size_fits(config.image_size, backbone.patch_size, backbone.device)
        self.encoder = Encoder.build(backbone, config.image_size, config.svd_components,
                                     cache_dir() if cache is None else cache or None, basis_file)
        self.config = config
        self.quality = quality
        self.timer = timer

    @property
    def backbone(self) -> Backbone:
        """The encoder's backbone."""
        return self.encoder.backbone

    @property
    def basis(self) -> torch.Tensor:
        """The encoder's ``(C, k)`` positional basis."""
        return self.encoder.basis

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the patch grid."""
        return self.encoder.grid

    def encode(
        self,
        classes: Mapping[str, Sequence[tuple[ImageLike, MaskLike]]],
        negatives: Sequence[tuple[ImageLike, MaskLike]] = (),
        batch_size: int = 16,
    ) -> References:
        """Encode each class's ``(image, mask)`` references, and negatives shared by all classes,
        ``batch_size`` images per backbone call.

        A negative pair marks a region as "not this": target patches closer to a negative patch
        than to any reference-mask patch are neither candidates nor part of a mask, even when
        their cluster is. An image given by path in several pairs (e.g. one per class of a
        multi-class mask), by the same path or the same in-memory object, goes through the backbone once.

        Raises :class:`InputError` naming the reference when an image is unreadable, a mask's
        size differs from its image's, or a mask is empty.
        """
        check_integer("batch_size", batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(classes, Mapping):
            raise TypeError(f"classes must map each class name to its [(image, mask), ...] references, "
                            f"not a {type(classes).__name__} (one class: {{'object': pairs}})")
        if not classes:
            raise InputError("at least one class with references is needed")
        for name, pairs in classes.items():
            if not pairs:
                raise InputError(f"class {name!r}: at least one (image, mask) reference is needed")
            _check_pairs(pairs, f"class {name!r}")
        _check_pairs(negatives, "negatives")
        pairs = [pair for class_pairs in classes.values() for pair in class_pairs] + list(negatives)
        loaded = load_references(pairs, self.config.image_size)
        with self.stage("backbone"):
            features = self.encoder.reference_features(loaded, batch_size)
        masks, names = loaded.masks, loaded.names
        negative = slice(len(pairs) - len(negatives), len(pairs))
        negative_parts = (features[negative], masks[negative]) if negatives else None
        encoded_classes, start = {}, 0
        for name, class_pairs in classes.items():
            part = slice(start, start + len(class_pairs))
            encoded_classes[name] = self.encoder.reference_set(features[part], masks[part], names[part], negative_parts)
            start += len(class_pairs)
        return References(encoded_classes)

    def segment(
        self, references: References, targets: Iterable[ImageLike], batch_size: int = BATCH_SIZE, workers: int | None = None
    ) -> list[Prediction]:
        """Segment targets (paths or PIL images) in batches; an unreadable one raises :class:`InputError`
        once the batches already in flight are done (no thread works on after the call)."""
        with contextlib.closing(self.iter_segment(references, targets, batch_size, workers)) as results:
            return [_raised(result) for _, result in results]

    def iter_segment(
        self, references: References, targets: Iterable[ImageLike], batch_size: int = BATCH_SIZE, workers: int | None = None
    ) -> Iterator[tuple[ImageLike, Prediction | InputError]]:
        """Yield ``(target, prediction)`` in input order, or ``(target, InputError)`` for an unreadable one.

        Every class shares each target's features and clustering; a patch claimed by several
        classes goes to the class whose prototype it is most similar to, so the classes' masks
        never overlap. Targets are decoded and resized in ``workers`` threads ahead of the
        device and travel through pinned memory to a GPU. A device thread matches, clusters and
        aggregates a batch (on its own high-priority CUDA stream on a GPU, where a second one
        takes the next batch, see :func:`insid3_core.streams.device_threads`) while the caller's
        thread sends the next batch through the backbone, and masks are brought to full
        resolution and judged in ``workers`` threads again. ``None`` picks
        :func:`insid3_core.loader.default_workers`; 0 runs everything in the caller's thread.
        """
        check_integer("batch_size", batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._check_references(references)
        if isinstance(targets, (str, os.PathLike, Image.Image)):
            raise TypeError("targets must be an iterable of images; put a single one in a list")
        classes = tuple(references.classes.values())
        if workers is not None:
            check_integer("workers", workers)
            if workers < 0:
                raise ValueError(f"workers must be >= 0 (0: everything in the caller's thread), got {workers}")
        workers = default_workers(self.backbone.device) if workers is None else workers
        pin = self.backbone.device.type == "cuda"
        ready: deque[tuple[ImageLike, Future | InputError]] = deque()
        device_workers = min(workers, device_threads(self.backbone.device))
        with executor(workers, "insid3-finish") as finisher, executor(device_workers, "insid3-device") as device_stage:
            for batch in load_batches(targets, self.config.image_size, batch_size, workers, pin):
                if batch.pixels is not None:
                    features = self._features(batch.pixels)
                    masks = device_stage.submit(
                        self._target_masks, classes, features, batch.pixels, batch.sizes, ready_marker(features)
                    )
                readable = iter(range(len(batch.sizes)))
                for target, error in batch.entries:
                    pending = error or finisher.submit(self._finish_target, references.names, masks, next(readable))
                    ready.append((target, pending))
                while ready and (len(ready) > batch_size or _is_done(ready[0][1])):
                    yield _resolved(ready.popleft())
            while ready:
                yield _resolved(ready.popleft())

    def segment_features(
        self,
        references: References,
        features: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        pixels: torch.Tensor | None = None,
    ) -> list[Prediction]:
        """Steps 2-7 on targets' patch features ``(B, N, C)`` (from :meth:`Encoder.features`), in the
        caller's thread, for callers that already hold the features.

        ``pixels`` (``(B, 3, s, s)`` uint8, the images the features came from) is needed by
        the ``guided`` refinement; ``sizes`` holds each target's ``(H, W)`` (positive integers).
        The features are read detached, on the segmenter's device.
        """
        self._check_references(references)
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or not features.is_floating_point():
            raise TypeError(f"features must be a (B, N, C) float tensor from Encoder.features, got "
                            f"{getattr(features, 'shape', type(features).__name__)}")
        expected = (self.grid[0] * self.grid[1], self.basis.shape[0])
        if tuple(features.shape[1:]) != expected:
            raise ValueError(f"features of shape {tuple(features.shape)}: this segmenter's are (B, {expected[0]}, "
                             f"{expected[1]})")
        if len(sizes) != features.shape[0]:
            raise ValueError(f"sizes holds {len(sizes)} (H, W) but the features hold {features.shape[0]} targets")
        for size in sizes:
            if not (isinstance(size, (tuple, list)) and len(size) == 2
                    and all(isinstance(side, (int, np.integer)) and side >= 1 for side in size)):
                raise ValueError(f"sizes must hold each target's (H, W) as two positive integers, got {size!r}")
        features = features.detach().to(self.basis.device, self.basis.dtype)
        masks = lowres_masks(tuple(references.classes.values()), features, self.basis, self.config, pixels,
                             self.timer)
        return [self._prediction(references.names, self._finish(target, size))
                for target, size in zip(masks.per_target(), sizes)]

    def _check_references(self, references: References) -> None:
        """Raise unless ``references`` came from :meth:`encode` of a segmenter with this encoder."""
        if not isinstance(references, References):
            raise TypeError(f"references must be the References that encode() returns, not "
                            f"{type(references).__name__} (a ReferenceSet r is References({{'name': r}}))")
        for references in references.classes.values():
            if references.image_size != self.config.image_size:
                raise ValueError(
                    f"references were encoded at {references.image_size}px, "
                    f"this segmenter runs at {self.config.image_size}px"
                )
            if references.encoder != self.encoder.identity:
                raise ValueError(f"references were encoded by another encoder ({references.encoder}); this "
                                 f"segmenter's is {self.encoder.identity}: encode them with this segmenter")

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.stage("backbone"):
            return self.encoder.features(pixels)

    def _target_masks(
        self,
        classes: tuple[ReferenceSet, ...],
        features: torch.Tensor,
        pixels: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        ready: torch.cuda.Event | None,
    ) -> list[tuple[TargetMasks, tuple[int, int]]]:
        """:func:`~insid3_core.pipeline.lowres_masks` of a batch, target by target with its size, on
        this thread's own stream after ``ready``."""
        with worker_stream(ready, (features, pixels)):
            masks = lowres_masks(classes, features, self.basis, self.config, pixels, self.timer)
            return list(zip(masks.per_target(), sizes))

    def _finish_target(self, names: tuple[str, ...], masks: Future, position: int) -> Prediction:
        """:meth:`_finish` on the ``position``-th target of a batch, once its ``masks`` are ready."""
        return self._prediction(names, self._finish(*masks.result()[position]))

    def _prediction(self, names: tuple[str, ...], results: tuple[SegmentationResult, ...]) -> Prediction:
        """One target's per-class results (disjoint masks), their label map and the union's score and verdict."""
        if len(results) == 1:
            (result,) = results
            return Prediction(result.mask.astype(np.uint16), {names[0]: result}, result.score, result.quality)
        label_map = np.zeros(results[0].mask.shape, dtype=np.uint16)
        for index, result in enumerate(results, start=1):
            label_map[result.mask] = index
        patches = np.array([result.lowres_mask.sum() for result in results], dtype=np.float64)
        scores = np.array([result.score for result in results])
        score = float((patches * scores).sum() / patches.sum()) if patches.sum() else 0.0
        return Prediction(label_map, dict(zip(names, results)), score, quality_report(label_map > 0, self.quality))

    def stage(self, name: str, device: bool = True):
        """Context timing a named stage with :attr:`timer`, when one is set (see
        :meth:`StageTimer.stage` for ``device``)."""
        return self.timer.stage(name, device) if self.timer is not None else contextlib.nullcontext()

    def _finish(self, target: TargetMasks, size: tuple[int, int]) -> tuple[SegmentationResult, ...]:
        """Step 7 on the host for one target's ``K`` classes: full-resolution masks (the guided
        masks resized when there are, else the feature-resolution ones upsampled) and verdicts."""
        with self.stage("output", device=False):
            results = []
            for index, class_lowres in enumerate(target.masks):
                refined = None if target.refined is None else target.refined[index]
                mask = full_resolution(class_lowres, refined, self.config.image_size, size)
                results.append(
                    SegmentationResult(
                        mask=mask,
                        lowres_mask=class_lowres,
                        score=float(target.confidence[index]),
                        quality=quality_report(mask, self.quality),
                        similarity=target.similarity[index],
                        clusters=target.clusters,
                    )
                )
            return tuple(results)


def merge_references(first: ReferenceSet, second: ReferenceSet) -> ReferenceSet:
    """One :class:`ReferenceSet` holding the references (and negatives) of both, e.g. to add new
    references to an encoded pool without encoding it again; the prototype is recomputed."""
    if first.image_size != second.image_size:
        raise ValueError(f"cannot merge references encoded at {first.image_size}px and {second.image_size}px")
    if first.encoder != second.encoder:
        raise ValueError(f"cannot merge references of two encoders: {first.encoder} and {second.encoder}")
    features = torch.cat([first.features, second.features])
    masks = torch.cat([first.masks, second.masks])
    negatives = [part for part in (first.negatives, second.negatives) if part is not None]
    return ReferenceSet(
        features,
        masks,
        reference_prototype(features, masks),
        first.image_size,
        first.names + second.names,
        torch.cat(negatives) if negatives else None,
        first.encoder,
    )


def _check_pairs(pairs, whose: str) -> None:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"{whose}: a list of (image, mask) pairs is needed, got {type(pairs).__name__}")
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"{whose}: each reference is an (image, mask) pair, got {type(pair).__name__}")


def _raised(result):
    if isinstance(result, InputError):
        raise result
    return result


def _is_done(pending: Future | InputError) -> bool:
    return not isinstance(pending, Future) or pending.done()


def _resolved(item: tuple[ImageLike, Future | InputError]) -> tuple[ImageLike, Prediction | InputError]:
    target, pending = item
    return target, pending.result() if isinstance(pending, Future) else pending
