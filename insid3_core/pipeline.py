"""Steps 2-6 of ``docs/algorithm.md`` for a batch of targets and several classes.

:func:`lowres_masks` takes patch features, encoded references, the positional basis and the
configuration, and returns :class:`LowResMasks`: everything step 7 needs, on the host. It holds no
state and starts no thread; :class:`~insid3_core.engine.Segmenter` calls it from its device
threads, and a caller holding features can call it directly. It chains :func:`match_targets`
(which depends on the positional basis), the clustering (on tau) and :func:`select_masks` (on the
merge threshold); the calibration calls the three itself, so settings sharing a step share its work.
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


@dataclass(frozen=True)
class Matches:
    """Steps 2-4 of ``B`` targets for ``K`` classes, on the device: what selecting masks needs
    besides the clustering.

    Attributes
    ----------
    debiased : torch.Tensor
        ``(B, N, C)`` debiased target features.
    prototypes : torch.Tensor
        ``(K, C)`` the classes' prototypes.
    similarity : torch.Tensor
        ``(K, B, N)`` debiased similarity of each patch to each prototype.
    candidates : torch.Tensor
        ``(K, B, N)`` bool forward and backward candidates.
    allowed : torch.Tensor
        ``(K, B, N)`` bool patches no negative reference claims.
    matched : list of int
        The targets with a candidate of some class: the ones to cluster.
    """

    debiased: torch.Tensor
    prototypes: torch.Tensor
    similarity: torch.Tensor
    candidates: torch.Tensor
    allowed: torch.Tensor
    matched: list[int]


def match_targets(classes: Sequence[ReferenceSet], features: torch.Tensor, basis: torch.Tensor) -> Matches:
    """Steps 2-4 for ``B`` targets: debias, prototype similarity, forward and backward candidates.

    Parameters
    ----------
    classes : sequence of ReferenceSet
        The ``K`` classes' encoded references.
    features : torch.Tensor
        ``(B, N, C)`` L2-normalised original patch features of the targets.
    basis : torch.Tensor
        ``(C, k)`` positional basis (see :func:`insid3_core.debias.positional_basis`).
    """
    debiased = debias(features, basis)
    prototypes = torch.stack([references.prototype for references in classes])
    similarity = torch.einsum("bnc,kc->kbn", debiased, prototypes)
    backward, allowed = map(
        torch.stack, zip(*(backward_match(debiased, r.features, r.masks, r.negatives) for r in classes))
    )
    candidates = allowed & backward & torch.stack([forward_candidates(sim) for sim in similarity])
    matched = torch.nonzero(candidates.any(dim=2).any(dim=0).cpu()).flatten().tolist()
    return Matches(debiased, prototypes, similarity, candidates, allowed, matched)


def select_masks(
    matches: Matches,
    features: torch.Tensor,
    labels: torch.Tensor | None,
    merge_threshold: float,
    refinement: str = "bilinear",
    pixels: torch.Tensor | None = None,
    timer: StageTimer | None = None,
) -> LowResMasks:
    """Steps 5-6 (and the guided refinement): the clusters scoring above ``merge_threshold``,
    each patch to one class at most.

    Parameters
    ----------
    matches : Matches
    features : torch.Tensor
        ``(B, N, C)`` original features the matches came from.
    labels : torch.Tensor or None
        ``(M, N)`` int64 cluster labels of the ``M`` targets of ``matches.matched`` (``None``
        when none is).
    merge_threshold : float
    refinement : {"bilinear", "guided"}
    pixels : torch.Tensor or None
        ``(B, 3, s, s)`` uint8 images; needed by the guided refinement.
    timer : StageTimer or None
        Times the ``aggregation`` and ``refinement`` stages.
    """
    stage = timer.stage if timer is not None else lambda name: contextlib.nullcontext()
    matched, similarity, candidates = matches.matched, matches.similarity, matches.candidates
    classes, side = similarity.shape[0], int(round(features.shape[1] ** 0.5))  # the square h = w grid
    has_candidates = candidates.any(dim=2)
    lowres = torch.zeros(candidates.shape, dtype=torch.bool, device=features.device)
    clusters = torch.full(features.shape[:2], -1, dtype=torch.int64, device=features.device)
    if matched:
        with stage("aggregation"):
            scores = cluster_scores(labels, candidates[:, matched], features[matched], matches.debiased[matched],
                                    similarity[:, matched], matches.prototypes)
            chosen = scores.gather(2, labels.expand(classes, -1, -1)) > merge_threshold
            lowres[:, matched] = chosen & has_candidates[:, matched, None]
            clusters[matched] = labels
    lowres &= matches.allowed
    if classes > 1:
        winner = torch.where(lowres, similarity, -torch.inf).argmax(dim=0)
        lowres &= torch.arange(classes, device=lowres.device)[:, None, None] == winner
    selected = lowres.float()
    confidence = ((similarity * selected).sum(dim=2) / selected.sum(dim=2).clamp(min=1.0)).clamp(0.0, 1.0)
    grid = (classes, -1, side, side)
    refined = None
    if refinement == "guided":
        with stage("refinement"):
            refined = guided_masks(lowres.view(grid), similarity.view(grid), pixels).cpu().numpy()
    return LowResMasks(
        lowres.view(grid).cpu().numpy(),
        confidence.float().cpu().numpy(),
        similarity.view(grid).float().cpu().numpy(),
        clusters.view(-1, side, side).to(torch.int32).cpu().numpy(),
        refined,
    )


def lowres_masks(
    classes: Sequence[ReferenceSet],
    features: torch.Tensor,
    basis: torch.Tensor,
    config: EngineConfig,
    pixels: torch.Tensor | None = None,
    timer: StageTimer | None = None,
) -> LowResMasks:
    """Steps 2-6 (and the guided refinement) for ``B`` targets and ``K`` classes sharing features
    and clustering: :func:`match_targets`, the clustering of the matched targets, :func:`select_masks`.

    Parameters
    ----------
    classes, features, basis
        As for :func:`match_targets`.
    config : EngineConfig
        ``tau``, ``merge_threshold``, ``clustering``, ``refinement`` and ``image_size``.
    pixels : torch.Tensor or None
        ``(B, 3, s, s)`` uint8 images the features came from; needed by the guided refinement.
    timer : StageTimer or None
        Times the ``matching``, ``clustering``, ``aggregation`` and ``refinement`` stages.
    """
    stage = timer.stage if timer is not None else lambda name: contextlib.nullcontext()
    with stage("matching"):
        matches = match_targets(classes, features, basis)
    labels = None
    if matches.matched:
        with stage("clustering"):
            labels = cluster_patches(features[matches.matched], config.tau, config.clustering)
    return select_masks(matches, features, labels, config.merge_threshold, config.refinement, pixels, timer)


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
