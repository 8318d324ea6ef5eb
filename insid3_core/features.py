"""Image preprocessing and dense patch features (ALGORITHM.md steps 0 and 1)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize an RGB image to ``(s, s)`` (PIL bilinear, aspect not kept) and normalise.

    Returns
    -------
    torch.Tensor
        ``(3, s, s)`` float32, ImageNet-normalised.
    """
    resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return normalise(pixels)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` in [0, 1] -> ImageNet-normalised (same shape)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels - mean) / std


@torch.inference_mode()
def patch_features(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Last-layer, final-norm patch features of a batch, L2-normalised over channels.

    Parameters
    ----------
    backbone : Backbone
    images : torch.Tensor
        ``(B, 3, s, s)`` normalised images (any device; moved without blocking).

    Returns
    -------
    torch.Tensor
        ``(B, h*w, C)`` float32 on the backbone's device, rows in raster order of the
        ``(h, w) = (s/16, s/16)`` grid, each row L2-normalised.
    """
    batch = images.to(backbone.device, dtype=backbone.dtype, non_blocking=True)
    tokens = backbone.model.forward_features(batch)
    patches = tokens[:, backbone.num_prefix_tokens :].float()
    return F.normalize(patches, dim=-1)
