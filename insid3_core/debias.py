"""Positional subspace of a backbone and its removal (docs/algorithm.md step 2)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import Backbone
from .features import patch_features
from .io import atomic_write

ORTHONORMAL_TOLERANCE = 1e-3
"""Largest ``|UᵀU - I|`` entry of a ``--basis`` file (float32 SVD vectors reach about 1e-6)."""


def positional_directions(backbone: Backbone, image_size: int, cache: Path | None = None) -> torch.Tensor:
    """All left singular vectors of the centred features of a constant image (zeros before normalisation).

    Cached on disk under ``cache`` per backbone identity and input size; backbones with
    random weights (``identity is None``) are never cached.

    Returns
    -------
    torch.Tensor
        ``(C, r)`` float32 on the backbone's device, columns ordered by decreasing singular
        value, ``r = min(C, h*w)``.
    """
    path = None
    if cache is not None and backbone.identity is not None:
        path = Path(cache) / f"positional_{backbone.identity}_s{image_size}.npy"
        if path.is_file():
            cached = _read_cached(path, backbone.embed_dim)
            if cached is not None:
                return cached.to(backbone.device)
    black = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
    features = patch_features(backbone, black)[0].T.double()  # (C, N)
    centred = features - features.mean(dim=1, keepdim=True)
    directions = torch.linalg.svd(centred.cpu(), full_matrices=False).U.float()
    if path is not None:
        try:
            with atomic_write(path) as stream:
                np.save(stream, directions.numpy())
        except OSError as err:
            warnings.warn(f"{path}: cannot write the positional-basis cache ({err}); going on without it", stacklevel=2)
    return directions.to(backbone.device)


def _read_cached(path: Path, width: int) -> torch.Tensor | None:
    """The cached ``(C, r)`` directions at ``path``; ``None`` (with a warning naming it) when unusable."""
    try:
        directions = np.load(path, allow_pickle=False, mmap_mode="r")  # a header's shape is checked before any read
    except (OSError, ValueError, EOFError) as err:
        warnings.warn(f"{path}: unreadable positional-basis cache ({err}); computing it again", stacklevel=3)
        return None
    if directions.ndim != 2 or directions.shape[0] != width or not np.isfinite(directions).all():
        warnings.warn(f"{path}: positional-basis cache of shape {directions.shape} does not fit a backbone of "
                      f"width {width}; computing it again", stacklevel=3)
        return None
    return torch.from_numpy(np.array(directions, dtype=np.float32))  # a copy out of the memory map


def positional_basis(
    backbone: Backbone,
    image_size: int,
    components: int | None = None,
    cache: Path | None = None,
    basis_file: str | Path | None = None,
) -> torch.Tensor:
    """The basis ``U_k`` of the positional subspace that debiasing projects out.

    Parameters
    ----------
    backbone : Backbone
    image_size : int
    components : int or None
        ``k``; ``None`` uses the backbone's default. Must be ``< C``.
    cache : Path or None
        Folder of cached singular vectors.
    basis_file : str, Path or None
        A ``(C, k)`` ``.npy`` to use instead of computing the basis; ``components``, when
        given, must then equal its ``k``.

    Returns
    -------
    torch.Tensor
        ``(C, k)`` float32 with orthonormal columns, on the backbone's device.
    """
    width = backbone.embed_dim
    if basis_file is not None:
        try:
            basis = np.load(basis_file, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError, EOFError) as err:
            objects = "pickle" in str(err) or "Python objects" in str(err)  # NumPy's words would suggest unpickling
            reason = "not an array np.save wrote, or one of Python objects; insid3 reads arrays only" if objects \
                else str(err)
            raise ValueError(f"{basis_file}: not a readable NumPy .npy array ({reason})") from None
        if not isinstance(basis, np.ndarray) or not np.issubdtype(basis.dtype, np.floating):
            raise ValueError(f"{basis_file}: expected a float array of shape ({width}, k), got {getattr(basis, 'dtype', type(basis).__name__)}")
        if basis.ndim != 2 or basis.shape[0] != width:
            raise ValueError(f"{basis_file}: positional basis of shape {basis.shape}, expected ({width}, k)")
        if not np.isfinite(basis).all():
            raise ValueError(f"{basis_file}: the positional basis holds NaN or infinite values")
        if components is not None and components != basis.shape[1]:
            raise ValueError(f"{basis_file}: holds {basis.shape[1]} components, svd_components={components}")
        components = basis.shape[1]
    k = backbone.default_svd_components() if components is None else components
    if not 0 <= k < width:
        raise ValueError(
            f"svd_components={k} must be smaller than the backbone width C={width} "
            f"(removing {k} of {width} dimensions would wipe out the features); "
            f"default for this backbone: {backbone.default_svd_components()}"
        )
    if basis_file is not None:
        basis = np.array(basis, dtype=np.float32)  # a copy out of the memory map
        departure = np.abs(basis.T.astype(np.float64) @ basis - np.eye(k)).max(initial=0.0)
        if departure > ORTHONORMAL_TOLERANCE:
            raise ValueError(
                f"{basis_file}: the positional basis's columns are not orthonormal (UᵀU departs from the "
                f"identity by {departure:.3g}); save the left singular vectors U of the SVD, not scaled or "
                "mixed directions")
        return torch.from_numpy(basis).to(backbone.device)
    directions = positional_directions(backbone, image_size, cache)
    if k > directions.shape[1]:
        raise ValueError(
            f"svd_components={k} exceeds the {directions.shape[1]} directions of a {image_size}px grid: lower "
            "svd_components (--svd-components) or raise image_size (--image-size)"
        )
    return directions[:, :k].contiguous()


def debias(features: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Project the positional subspace out and re-normalise: ``normalize((I - U Uᵀ) x)``.

    Parameters
    ----------
    features : torch.Tensor
        ``(..., C)`` features.
    basis : torch.Tensor
        ``(C, k)`` orthonormal columns.

    Returns
    -------
    torch.Tensor
        ``(..., C)`` L2-normalised.
    """
    return F.normalize(features - (features @ basis) @ basis.T, dim=-1)

