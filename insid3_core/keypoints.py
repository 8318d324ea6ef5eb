"""Keypoint transfer (semantic correspondence): reference points -> matching points in targets.

Each reference point takes the backbone feature at its position, sampled bilinearly from the
reference's patch grid; in every target the most similar patch (cosine similarity, debiased
features by default) is found and refined to sub-patch precision by a soft-argmax over the
``window x window`` patches around it: the refined position is the mean of their centres
weighted by ``softmax(similarity / temperature)``. A best patch on the grid's edge keeps only
the neighbours inside the grid. The result is mapped back to the target's own pixels.

Coordinates are pixel indices in the displayed (EXIF-applied) orientation: ``(x, y)`` is the
column and row of a pixel, whose centre lies at ``(x + 0.5, y + 0.5)`` in continuous image
coordinates; a point is inside an image of size ``W x H`` when ``0 <= x <= W - 1`` and
``0 <= y <= H - 1``. Predicted points are floats in the same convention.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import BATCH_SIZE, is_finite_number
from .encoder import Encoder
from .features import resized_pixels
from .io import ImageLike, InputError, json_value, load_image, read_small_file
from .loader import default_workers, load_batches


@dataclass(frozen=True)
class ReferencePoints:
    """Reference points encoded once for any number of targets.

    Attributes
    ----------
    features : torch.Tensor
        ``(P, C)`` L2-normalised point features (bilinear samples of the patch grid).
    patches : torch.Tensor
        ``(N, C)`` L2-normalised reference patch features, for the mutual check.
    grid_points : torch.Tensor
        ``(P, 2)`` float32 ``(u, v)`` positions on the patch grid (patch ``j`` spans ``[j, j + 1)``).
    names : tuple of str
    points : np.ndarray
        ``(P, 2)`` float64 ``(x, y)`` in the reference's pixels.
    size : (H, W)
        The reference image's size (EXIF-applied orientation).
    debiased : bool
        Whether the features are debiased (positional subspace projected out).
    image_size : int
        Input size the reference was encoded at.
    """

    features: torch.Tensor
    patches: torch.Tensor
    grid_points: torch.Tensor
    names: tuple[str, ...]
    points: np.ndarray
    size: tuple[int, int]
    debiased: bool
    image_size: int

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class PointMatches:
    """The points predicted in one target.

    Attributes
    ----------
    points : np.ndarray
        ``(P, 2)`` float64 ``(x, y)`` in the target's pixels (its own size and EXIF-applied
        orientation), in the order of the reference points.
    scores : np.ndarray
        ``(P,)`` float32 cosine similarity in [-1, 1] between the reference point's feature and
        the best target patch.
    mutual : np.ndarray or None
        ``(P,)`` bool: the best target patch's own nearest reference patch lies within one patch
        (Chebyshev distance on the grid) of the reference point; ``None`` when not checked.
    size : (H, W)
        The target's size.
    """

    points: np.ndarray
    scores: np.ndarray
    mutual: np.ndarray | None
    size: tuple[int, int]


def load_points(path: str | Path) -> tuple[tuple[str, ...], np.ndarray]:
    """Read a points file: a JSON list of ``[x, y]`` or ``{"name": ..., "x": ..., "y": ...}``.

    Unnamed points are named by their index (``"0"``, ``"1"``, ...). Raises
    :class:`InputError` naming the file when it is missing, not JSON, empty, holds a malformed
    or non-finite entry, or repeats a name.

    Returns
    -------
    names : tuple of str
    points : np.ndarray
        ``(P, 2)`` float64 ``(x, y)``.
    """
    try:
        entries = json_value(read_small_file(path).decode("utf-8"))
    except FileNotFoundError as err:
        raise InputError(f"{path}: points file not found") from err
    except OSError as err:
        raise InputError(f"{path}: cannot read the points file ({err.strerror or err})") from err
    except ValueError as err:
        raise InputError(f"{path}: not a readable JSON points file ({err})") from err
    if not isinstance(entries, list) or not entries:
        raise InputError(f'{path}: expected a non-empty JSON list of [x, y] or {{"name", "x", "y"}} points')
    names, points = [], []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and {"x", "y"} <= entry.keys():
            name, coordinates = entry.get("name", str(index)), (entry["x"], entry["y"])
        elif isinstance(entry, list) and len(entry) == 2:
            name, coordinates = str(index), entry
        else:
            raise InputError(f'{path}: point {index} is {json.dumps(entry)}, expected [x, y] or {{"name", "x", "y"}}')
        if not isinstance(name, str) or not all(is_finite_number(value) for value in coordinates):
            raise InputError(f"{path}: point {index} ({json.dumps(entry)}) needs finite numbers x, y and a string name")
        names.append(name)
        points.append(coordinates)
    repeated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
    if repeated:
        raise InputError(f"{path}: point names repeat: {', '.join(repeated)}")
    return tuple(names), np.asarray(points, dtype=np.float64)


def check_inside(points: np.ndarray, size: tuple[int, int], names: Sequence[str], source: str) -> None:
    """Raise :class:`InputError` naming ``source`` when a point ``(x, y)`` lies outside a ``(H, W)`` image."""
    height, width = size
    outside = (points[:, 0] < 0) | (points[:, 0] > width - 1) | (points[:, 1] < 0) | (points[:, 1] > height - 1)
    if outside.any():
        listed = ", ".join(f"{names[i]} ({points[i, 0]:g}, {points[i, 1]:g})" for i in np.flatnonzero(outside))
        raise InputError(
            f"{source}: point(s) outside the reference image ({width}x{height}, "
            f"x in [0, {width - 1}], y in [0, {height - 1}]): {listed}"
        )


def to_grid(points: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Pixel ``(x, y)`` of an ``(H, W)`` image -> ``(u, v)`` on an ``(h, w)`` patch grid, ``(..., 2)``.

    The image is resized to the square input without keeping its aspect ratio, so each axis
    scales on its own: ``u = (x + 0.5) * w / W``.
    """
    scale = points.new_tensor([grid[1] / size[1], grid[0] / size[0]])
    return (points + 0.5) * scale


def from_grid(grid_points: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_grid`: ``(u, v)`` on the grid -> pixel ``(x, y)`` of an ``(H, W)`` image."""
    scale = grid_points.new_tensor([size[1] / grid[1], size[0] / grid[0]])
    return grid_points * scale - 0.5


def sample_grid(features: torch.Tensor, grid_points: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear samples of a patch grid at ``(u, v)`` positions, L2-normalised.

    Parameters
    ----------
    features : torch.Tensor
        ``(N, C)`` patch features in raster order of the ``(h, w)`` grid.
    grid_points : torch.Tensor
        ``(P, 2)`` ``(u, v)``; patch ``j``'s centre is at ``j + 0.5``. Positions between the
        outermost centres and the grid's edge take the edge patch's feature.

    Returns
    -------
    torch.Tensor
        ``(P, C)``.
    """
    height, width = grid
    plane = features.T.reshape(1, -1, height, width)
    normalised = grid_points / grid_points.new_tensor([width, height]) * 2.0 - 1.0
    sampled = F.grid_sample(plane, normalised[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    return F.normalize(sampled[0, :, 0].T, dim=-1)


@torch.inference_mode()
def encode_points(
    encoder: Encoder,
    image: ImageLike,
    points: np.ndarray,
    names: Sequence[str] | None = None,
    debiased: bool = True,
    source: str | None = None,
) -> ReferencePoints:
    """Encode reference points with one backbone call on the reference image.

    Parameters
    ----------
    encoder : Encoder
        The backbone, input size and positional basis (a segmenter's ``encoder`` shares its own).
    image : path or PIL image
    points : np.ndarray
        ``(P, 2)`` ``(x, y)`` in the reference's pixels (EXIF-applied orientation).
    names : sequence of str or None
        ``None`` names points by index.
    debiased : bool
        Match debiased features (default) or the original ones.
    source : str or None
        Where the points came from, named in errors (default: the image).
    """
    points = np.asarray(points, dtype=np.float64)
    names = tuple(names) if names is not None else tuple(str(i) for i in range(len(points)))
    if points.ndim != 2 or points.shape[1] != 2 or not len(points) or len(names) != len(points):
        raise InputError(
            f"{source or image}: expected a non-empty (P, 2) array of (x, y) with one name each, "
            f"got shape {points.shape} and {len(names)} name(s)"
        )
    loaded = load_image(image)
    check_inside(points, (loaded.height, loaded.width), names, source or str(image))
    pixels = resized_pixels(loaded, encoder.image_size)[None]
    patches = _matching_features(encoder, encoder.features(pixels), debiased)[0]
    grid_points = to_grid(torch.as_tensor(points, dtype=torch.float32, device=patches.device),
                          (loaded.height, loaded.width), encoder.grid)
    return ReferencePoints(
        features=sample_grid(patches, grid_points, encoder.grid),
        patches=patches,
        grid_points=grid_points,
        names=names,
        points=points,
        size=(loaded.height, loaded.width),
        debiased=debiased,
        image_size=encoder.image_size,
    )


def _matching_features(encoder: Encoder, features: torch.Tensor, debiased: bool) -> torch.Tensor:
    return encoder.debiased(features) if debiased else features


MAX_WINDOW = 255
"""Widest soft-argmax window, in patches (the grid side of a 4096 px input)."""


def check_refinement(window: int, temperature: float) -> None:
    """Raise ``ValueError`` unless ``window`` is an odd number of patches from 1 to
    :data:`MAX_WINDOW` and ``temperature`` a positive finite number (checked before any work)."""
    if not 1 <= window <= MAX_WINDOW or window % 2 == 0:
        raise ValueError(f"window must be an odd number of patches from 1 to {MAX_WINDOW}, got {window}")
    if not is_finite_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def best_matches(
    point_features: torch.Tensor,
    target_features: torch.Tensor,
    grid: tuple[int, int],
    window: int = 3,
    temperature: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest target patch per point, refined by a soft-argmax over a window around it.

    Parameters
    ----------
    point_features : torch.Tensor
        ``(P, C)`` L2-normalised.
    target_features : torch.Tensor
        ``(B, N, C)`` L2-normalised, rows in raster order of the ``(h, w)`` grid.
    grid : (h, w)
    window : int
        Odd side of the square of patches the soft-argmax averages over (1: patch centres only).
    temperature : float
        Softmax temperature on cosine similarities; smaller trusts the best patch more.

    Returns
    -------
    grid_points : torch.Tensor
        ``(B, P, 2)`` refined ``(u, v)`` on the grid.
    scores : torch.Tensor
        ``(B, P)`` cosine similarity of the best patch.
    best : torch.Tensor
        ``(B, P)`` int64 raster index of the best patch.
    """
    check_refinement(window, temperature)
    height, width = grid
    similarity = torch.einsum("pc,bnc->bpn", point_features, target_features)
    scores, best = similarity.max(dim=-1)
    offsets = torch.arange(window, device=best.device) - window // 2
    rows = (best // width)[..., None, None] + offsets[:, None]  # (B, P, window, 1)
    columns = (best % width)[..., None, None] + offsets  # (B, P, 1, window)
    rows, columns = torch.broadcast_tensors(rows, columns)
    inside = (rows >= 0) & (rows < height) & (columns >= 0) & (columns < width)
    index = (rows.clamp(0, height - 1) * width + columns.clamp(0, width - 1)).flatten(2)
    neighbours = similarity.gather(-1, index).masked_fill(~inside.flatten(2), float("-inf"))
    # shifted by the best similarity (0 after the shift), and the temperature kept above the dtype's
    # smallest normal number: a tiny temperature tends to the best patch, never 0 / 0
    temperature = max(temperature, torch.finfo(neighbours.dtype).tiny)
    weights = torch.softmax((neighbours - scores[..., None]) / temperature, dim=-1)
    centres = torch.stack((columns.flatten(2), rows.flatten(2)), dim=-1).to(weights.dtype) + 0.5
    return (weights[..., None] * centres).sum(dim=2), scores, best


def mutual_check(
    best: torch.Tensor,
    target_features: torch.Tensor,
    reference: ReferencePoints,
    grid: tuple[int, int],
    radius: float = 1.0,
) -> torch.Tensor:
    """Whether each best target patch's nearest reference patch lies near the reference point.

    Parameters
    ----------
    best : torch.Tensor
        ``(B, P)`` raster index of each point's best target patch.
    target_features : torch.Tensor
        ``(B, N, C)`` L2-normalised (the features the points were matched with).
    reference : ReferencePoints
    grid : (h, w)
    radius : float
        Largest Chebyshev distance, in patches, from the reference point to the centre of the
        backward match.

    Returns
    -------
    torch.Tensor
        ``(B, P)`` bool.
    """
    chosen = target_features.gather(1, best[..., None].expand(-1, -1, target_features.shape[-1]))
    backward = (chosen @ reference.patches.T).argmax(dim=-1)
    centres = torch.stack((backward % grid[1], backward // grid[1]), dim=-1).float() + 0.5
    return (centres - reference.grid_points).abs().amax(dim=-1) <= radius


def iter_match(
    encoder: Encoder,
    reference: ReferencePoints,
    targets: Iterable[ImageLike],
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    window: int = 3,
    temperature: float = 0.05,
    mutual: bool = False,
) -> Iterator[tuple[ImageLike, PointMatches | InputError]]:
    """Yield ``(target, PointMatches)`` in input order, or ``(target, InputError)`` for an unreadable one.

    Targets are decoded in ``workers`` threads and pass the backbone in batches of
    ``batch_size`` (one call per batch); see :func:`best_matches` for ``window`` and
    ``temperature`` and :func:`mutual_check` for ``mutual``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if reference.image_size != encoder.image_size:
        raise ValueError(
            f"points were encoded at {reference.image_size}px, this encoder runs at {encoder.image_size}px"
        )
    workers = default_workers(encoder.backbone.device) if workers is None else workers
    pin = encoder.backbone.device.type == "cuda"
    for batch in load_batches(targets, encoder.image_size, batch_size, workers, pin):
        matches = iter(_match_batch(encoder, reference, batch.pixels, batch.sizes, window, temperature, mutual)
                       if batch.pixels is not None else ())
        for target, error in batch.entries:
            yield target, error or next(matches)


@torch.inference_mode()
def _match_batch(
    encoder: Encoder,
    reference: ReferencePoints,
    pixels: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    window: int,
    temperature: float,
    mutual: bool,
) -> list[PointMatches]:
    features = _matching_features(encoder, encoder.features(pixels), reference.debiased)
    grid_points, scores, best = best_matches(reference.features, features, encoder.grid, window, temperature)
    agrees = mutual_check(best, features, reference, encoder.grid).cpu().numpy() if mutual else None
    grid_points, scores = grid_points.double().cpu(), scores.cpu().numpy()
    return [
        PointMatches(
            from_grid(grid_points[i], size, encoder.grid).numpy(),
            scores[i],
            None if agrees is None else agrees[i],
            tuple(size),
        )
        for i, size in enumerate(sizes)
    ]


def match_points(
    encoder: Encoder,
    reference: ReferencePoints,
    targets: Iterable[ImageLike],
    batch_size: int = BATCH_SIZE,
    **options,
) -> list[PointMatches]:
    """Match reference points in targets (paths or PIL images); an unreadable one raises :class:`InputError`.

    ``options`` are those of :func:`iter_match` (``workers``, ``window``, ``temperature``, ``mutual``).

    Examples
    --------
    >>> encoder = EngineSettings.from_env(weights="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth").build().encoder
    >>> names, points = load_points("points.json")
    >>> reference = encode_points(encoder, "cat.jpg", points, names)
    >>> for match in match_points(encoder, reference, ["a.jpg", "b.jpg"]):
    ...     match.points, match.scores
    """
    results = []
    for _, result in iter_match(encoder, reference, targets, batch_size, **options):
        if isinstance(result, InputError):
            raise result
        results.append(result)
    return results
