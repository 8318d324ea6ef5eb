"""From the feature-resolution mask back to the target's pixels (docs/algorithm.md step 7)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def upsample_mask(lowres: torch.Tensor, image_size: int, original_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a 0/1 mask to ``(s, s)`` then to ``(H, W)``, thresholding at 0.5 each time.

    Parameters
    ----------
    lowres : torch.Tensor
        ``(h, w)`` bool.
    image_size : int
        Square model input size ``s``.
    original_size : (H, W)

    Returns
    -------
    torch.Tensor
        ``(H, W)`` bool on the device of ``lowres``.
    """
    square = F.interpolate(lowres.float()[None, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    return resize_mask(square[0, 0] > 0.5, original_size)


def resize_mask(square: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a ``(s, s)`` bool mask to ``(H, W)``, thresholded at 0.5."""
    full = F.interpolate(square.float()[None, None], size=tuple(original_size), mode="bilinear", align_corners=False)
    return full[0, 0] > 0.5


def full_resolution(lowres: np.ndarray, refined: np.ndarray | None, image_size: int,
                    original_size: tuple[int, int]) -> np.ndarray:
    """A class's ``(H, W)`` bool mask: its guided ``(s, s)`` mask resized when there is one
    (``refined``), else its ``(h, w)`` feature-resolution ``lowres`` mask upsampled."""
    if refined is None:
        return upsample_mask(torch.from_numpy(lowres), image_size, original_size).numpy()
    return resize_mask(torch.from_numpy(refined), original_size).numpy()
