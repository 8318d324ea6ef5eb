"""The encoder: a backbone, its positional basis and one input size, shared by segmentation and
keypoint transfer (steps 0-2 of ``docs/algorithm.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import Backbone
from .debias import debias, positional_basis
from .features import patch_features


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

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` L2-normalised original patch features of ``(B, 3, s, s)`` uint8 images."""
        return patch_features(self.backbone, pixels)

    def debiased(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` with the positional subspace projected out, L2-normalised again."""
        return debias(features, self.basis)
