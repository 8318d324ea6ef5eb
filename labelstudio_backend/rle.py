"""Boolean masks to and from Label Studio's brush RLE."""

from __future__ import annotations

import numpy as np


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode an ``(H, W)`` bool mask as brush RLE (RGBA bytes, all channels 255 inside)."""
    from label_studio_sdk.converter.brush import encode_rle

    rgba = np.repeat(mask.astype(np.uint8)[..., None] * 255, 4, axis=2)
    return [int(value) for value in encode_rle(rgba.ravel())]


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode brush RLE to an ``(H, W)`` bool mask (alpha channel above zero)."""
    from label_studio_sdk.converter.brush import decode_rle

    return np.reshape(decode_rle(rle), (height, width, 4))[..., 3] > 0
