"""Steps 2-6 of ``docs/algorithm.md`` for a batch of targets and several classes, as one function.

:func:`lowres_masks` takes patch features, encoded references, the positional basis and the
configuration, and returns :class:`LowResMasks`: everything step 7 needs, on the host. It holds no
state and starts no thread; :class:`~insid3_core.engine.Segmenter` calls it from its device
threads, and a caller holding features can call it directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .aggregation import cluster_scores
from .clustering import cluster_patches
from .config import EngineConfig
from .debias import debias
from .matching import backward_match, forward_candidates
from .refine import refine_masks
from .results import ReferenceSet
from .timing import StageTimer


@dataclass(frozen=True)
class TargetMasks:
    """One target's share of :class:`LowResMasks` (``K`` classes)."""

    masks: np.ndarray
    confidence: np.ndarray
    similarity: np.ndarray
    clusters: np.ndarray
    refined: np.ndarray | None


@dataclass(frozen=True)
class LowResMasks:
    """Steps 2-6 of ``B`` targets for ``K`` classes, on the host.

    Attributes
    ----------
    masks : np.ndarray
        ``(K, B, h, w)`` bool; a patch belongs to one class at most.
    confidence : np.ndarray
        ``(K, B)`` float32: each mask's mean debiased similarity to its class's prototype, in [0, 1].
    similarity : np.ndarray
        ``(K, B, h, w)`` float32 debiased similarity of each patch to each class's prototype.
    clusters : np.ndarray
        ``(B, h, w)`` int32 cluster labels, -1 for a target that was not clustered (no candidate).
    refined : np.ndarray or None
        ``(K, B, s, s)`` bool guided-filter masks at input resolution, disjoint across classes,
        when the configuration asks for the ``guided`` refinement.
    """

    masks: np.ndarray
    confidence: np.ndarray
    similarity: np.ndarray
    clusters: np.ndarray
    refined: np.ndarray | None

    def per_target(self) -> Iterator[TargetMasks]:
        """The batch split target by target."""
        for index in range(self.clusters.shape[0]):
            yield TargetMasks(self.masks[:, index], self.confidence[:, index], self.similarity[:, index],
                              self.clusters[index], None if self.refined is None else self.refined[:, index])


def lowres_masks(
    classes: Sequence[ReferenceSet],
    features: torch.Tensor,
    basis: torch.Tensor,
    config: EngineConfig,
    pixels: torch.Tensor | None = None,
    timer: StageTimer | None = None,
) -> LowResMasks:
    """Steps 2-6 (and the guided refinement) for ``B`` targets and ``K`` classes sharing features and clustering.

    Parameters
    ----------
    classes : sequence of ReferenceSet
        The ``K`` classes' encoded references.
    features : torch.Tensor
        ``(B, N, C)`` L2-normalised original patch features of the targets.
    basis : torch.Tensor
        ``(C, k)`` positional basis (see :func:`insid3_core.debias.positional_basis`).
    config : EngineConfig
        ``tau``, ``merge_threshold``, ``clustering``, ``refinement`` and ``image_size``.
    pixels : torch.Tensor or None
        ``(B, 3, s, s)`` uint8 images the features came from; needed by the guided refinement.
    timer : StageTimer or None
        Times the ``matching``, ``clustering``, ``aggregation`` and ``refinement`` stages.

    Returns
    -------
    LowResMasks
    """
    stage = timer.stage if timer is not None else lambda name: contextlib.nullcontext()
    side = int(round(features.shape[1] ** 0.5))  # the square h = w grid
    with stage("matching"):
        debiased = debias(features, basis)
        prototypes = torch.stack([references.prototype for references in classes])
        similarity = torch.einsum("bnc,kc->kbn", debiased, prototypes)
        backward, allowed = map(
            torch.stack, zip(*(backward_match(debiased, r.features, r.masks, r.negatives) for r in classes))
        )
        candidates = allowed & backward & torch.stack([forward_candidates(sim) for sim in similarity])
        has_candidates = candidates.any(dim=2)
        matched = torch.nonzero(has_candidates.any(dim=0).cpu()).flatten().tolist()
    lowres = torch.zeros(candidates.shape, dtype=torch.bool, device=features.device)
    clusters = torch.full(features.shape[:2], -1, dtype=torch.int64, device=features.device)
    if matched:
        with stage("clustering"):
            labels = cluster_patches(features[matched], config.tau, config.clustering)
        with stage("aggregation"):
            scores = cluster_scores(
                labels, candidates[:, matched], features[matched], debiased[matched], similarity[:, matched], prototypes
            )
            chosen = scores.gather(2, labels.expand(len(classes), -1, -1)) > config.merge_threshold
            lowres[:, matched] = chosen & has_candidates[:, matched, None]
            clusters[matched] = labels
    lowres &= allowed
    if len(classes) > 1:
        winner = torch.where(lowres, similarity, -torch.inf).argmax(dim=0)
        lowres &= torch.arange(len(classes), device=lowres.device)[:, None, None] == winner
    selected = lowres.float()
    confidence = ((similarity * selected).sum(dim=2) / selected.sum(dim=2).clamp(min=1.0)).clamp(0.0, 1.0)
    grid = (len(classes), -1, side, side)
    refined = None
    if config.refinement == "guided":
        with stage("refinement"):
            refined = guided_masks(lowres.view(grid), similarity.view(grid), pixels).cpu().numpy()
    return LowResMasks(
        lowres.view(grid).cpu().numpy(),
        confidence.float().cpu().numpy(),
        similarity.view(grid).float().cpu().numpy(),
        clusters.view(-1, side, side).to(torch.int32).cpu().numpy(),
        refined,
    )


def guided_masks(lowres: torch.Tensor, similarity: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
    """Guided-filter masks ``(K, B, s, s)`` bool of ``(K, B, h, w)`` masks; a pixel claimed by
    several classes goes to the class with the highest bilinearly upsampled similarity."""
    if pixels is None:
        raise ValueError("the guided refinement needs the target pixels (pass pixels=...)")
    classes = lowres.shape[0]
    pixels = pixels.to(lowres.device, non_blocking=True)
    square = refine_masks(pixels, lowres.transpose(0, 1)).transpose(0, 1)
    if classes > 1:
        upsampled = F.interpolate(
            similarity.float().flatten(0, 1)[:, None], size=square.shape[-2:], mode="bilinear", align_corners=False
        ).view(square.shape)
        winner = torch.where(square, upsampled, -torch.inf).argmax(dim=0)
        square &= torch.arange(classes, device=square.device)[:, None, None, None] == winner
    return square
