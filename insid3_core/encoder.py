"""The encoder: a backbone, its positional basis and one input size, shared by segmentation,
calibration and keypoint transfer (steps 0-2 of ``docs/algorithm.md``)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .backbone import Backbone
from .debias import debias, positional_basis
from .features import patch_features, resized_pixels
from .io import ImageLike, InputError, MaskLike, load_image, reference_mask
from .matching import downsample_mask, mask_tensor, reference_prototype
from .results import ReferenceSet


@dataclass(frozen=True)
class LoadedReferences:
    """``S`` reference pairs decoded and checked, at the encoder's input size.

    Attributes
    ----------
    pixels : torch.Tensor
        ``(S, 3, s, s)`` uint8.
    masks : torch.Tensor
        ``(S, s, s)`` bool.
    names : tuple of str
        Each image's path, or ``reference <i>`` for an in-memory image (``i``: the first pair
        holding that object); pairs sharing an image share its name.
    truths : tuple of np.ndarray
        Each ``(H, W)`` bool mask at its image's own size.
    """

    pixels: torch.Tensor
    masks: torch.Tensor
    names: tuple[str, ...]
    truths: tuple[np.ndarray, ...]


def reference_names(images: Sequence[ImageLike]) -> list[str]:
    """How :func:`load_references` names each reference image: its path, or ``reference i`` (``i``
    its first place) for an image object, so that one file or object is one image."""
    in_memory: dict[int, str] = {}
    return [str(image) if isinstance(image, (str, Path)) else in_memory.setdefault(id(image), f"reference {index}")
            for index, image in enumerate(images)]


def load_references(references: Sequence[tuple[ImageLike, MaskLike]], image_size: int) -> LoadedReferences:
    """Decode and check ``(image, mask)`` pairs, each image file once.

    Raises :class:`InputError` naming the reference when an image is unreadable, a mask's size
    differs from its image's, or a mask is empty.
    """
    if not references:
        raise InputError("at least one (image, mask) reference is needed")
    names, images, masks, truths = [], [], [], []
    loaded: dict[str, tuple[Image.Image, torch.Tensor]] = {}
    for name, (image, mask) in zip(reference_names([image for image, _ in references]), references):
        if name not in loaded:
            decoded = load_image(image)
            loaded[name] = decoded, resized_pixels(decoded, image_size)
        decoded, resized = loaded[name]
        truth = reference_mask(name, decoded, mask)
        names.append(name)
        images.append(resized)
        masks.append(mask_tensor(truth, image_size))
        truths.append(truth)
    return LoadedReferences(torch.stack(images), torch.stack(masks), tuple(names), tuple(truths))


@dataclass(frozen=True)
class Encoder:
    """What turns ``(B, 3, s, s)`` images into ``(B, N, C)`` patch features, debiased or not.

    Attributes
    ----------
    backbone : Backbone
    basis : torch.Tensor
        ``(C, k)`` positional basis on the backbone's device.
    image_size : int
        The input side ``s``, a multiple of the patch size.
    """

    backbone: Backbone
    basis: torch.Tensor
    image_size: int

    @classmethod
    def build(cls, backbone: Backbone, image_size: int, svd_components: int | None = None, cache: Path | None = None,
              basis_file: str | Path | None = None) -> "Encoder":
        """The encoder of ``backbone`` at ``image_size``, its basis computed (or read from ``cache``
        or ``basis_file``, see :func:`~insid3_core.debias.positional_basis`)."""
        if image_size % backbone.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {backbone.patch_size}")
        return cls(backbone, positional_basis(backbone, image_size, svd_components, cache, basis_file), image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the patch grid."""
        side = self.image_size // self.backbone.patch_size
        return side, side

    @functools.cached_property
    def identity(self) -> str:
        """What makes this encoder's features comparable: the backbone, its weights, the input size
        and a digest of the positional basis (references carry it, see :class:`ReferenceSet`)."""
        digest = hashlib.sha256(self.basis.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]
        return (f"{self.backbone.name} ({self.backbone.identity or 'no weights file'}), {self.image_size}px, "
                f"{self.basis.shape[1]} positional components (basis {digest})")

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` L2-normalised original patch features of ``(B, 3, s, s)`` uint8 images."""
        return patch_features(self.backbone, pixels)

    def reference_features(self, loaded: LoadedReferences, batch_size: int = 16) -> torch.Tensor:
        """``(S, N, C)`` original patch features of loaded references, each image through the
        backbone once, ``batch_size`` images per call."""
        first: dict[str, int] = {}
        for index, name in enumerate(loaded.names):
            first.setdefault(name, index)
        chunks = loaded.pixels[list(first.values())].split(batch_size)
        encoded = torch.cat([self.features(chunk) for chunk in chunks])
        position = {name: index for index, name in enumerate(first)}
        return encoded[[position[name] for name in loaded.names]]

    def debiased(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` with the positional subspace projected out, L2-normalised again."""
        return debias(features, self.basis)

    def reference_set(
        self,
        features: torch.Tensor,
        masks: torch.Tensor,
        names: Sequence[str],
        negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> ReferenceSet:
        """A :class:`ReferenceSet` of original patch features ``(S, N, C)`` and masks ``(S, s, s)``.

        ``negatives`` holds the negative pairs' original patch features ``(R, N, C)`` and masks
        ``(R, s, s)``.
        """
        debiased = self.debiased(features)
        low = downsample_mask(masks.to(features.device), self.grid).flatten(1)
        negative_patches = None
        if negatives is not None:
            negative_features, negative_masks = negatives
            negative_low = downsample_mask(negative_masks.to(features.device), self.grid).flatten(1)
            negative_patches = self.debiased(negative_features)[negative_low]
        return ReferenceSet(debiased, low, reference_prototype(debiased, low), self.image_size, tuple(names),
                            negative_patches, self.identity)
