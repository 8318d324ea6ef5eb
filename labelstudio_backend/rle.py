"""Boolean masks to and from Label Studio's brush RLE."""

from __future__ import annotations

import numpy as np


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode an ``(H, W)`` bool mask as brush RLE (RGBA bytes, all channels 255 inside)."""
    from label_studio_sdk.converter.brush import encode_rle

    rgba = np.repeat(mask.astype(np.uint8)[..., None] * 255, 4, axis=2)
    return [int(value) for value in encode_rle(rgba.ravel())]


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Decode brush RLE to an ``(H, W)`` bool mask (alpha channel above zero).

    Raises ``ValueError`` when ``rle`` is not a list of bytes or its header does not announce
    ``H * W * 4`` values (checked before anything that size is allocated).
    """
    from label_studio_sdk.converter.brush import decode_rle

    if not isinstance(rle, list):
        raise ValueError("rle is not a list")
    try:
        data = bytes(rle)
    except TypeError as err:
        raise ValueError("rle is not a list of bytes") from err
    expected = height * width * 4
    if len(data) < 4 or int.from_bytes(data[:4], "big") != expected:
        raise ValueError(f"rle does not hold {height}x{width} RGBA values")
    try:
        return np.reshape(decode_rle(data), (height, width, 4))[..., 3] > 0
    except IndexError as err:
        raise ValueError("rle ends early") from err
    except (OverflowError, ValueError) as err:  # a word size above 8 bits decodes values no byte holds
        raise ValueError(f"rle holds values that are not bytes ({err})") from err
