"""Synthetic scenes drawn by the tests: striped disks, checkered squares and look-alike distractors
on a textured green background, with the true mask of every object."""

from __future__ import annotations

import numpy as np
from PIL import Image

STRIPES = ((220, 40, 30), (245, 200, 40))
LOOKALIKE_STRIPES = ((220, 40, 30), (240, 120, 30))
CHECKER = ((40, 60, 220), (60, 170, 70))


def background(size: tuple[int, int], seed: int) -> np.ndarray:
    """``(H, W, 3)`` float green texture of size ``(W, H)``."""
    width, height = size
    rng = np.random.default_rng(seed)
    xs = np.arange(width)[None, :]
    shade = 0.5 + 0.5 * np.sin(xs / 37.0 + seed)
    image = np.empty((height, width, 3))
    image[..., 0] = 40 + 40 * shade
    image[..., 1] = 120 + 60 * shade
    image[..., 2] = 40 + 30 * shade
    return image + rng.normal(0, 4, image.shape)


def disk(size: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    """``(H, W)`` bool disk."""
    ys, xs = np.mgrid[: size[1], : size[0]]
    return (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius**2


def square(size: tuple[int, int], corner: tuple[int, int], side: int) -> np.ndarray:
    """``(H, W)`` bool axis-aligned square."""
    mask = np.zeros((size[1], size[0]), dtype=bool)
    mask[corner[1] : corner[1] + side, corner[0] : corner[0] + side] = True
    return mask


def paint_stripes(image: np.ndarray, mask: np.ndarray, colours=STRIPES, period: int = 14) -> None:
    ys, xs = np.nonzero(mask)
    first = ((xs + ys) // (period // 2)) % 2 == 0
    image[ys[first], xs[first]] = colours[0]
    image[ys[~first], xs[~first]] = colours[1]


def paint_checker(image: np.ndarray, mask: np.ndarray, colours=CHECKER, cell: int = 8) -> None:
    ys, xs = np.nonzero(mask)
    first = (xs // cell + ys // cell) % 2 == 0
    image[ys[first], xs[first]] = colours[0]
    image[ys[~first], xs[~first]] = colours[1]


def scene(
    size: tuple[int, int] = (320, 256),
    disks=(),
    squares=(),
    lookalikes=(),
    seed: int = 0,
) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """Draw a scene.

    Parameters
    ----------
    size : (W, H)
    disks, lookalikes : sequence of (cx, cy, radius)
        Red/yellow striped disks, and red/orange striped look-alike disks.
    squares : sequence of (x, y, side)
        Blue/green checkered squares.

    Returns
    -------
    image : PIL.Image.Image
        RGB.
    masks : dict
        ``"disks"``, ``"squares"``, ``"lookalikes"``: ``(H, W)`` bool unions, and
        ``"disk_instances"``: a list of each disk's ``(H, W)`` bool mask.
    """
    image = background(size, seed)
    masks = {name: np.zeros((size[1], size[0]), dtype=bool) for name in ("disks", "squares", "lookalikes")}
    masks["disk_instances"] = []
    for x, y, side in squares:
        shape = square(size, (x, y), side)
        paint_checker(image, shape)
        masks["squares"] |= shape
    for cx, cy, radius in lookalikes:
        shape = disk(size, (cx, cy), radius)
        paint_stripes(image, shape, LOOKALIKE_STRIPES)
        masks["lookalikes"] |= shape
    for cx, cy, radius in disks:
        shape = disk(size, (cx, cy), radius) & ~masks["disks"]
        paint_stripes(image, shape)
        masks["disks"] |= shape
        masks["disk_instances"].append(shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), masks


FIELD_STRIPES = ((200, 60, 40), (230, 150, 60))


def ringed_scene(seed: int, size: tuple[int, int] = (320, 256)) -> tuple[Image.Image, np.ndarray]:
    """One or two objects made of two textures (a striped core in a checkered ring) on the green
    background, and the ``(H, W)`` bool mask of the whole objects: at the default tau the two
    textures fall into different clusters and the masks keep a part."""
    rng = np.random.default_rng(seed)
    image = background(size, seed)
    mask = np.zeros((size[1], size[0]), dtype=bool)
    for _ in range(rng.integers(1, 3)):
        centre, radius = (rng.integers(70, 250), rng.integers(70, 190)), rng.integers(35, 55)
        outer, inner = disk(size, centre, radius), disk(size, centre, radius * 0.55)
        paint_checker(image, outer & ~inner)
        paint_stripes(image, inner)
        mask |= outer
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), mask


def field_scene(seed: int, size: tuple[int, int] = (320, 256)) -> tuple[Image.Image, np.ndarray]:
    """A red/yellow striped disk on a field of red/orange stripes, and the disk's ``(H, W)`` bool
    mask: at the default tau the disk's clusters merge with the field's."""
    rng = np.random.default_rng(seed)
    image = background(size, seed)
    paint_stripes(image, np.ones((size[1], size[0]), dtype=bool), FIELD_STRIPES, period=10)
    shape = disk(size, (rng.integers(80, 240), rng.integers(70, 180)), rng.integers(35, 55))
    paint_stripes(image, shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)), shape
