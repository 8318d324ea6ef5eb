"""Reference prototype and candidate target patches (docs/algorithm.md steps 0, 3 and 4)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def mask_tensor(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """Nearest-neighbour resize of a ``(H, W)`` bool mask to ``(s, s)`` (torch ``nearest``).

    A nonempty mask whose pixels all fall between the sampled ones keeps one pixel, at its
    centroid scaled to ``(s, s)``.
    """
    resized = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(image_size, image_size), mode="nearest")
    square = resized[0, 0] > 0.5
    if mask.any() and not square.any():
        ys, xs = np.nonzero(mask)
        square[int(ys.mean() * image_size / mask.shape[0]), int(xs.mean() * image_size / mask.shape[1])] = True
    return square


def downsample_mask(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Reference masks at feature resolution.

    Bilinear (``align_corners=False``) then ``> 0.5``; where that is empty, nearest then
    ``> 0.5``; where still empty, the single cell holding the mask's centroid.

    Parameters
    ----------
    masks : torch.Tensor
        ``(S, s, s)`` bool, each with at least one pixel set.
    grid : (h, w)

    Returns
    -------
    torch.Tensor
        ``(S, h, w)`` bool.
    """
    floats = masks.float()[:, None]
    low = F.interpolate(floats, size=grid, mode="bilinear", align_corners=False)[:, 0] > 0.5
    nearest = F.interpolate(floats, size=grid, mode="nearest")[:, 0] > 0.5
    empty = ~low.flatten(1).any(dim=1)
    low[empty] = nearest[empty]
    for index in torch.nonzero(~low.flatten(1).any(dim=1)).flatten().tolist():
        ys, xs = torch.nonzero(masks[index], as_tuple=True)
        stride_y, stride_x = masks.shape[1] // grid[0], masks.shape[2] // grid[1]
        low[index, int(ys.double().mean()) // stride_y, int(xs.double().mean()) // stride_x] = True
    return low


def reference_prototype(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean debiased feature inside each reference mask, averaged over references.

    Parameters
    ----------
    features : torch.Tensor
        ``(S, N, C)`` debiased reference features.
    masks : torch.Tensor
        ``(S, N)`` bool feature-resolution masks; references with an empty mask are skipped.

    Returns
    -------
    torch.Tensor
        ``(C,)`` L2-normalised prototype ``p``.
    """
    weights = masks.to(features.dtype)
    counts = weights.sum(dim=1)
    sums = torch.einsum("sn,snc->sc", weights, features)
    used = counts > 0
    per_reference = sums[used] / counts[used, None]
    return F.normalize(per_reference.mean(dim=0), dim=0)


def forward_candidates(similarity: torch.Tensor) -> torch.Tensor:
    """Target patches positively similar to the prototype.

    Parameters
    ----------
    similarity : torch.Tensor
        ``(B, N)`` debiased cosine similarity of each target patch to ``p``.

    Returns
    -------
    torch.Tensor
        ``(B, N)`` bool: ``similarity > 0``, or above the 0.9 quantile for a target where
        no patch is positive.
    """
    positive = similarity > 0
    quantile = torch.quantile(similarity, 0.9, dim=1, keepdim=True)
    return torch.where(positive.any(dim=1, keepdim=True), positive, similarity > quantile)


def backward_match(
    target: torch.Tensor,
    references: torch.Tensor,
    reference_masks: torch.Tensor,
    negatives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward candidates and, from the same similarities, the patches negatives leave alone.

    Parameters
    ----------
    target : torch.Tensor
        ``(B, N, C)`` debiased target features.
    references : torch.Tensor
        ``(S, M, C)`` debiased reference features.
    reference_masks : torch.Tensor
        ``(S, M)`` bool feature-resolution reference masks (the positive regions).
    negatives : torch.Tensor or None
        ``(R, C)`` debiased features of the patches inside negative masks.

    Returns
    -------
    candidates : torch.Tensor
        ``(B, N)`` bool: at least ``ceil(S / 2)`` references vote for the patch (its nearest
        reference patch lies in the reference mask).
    allowed : torch.Tensor
        ``(B, N)`` bool: False where the best similarity to a negative patch exceeds the best
        similarity to a positive reference patch; all True without negatives.
    """
    votes = torch.zeros(target.shape[:2], dtype=torch.int32, device=target.device)
    positive = torch.full(target.shape[:2], -torch.inf, dtype=target.dtype, device=target.device)
    for features, mask in zip(references, reference_masks):
        similarity = target @ features.T
        votes += mask[torch.argmax(similarity, dim=-1)]
        if negatives is not None:
            positive = torch.maximum(positive, similarity.masked_fill_(~mask, -torch.inf).amax(dim=-1))
    candidates = votes >= math.ceil(len(references) / 2)
    if negatives is None:
        return candidates, torch.ones_like(candidates)
    return candidates, ~((target @ negatives.T).amax(dim=-1) > positive)
