"""Edge refinement of feature-resolution masks, in plain torch (CPU and GPU, nothing to compile).

The release refines with a dense CRF whose bilateral message passing needs a compiled
permutohedral lattice (a CUDA build). This module uses a colour **guided filter** (He, Sun and
Tang, "Guided Image Filtering", TPAMI 2013) in its fast, subsampled form (He and Sun, "Fast
Guided Filter", 2015) on the bilinearly upsampled soft mask, with the image as the guide:

* inside every ``(2r + 1)²`` window the output is an affine function of the image colour,
  ``q = aᵀ I + b``, fitted to the soft mask by ridge regression (``eps``). A window that sees a
  colour edge puts the mask's transition on that edge; a flat window just smooths the mask. It is
  the local-linear model that the CRF's bilateral kernel approximates, solved in closed form, so
  no iterations and no compiled lattice are needed;
* everything is box filters (separable ``avg_pool2d``), a batched 3x3 solve per low-resolution
  pixel and a bilinear upsampling: O(s²) per image, the whole batch at once, deterministic;
* the coefficients ``a, b`` are fitted ``subsample`` times below the input resolution and
  upsampled, which costs a ``subsample²`` share of the full-resolution fit and changes the
  output little because ``a, b`` vary slowly.

A naive dense CRF in torch would cost O(s⁴) per iteration, or need a downsampled bilateral grid
that brings back the blocky edges this step is meant to remove.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r + 1)²`` window around each pixel, over the part inside the image.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, H, W)`` floating point.

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)``.
    """
    if radius < 1:
        return x
    side = 2 * radius + 1
    x = F.avg_pool2d(x, (side, 1), stride=1, padding=(radius, 0), count_include_pad=False)
    return F.avg_pool2d(x, (1, side), stride=1, padding=(0, radius), count_include_pad=False)


def guided_filter(guide: torch.Tensor, source: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Colour guided filter: coefficients ``(a, b)`` of ``q = aᵀ I + b`` averaged per window.

    The guide's window statistics and its 3x3 systems are computed once for all ``M`` source
    channels (one right-hand side each).

    Parameters
    ----------
    guide : torch.Tensor
        ``(B, 3, H, W)`` float32 image in [0, 1].
    source : torch.Tensor
        ``(B, M, H, W)`` float32 signals to filter (soft masks).
    radius : int
        Window radius in pixels.
    eps : float
        Ridge regulariser on colour variance; larger smooths more, across weak edges too.

    Returns
    -------
    a : torch.Tensor
        ``(B, 3, M, H, W)`` window-averaged colour coefficients.
    b : torch.Tensor
        ``(B, M, H, W)`` window-averaged offsets.
    """
    batch, _, height, width = guide.shape
    channels = source.shape[1]
    mean_guide = box_mean(guide, radius)
    mean_source = box_mean(source, radius)
    correlation = box_mean((guide[:, :, None] * source[:, None]).flatten(1, 2), radius)  # (B, 3M, H, W)
    covariance = correlation.view(batch, 3, channels, height, width) - mean_guide[:, :, None] * mean_source[:, None]
    products = box_mean((guide[:, :, None] * guide[:, None]).flatten(1, 2), radius)  # (B, 9, H, W)
    variance = products - (mean_guide[:, :, None] * mean_guide[:, None]).flatten(1, 2)
    system = variance.permute(0, 2, 3, 1).reshape(batch, height, width, 3, 3)
    system = system + eps * torch.eye(3, dtype=system.dtype, device=system.device)
    a = torch.linalg.solve(system, covariance.permute(0, 3, 4, 1, 2)).permute(0, 3, 4, 1, 2)  # (B, 3, M, H, W)
    b = mean_source - (a * mean_guide[:, :, None]).sum(dim=1)
    return box_mean(a.flatten(1, 2), radius).view(a.shape), box_mean(b, radius)


def refine_masks(
    pixels: torch.Tensor,
    masks: torch.Tensor,
    radius: int | None = None,
    eps: float = 1e-3,
    subsample: int = 4,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Snap feature-resolution masks to the image's edges with a fast colour guided filter.

    Parameters
    ----------
    pixels : torch.Tensor
        ``(B, 3, s, s)`` resized images: uint8 RGB (see
        :func:`insid3_core.features.resized_pixels`) or floating point in [0, 1].
    masks : torch.Tensor
        ``(B, h, w)`` low-resolution masks, or ``(B, K, h, w)`` for ``K`` masks per image (e.g.
        one per class; the image's filter statistics are shared by them): bool, or floating
        point soft masks in [0, 1]; any device (moved to the device of ``pixels``).
    radius : int or None
        Window radius in input pixels; ``None`` takes one patch, ``s // w``, the largest error
        of a feature-resolution edge.
    eps : float
        Ridge regulariser on colour variance (colours in [0, 1]); smaller follows weaker edges.
    subsample : int
        The filter's coefficients are fitted at ``s / subsample`` and upsampled bilinearly; 1
        fits them at full resolution.
    threshold : float
        The filtered soft mask is thresholded at this value.

    Returns
    -------
    torch.Tensor
        ``(B, s, s)`` (or ``(B, K, s, s)``) bool on the device of ``pixels``. An all-False
        (all-True) mask stays so.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3 or masks.ndim not in (3, 4) or masks.shape[0] != pixels.shape[0]:
        raise ValueError(
            f"expected (B, 3, s, s) pixels and (B, h, w) or (B, K, h, w) masks, "
            f"got {tuple(pixels.shape)} and {tuple(masks.shape)}"
        )
    if pixels.dtype != torch.uint8 and not pixels.is_floating_point():
        raise TypeError(f"pixels must be uint8 (0 to 255) or floating point in [0, 1], got {pixels.dtype}")
    largest = float(pixels.amax()) if pixels.is_floating_point() and pixels.numel() else 0.0  # a caller's tensor
    if largest > 1:
        raise ValueError(f"floating-point pixels must lie in [0, 1], got a maximum of {largest:g}: "
                         "divide 0-255 colours by 255, or pass them as uint8")
    if subsample < 1 or eps <= 0:
        raise ValueError(f"subsample must be >= 1 and eps > 0, got {subsample} and {eps}")
    size = tuple(pixels.shape[-2:])
    radius = size[1] // masks.shape[-1] if radius is None else radius
    guide = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    soft = masks.to(device=pixels.device, dtype=torch.float32)
    soft = soft[:, None] if masks.ndim == 3 else soft
    small = (max(1, size[0] // subsample), max(1, size[1] // subsample))
    small_guide = F.interpolate(guide, size=small, mode="bilinear", align_corners=False, antialias=subsample > 1)
    small_source = F.interpolate(soft, size=small, mode="bilinear", align_corners=False)
    a, b = guided_filter(small_guide, small_source, max(1, round(radius / subsample)), eps)
    a = F.interpolate(a.flatten(1, 2), size=size, mode="bilinear", align_corners=False).view(*a.shape[:3], *size)
    b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    refined = ((a * guide[:, :, None]).sum(dim=1) + b) > threshold
    return refined[:, 0] if masks.ndim == 3 else refined
