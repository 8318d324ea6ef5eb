"""Masks to and from Label Studio's region values: ``brushlabels`` (RLE), ``bitmasklabels`` (a PNG
data URL, black pixels on transparent ones) and ``polygonlabels`` (points in percent).

Polygons come from OpenCV's contours (``cv2.findContours`` with the two-level hierarchy, so a
region's holes are known) simplified by ``cv2.approxPolyDP`` within ``tolerance`` pixels. Label
Studio's polygons have no holes, so each hole is joined to its outer ring by a zero-width cut
at the closest pair of vertices: filled, the polygon leaves the hole empty. Decoding fills the
polygon with the even-odd rule, so the holes of such a polygon stay holes.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from .budget import Lease
from .errors import BackendError
from .labelconfig import RegionTarget
from .rle import mask_to_rle, rle_to_mask

DATA_URL_PREFIX = "data:image/png;base64,"


def mask_values(kind: str, label: str, mask: np.ndarray, tolerance: float = 1.0) -> list[dict]:
    """The ``value`` objects of the regions showing ``mask`` (``(H, W)`` bool) as ``label``.

    One value for a brush or bitmask (an empty mask too); one per connected region for polygons
    (none for an empty mask).
    """
    if kind == "brushlabels":
        return [{"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}]
    if kind == "bitmasklabels":
        return [{"imageDataURL": bitmask_data_url(mask), "bitmasklabels": [label]}]
    if kind == "polygonlabels":
        height, width = mask.shape
        return [{"points": [[100.0 * x / width, 100.0 * y / height] for x, y in ring], "closed": True,
                 "polygonlabels": [label]} for ring in polygons(mask, tolerance)]
    raise ValueError(f"unknown region type {kind!r}")


def bitmask_data_url(mask: np.ndarray) -> str:
    """``mask`` as Label Studio's bitmask: an RGBA PNG, opaque black where set, as a data URL."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[mask, 3] = 255
    stream = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(stream, format="PNG")
    return DATA_URL_PREFIX + base64.b64encode(stream.getvalue()).decode("ascii")


def polygons(mask: np.ndarray, tolerance: float = 1.0) -> list[list[tuple[float, float]]]:
    """Pixel-coordinate rings ``[(x, y), ...]`` of each connected region of ``mask``, holes cut
    in (see the module docstring), simplified within ``tolerance`` pixels."""
    import cv2

    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    rings = []
    for index, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent != -1:
            continue  # a hole: joined to its outer ring below
        outer = _simplified(contours[index], tolerance)
        while child != -1:
            hole = _simplified(contours[child], tolerance)
            if len(hole) >= 3:
                outer = _joined(outer, hole)
            child = hierarchy[0][child][0]
        if len(outer) >= 3:
            rings.append([(float(x) + 0.5, float(y) + 0.5) for x, y in outer])
    return rings


def _simplified(contour: np.ndarray, tolerance: float) -> np.ndarray:
    import cv2

    return cv2.approxPolyDP(contour, tolerance, True)[:, 0, :] if tolerance > 0 else contour[:, 0, :]


def _joined(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``outer`` with ``hole`` spliced in at their closest vertices (out, around the hole, back)."""
    distances = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(axis=2)
    i, j = np.unravel_index(np.argmin(distances), distances.shape)
    around = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([outer[: i + 1], around, outer[i:]])


def value_mask(kind: str, value: dict, height: int, width: int) -> np.ndarray:
    """The ``(H, W)`` bool mask of a region ``value``; ``ValueError`` when it cannot be decoded."""
    if kind == "brushlabels":
        if "rle" not in value:
            raise ValueError("a brush region without rle")
        return rle_to_mask(value["rle"], height, width)
    if kind == "bitmasklabels":
        return _bitmask(value.get("imageDataURL"), height, width)
    if kind == "polygonlabels":
        return _filled(value.get("points"), height, width)
    raise ValueError(f"unknown region type {kind!r}")


def _bitmask(url, height: int, width: int) -> np.ndarray:
    if not isinstance(url, str) or not url.startswith(DATA_URL_PREFIX):
        raise ValueError("a bitmask region whose imageDataURL is not a base64 PNG data URL")
    try:
        data = base64.b64decode(url[len(DATA_URL_PREFIX):], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ValueError(f"its image is {image.format}, not PNG")
            if image.size != (width, height):
                raise ValueError(f"its image is {image.width}x{image.height}, the task image {width}x{height}")
            rgba = np.asarray(image.convert("RGBA"))
    except (ValueError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"a bitmask region that cannot be decoded ({err})") from None
    return rgba[..., 3] > 0


def _filled(points, height: int, width: int) -> np.ndarray:
    import cv2

    try:
        ring = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        ring = None
    if ring is None or ring.ndim != 2 or ring.shape[1] != 2 or len(ring) < 3 or not np.isfinite(ring).all():
        raise ValueError("a polygon region whose points are not a list of at least three [x, y] percentages")
    pixels = np.round(ring / 100.0 * [width, height] - 0.5).astype(np.int32)
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(canvas, [pixels], 1)  # even-odd within one ring: a cut-in hole stays a hole
    return canvas > 0


def annotation_masks(annotation: dict, target: RegionTarget, max_pixels: int, lease: Lease | None = None,
                     size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """``label -> (H, W) bool`` union of an annotation's non-empty regions (brush, bitmask or
    polygon: ``target``'s type) of ``target``'s labels.

    Every region must declare one image size, ``size`` (``(H, W)``) when given, and no more than
    ``max_pixels``; each label's mask takes its pixels from ``lease`` before it is decoded, so
    the sizes a payload declares cannot make the backend hold more than the pixel budget.
    Raises :class:`BackendError` (422, or 413 above the bounds) for a region that cannot be decoded.
    """
    masks: dict[str, np.ndarray] = {}
    name = f"annotation {str(annotation.get('id'))[:40]}"
    result = annotation.get("result")
    for item in result if isinstance(result, list) else []:
        value = item.get("value") if isinstance(item, dict) else None
        if not isinstance(value, dict) or item.get("type") != target.kind or item.get("from_name") != target.from_name:
            continue
        labels = target.own_labels(value.get(target.kind))
        if not labels:
            continue
        try:
            height, width = int(item["original_height"]), int(item["original_width"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise BackendError(f"{name}: region without its image size ({err})", 422) from err
        if height <= 0 or width <= 0 or height * width > max_pixels:
            raise BackendError(f"{name}: region of {width}x{height} pixels (limit INSID3_MAX_PIXELS={max_pixels})", 413)
        if size is not None and (height, width) != tuple(size):
            raise BackendError(f"{name}: a region of a {width}x{height} image, the task image is {size[1]}x{size[0]}", 422)
        size = (height, width)
        if lease is not None:
            for label in labels:
                if label not in masks:
                    lease.take(height * width, f"{name}: the mask of {label[:40]!r}")
        try:
            mask = value_mask(target.kind, value, height, width)
        except ValueError as err:
            raise BackendError(f"{name}: region cannot be decoded ({err})", 422) from err
        for label in labels:
            if label in masks:
                masks[label] |= mask
            else:
                masks[label] = mask.copy() if len(labels) > 1 else mask
    return {label: mask for label, mask in masks.items() if mask.any()}
