"""What the engine hands its callers: encoded references and per-target results.

Kept apart from the engine that makes them, so the modules that read results (instances, COCO
output, the integrations) do not import the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .quality import QualityReport


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
    negatives : torch.Tensor or None
        ``(R, C)`` debiased features of the patches inside the negative ("not this") masks.
    encoder : str
        :attr:`~insid3_core.encoder.Encoder.identity` of the encoder that made them: only a
        segmenter of the same identity can use them.
    """

    features: torch.Tensor
    masks: torch.Tensor
    prototype: torch.Tensor
    image_size: int
    names: tuple[str, ...]
    negatives: torch.Tensor | None = None
    encoder: str = ""

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
    similarity : np.ndarray
        ``(h, w)`` float32 debiased similarity of each patch to the reference prototype.
    clusters : np.ndarray
        ``(h, w)`` int32 cluster label of each patch (-1 everywhere when the target had no
        candidate patch and was not clustered).
    """

    mask: np.ndarray
    lowres_mask: np.ndarray
    score: float
    quality: QualityReport
    similarity: np.ndarray
    clusters: np.ndarray


@dataclass(frozen=True)
class References:
    """The encoded references of one or more classes (one class is a mapping of one), for any
    number of targets.

    Attributes
    ----------
    classes : dict of str to ReferenceSet
        Each class's references, in the order its masks are numbered in a label map.
    """

    classes: dict[str, ReferenceSet]

    def __post_init__(self) -> None:
        if not isinstance(self.classes, Mapping) or not self.classes:
            raise ValueError("References needs at least one class: {name: ReferenceSet}")
        for name, references in self.classes.items():
            if not isinstance(references, ReferenceSet):
                raise TypeError(f"References: class {name!r} holds {type(references).__name__}, not a ReferenceSet")

    @property
    def names(self) -> tuple[str, ...]:
        """The classes' names, in order."""
        return tuple(self.classes)

    @property
    def image_size(self) -> int:
        """Input size the references were encoded at."""
        return next(iter(self.classes.values())).image_size

    def __getitem__(self, name: str) -> ReferenceSet:
        return self.classes[name]

    def __len__(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Prediction:
    """The prediction for one target, every class from one backbone pass and one clustering.

    Attributes
    ----------
    label_map : np.ndarray
        ``(H, W)`` uint16: 0 for background, ``i + 1`` where the ``i``-th class (in the order
        of :attr:`classes`) won the pixel.
    classes : dict of str to SegmentationResult
        Each class's result; the classes' masks never overlap.
    score : float
        Confidence of the union of the masks in [0, 1]: the classes' scores weighted by their
        numbers of patches (0 when every mask is empty).
    quality : QualityReport
        The verdict on the union of the masks.
    """

    label_map: np.ndarray
    classes: dict[str, SegmentationResult]
    score: float
    quality: QualityReport

    @property
    def mask(self) -> np.ndarray:
        """``(H, W)`` bool union of the classes' masks."""
        return self.label_map > 0
