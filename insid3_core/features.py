"""Image preprocessing and dense patch features (docs/algorithm.md steps 0 and 1)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbone import Backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize an image to ``(s, s)`` with PIL bilinear (aspect ratio not kept).

    Returns
    -------
    torch.Tensor
        ``(3, s, s)`` uint8 RGB; :func:`patch_features` normalises it on the device.
    """
    resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``(B, 3, s, s)`` uint8 -> float32 in [0, 1], ImageNet-normalised (same device)."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=pixels.device)[:, None, None]
    return (pixels.float() / 255.0 - mean) / std


@torch.inference_mode()
def patch_features(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """Last-layer, final-norm patch features of a batch, L2-normalised over channels.

    Parameters
    ----------
    backbone : Backbone
    pixels : torch.Tensor
        ``(B, 3, s, s)`` uint8 RGB (any device; pinned CPU memory is copied without blocking).

    Returns
    -------
    torch.Tensor
        ``(B, h*w, C)`` float32 on the backbone's device, rows in raster order of the
        ``(h, w) = (s/16, s/16)`` grid, each row L2-normalised.
    """
    batch = normalise(pixels.to(backbone.device, non_blocking=True)).to(backbone.dtype)
    backbone.images_seen += batch.shape[0]
    tokens = backbone.model.forward_features(batch)
    patches = tokens[:, backbone.num_prefix_tokens :].float()
    return F.normalize(patches, dim=-1)
