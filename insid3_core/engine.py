"""The batch engine: references encoded once, targets segmented in batches."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .aggregation import cluster_scores
from .backbone import Backbone
from .clustering import cluster_patches
from .config import EngineConfig, cache_dir
from .debias import debias, positional_basis
from .features import patch_features, resized_pixels
from .io import InputError, load_image, load_mask, mask_array
from .loader import default_workers, executor, load_batches, load_target
from .matching import backward_candidates, downsample_mask, forward_candidates, mask_tensor, reference_prototype
from .quality import QualityReport, QualityThresholds, quality_report
from .timing import StageTimer
from .upsample import upsample_mask

ImageLike = str | Path | Image.Image
MaskLike = str | Path | Image.Image | np.ndarray


@dataclass(frozen=True)
class ReferenceSet:
    """References encoded once for any number of targets.

    Attributes
    ----------
    features : torch.Tensor
        ``(S, N, C)`` debiased, L2-normalised reference patch features.
    masks : torch.Tensor
        ``(S, N)`` bool reference masks at feature resolution.
    prototype : torch.Tensor
        ``(C,)`` L2-normalised reference prototype ``p``.
    image_size : int
        Input size the references were encoded at.
    names : tuple of str
        Where each reference came from (file path or ``reference <i>``).
    """

    features: torch.Tensor
    masks: torch.Tensor
    prototype: torch.Tensor
    image_size: int
    names: tuple[str, ...]

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class SegmentationResult:
    """The prediction for one target.

    Attributes
    ----------
    mask : np.ndarray
        ``(H, W)`` bool at the target's own size and (EXIF-applied) orientation.
    lowres_mask : np.ndarray
        ``(h, w)`` bool at feature resolution.
    score : float
        Confidence in [0, 1]: mean debiased similarity to the reference prototype over the
        predicted patches (0 for an empty mask).
    quality : QualityReport
    """

    mask: np.ndarray
    lowres_mask: np.ndarray
    score: float
    quality: QualityReport


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
    >>> references = segmenter.encode_references([("cat.jpg", "cat_mask.png")])
    >>> results = segmenter.segment(references, ["a.jpg", "b.jpg"], batch_size=8)
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
        if config.image_size % backbone.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of the patch size {backbone.patch_size}")
        self.backbone = backbone
        self.config = config
        self.quality = quality
        self.timer = timer
        side = config.image_size // backbone.patch_size
        self.grid = (side, side)
        self.basis = positional_basis(
            backbone, config.image_size, config.svd_components, cache_dir() if cache is None else cache or None, basis_file
        )

    def encode_references(self, references: Sequence[tuple[ImageLike, MaskLike]]) -> ReferenceSet:
        """Encode ``(image, mask)`` pairs in one backbone call.

        Raises :class:`InputError` naming the reference when an image is unreadable, a mask's
        size differs from its image's, or a mask is empty.
        """
        pixels, masks, names = self.prepare_references(references)
        with self.stage("backbone"):
            features = patch_features(self.backbone, pixels)
        return self.reference_set(features, masks, names)

    def prepare_references(
        self, references: Sequence[tuple[ImageLike, MaskLike]]
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        """Load and check ``(image, mask)`` pairs.

        Returns
        -------
        pixels : torch.Tensor
            ``(S, 3, s, s)`` uint8.
        masks : torch.Tensor
            ``(S, s, s)`` bool.
        names : tuple of str
        """
        if not references:
            raise InputError("at least one (image, mask) reference is needed")
        names, images, masks = [], [], []
        for index, (image, mask) in enumerate(references):
            name = str(image) if isinstance(image, (str, Path)) else f"reference {index}"
            image = load_image(image)
            mask = self._reference_mask(name, image, mask)
            names.append(name)
            images.append(resized_pixels(image, self.config.image_size))
            masks.append(mask_tensor(mask, self.config.image_size))
        return torch.stack(images), torch.stack(masks), tuple(names)

    def reference_set(self, features: torch.Tensor, masks: torch.Tensor, names: Sequence[str]) -> ReferenceSet:
        """Build a :class:`ReferenceSet` from references' patch features ``(S, N, C)`` and masks ``(S, s, s)``."""
        debiased = debias(features, self.basis)
        low = downsample_mask(masks.to(features.device), self.grid).flatten(1)
        return ReferenceSet(debiased, low, reference_prototype(debiased, low), self.config.image_size, tuple(names))

    @staticmethod
    def _reference_mask(name: str, image: Image.Image, mask: MaskLike) -> np.ndarray:
        if isinstance(mask, (str, Path)):
            array = load_mask(mask, image.size)
            name = str(mask)
        else:
            array = mask_array(mask)
            if array.shape != (image.height, image.width):
                raise InputError(
                    f"{name}: mask is {array.shape[1]}x{array.shape[0]} but its image is "
                    f"{image.width}x{image.height} (width x height)"
                )
        if not array.any():
            raise InputError(f"{name}: reference mask is empty (no foreground pixel)")
        return array

    def segment(
        self, references: ReferenceSet, targets: Iterable[ImageLike], batch_size: int = 8, workers: int | None = None
    ) -> list[SegmentationResult]:
        """Segment targets (paths or PIL images) in batches; an unreadable one raises :class:`InputError`."""
        results = []
        for _, result in self.iter_segment(references, targets, batch_size, workers):
            if isinstance(result, InputError):
                raise result
            results.append(result)
        return results

    def iter_segment(
        self, references: ReferenceSet, targets: Iterable[ImageLike], batch_size: int = 8, workers: int | None = None
    ) -> Iterator[tuple[ImageLike, SegmentationResult | InputError]]:
        """Yield ``(target, result)`` in input order, or ``(target, InputError)`` for an unreadable one.

        Targets are decoded and resized in ``workers`` threads ahead of the device and travel
        through pinned memory to a GPU; masks are brought to full resolution and judged in as
        many threads again while the device works on the next batch. ``None`` picks
        :func:`insid3_core.loader.default_workers`; 0 runs everything in the caller's thread.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        workers = default_workers(self.backbone.device) if workers is None else workers
        pin = self.backbone.device.type == "cuda"
        ready: deque[tuple[ImageLike, Future | InputError]] = deque()
        with executor(workers, "insid3-finish") as finisher:
            for batch in load_batches(targets, self.config.image_size, batch_size, workers, pin):
                if batch.pixels is not None:
                    lowres, confidence = self._lowres_masks(references, self._features(references, batch.pixels))
                    readable = iter(zip(lowres, confidence, batch.sizes))
                for target, error in batch.entries:
                    ready.append((target, error or finisher.submit(self._finish, *next(readable))))
                while ready and (len(ready) > batch_size or _is_done(ready[0][1])):
                    yield _resolved(ready.popleft())
            while ready:
                yield _resolved(ready.popleft())

    def segment_batch(self, references: ReferenceSet, images: Sequence[ImageLike]) -> list[SegmentationResult]:
        """Segment images (paths or PIL images, see :func:`load_image`) with one backbone call."""
        pixels, sizes = zip(*(load_target(image, self.config.image_size) for image in images))
        return self.segment_pixels(references, torch.stack(pixels), sizes)

    def segment_pixels(
        self, references: ReferenceSet, pixels: torch.Tensor, sizes: Sequence[tuple[int, int]]
    ) -> list[SegmentationResult]:
        """Segment a batch of resized images with one backbone call.

        Parameters
        ----------
        references : ReferenceSet
        pixels : torch.Tensor
            ``(B, 3, s, s)`` uint8 RGB (see :func:`insid3_core.features.resized_pixels`).
        sizes : sequence of (H, W)
            Each target's size, which its mask is returned at.
        """
        return self.segment_features(references, self._features(references, pixels), sizes)

    def segment_features(
        self, references: ReferenceSet, features: torch.Tensor, sizes: Sequence[tuple[int, int]]
    ) -> list[SegmentationResult]:
        """Steps 2-7 on targets' patch features ``(B, N, C)`` (from :func:`patch_features`)."""
        lowres, confidence = self._lowres_masks(references, features)
        return [self._finish(mask, score, size) for mask, score, size in zip(lowres, confidence, sizes)]

    def _features(self, references: ReferenceSet, pixels: torch.Tensor) -> torch.Tensor:
        if references.image_size != self.config.image_size:
            raise ValueError(
                f"references were encoded at {references.image_size}px, this segmenter runs at {self.config.image_size}px"
            )
        with self.stage("backbone"):
            return patch_features(self.backbone, pixels)

    def _lowres_masks(self, references: ReferenceSet, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Steps 2-6 for a batch: ``(B, h, w)`` bool masks and ``(B,)`` confidences, on the host."""
        with self.stage("matching"):
            debiased = debias(features, self.basis)
            similarity = debiased @ references.prototype
            candidates = forward_candidates(similarity) & backward_candidates(
                debiased, references.features, references.masks
            )
            matched = torch.nonzero(candidates.any(dim=1)).flatten().tolist()
        lowres = torch.zeros(candidates.shape, dtype=torch.bool, device=features.device)
        if matched:
            with self.stage("clustering"):
                labels = cluster_patches(features[matched], self.config.tau, self.config.clustering)
            with self.stage("aggregation"):
                for index, target_labels in zip(matched, labels):
                    scores = cluster_scores(
                        target_labels,
                        candidates[index],
                        features[index],
                        debiased[index],
                        similarity[index],
                        references.prototype,
                    )
                    lowres[index] = scores[target_labels] > self.config.merge_threshold
        selected = lowres.float()
        confidence = ((similarity * selected).sum(dim=1) / selected.sum(dim=1).clamp(min=1.0)).clamp(0.0, 1.0)
        return lowres.view(-1, *self.grid).cpu().numpy(), confidence.cpu().numpy()

    def stage(self, name: str):
        """Context timing a named stage with :attr:`timer`, when one is set."""
        return self.timer.stage(name) if self.timer is not None else contextlib.nullcontext()

    def _finish(self, lowres: np.ndarray, confidence: float, size: tuple[int, int]) -> SegmentationResult:
        """Step 7 on the host: the full-resolution mask and its quality report."""
        with self.stage("output"):
            mask = upsample_mask(torch.from_numpy(lowres), self.config.image_size, size).numpy()
            return SegmentationResult(
                mask=mask, lowres_mask=lowres, score=float(confidence), quality=quality_report(mask, self.quality)
            )


def _is_done(pending: Future | InputError) -> bool:
    return not isinstance(pending, Future) or pending.done()


def _resolved(item: tuple[ImageLike, Future | InputError]) -> tuple[ImageLike, SegmentationResult | InputError]:
    target, pending = item
    return target, pending.result() if isinstance(pending, Future) else pending
