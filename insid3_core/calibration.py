"""Calibration from the user's own references: leave-one-out episodes over a grid of settings,
and a check of each reference.

With two or more references each reference image is a target for the others: segmented from
the references on the other images, its own mask is the truth. The mean IoU of these episodes
scores a setting; the best of a grid of ``tau``, ``merge_threshold`` and ``svd_components`` (and
``refinement`` when asked) is the calibrated one. The work is shared where the algorithm allows
(``docs/algorithm.md``): each reference image passes the backbone once for the whole grid; the
positional directions are computed once (a basis of ``k`` components is their first ``k``); an
episode's candidates are matched once per basis and its target clustered once per ``tau`` (the
clustering reads the original features); only the selection (aggregation and merge threshold)
runs per grid point. An episode equals ``insid3 segment TARGET --ref <the other references>
--tau ... --merge-threshold ... --svd-components ...`` scored against the target's mask.

Written here because no library tunes in-context segmentation: a grid search over estimators
(scikit-learn's) fits models, while here the "fit" is the engine's own shared steps.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .clustering import cluster_patches
from .config import cache_dir
from .debias import positional_basis
from .encoder import Encoder, load_references, reference_names
from .engine import Segmenter
from .io import ImageLike, InputError, MaskLike
from .metrics import mask_iou
from .pipeline import Matches, match_targets, select_masks
from .settings import EngineSettings, SettingsError, describe, parse
from .upsample import full_resolution

GRID_OPTIONS = ("tau", "merge_threshold", "svd_components", "refinement")
"""The options a calibration grid may vary, in the order of its rows."""
DEFAULT_TAUS = (0.5, 0.6, 0.7, 0.8)
DEFAULT_MERGE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4)
SVD_FACTORS = (0.5, 1.0, 1.5)
"""Default grid of ``svd_components``: these multiples of the run's own value."""
DUPLICATE_DIFFERENCE = 2.0
"""Mean absolute difference (0-255) of two 64x64 thumbnails below which images are duplicates."""
DISAGREEMENT_RATIO, DISAGREEMENT_GAP = 0.5, 0.25
"""A reference disagrees when its IoU is below this fraction of the others' median and this far under it."""


@dataclass(frozen=True)
class ReferenceCheck:
    """One reference pair as the calibration saw it.

    Attributes
    ----------
    image, mask, category : str
    iou_default, iou_best : float or None
        Its leave-one-out IoU with the run's settings and with the chosen ones; ``None`` when it
        could not be a target (the only reference image of its class).
    flag : str or None
        Why to look at it (near-empty mask, duplicate image, disagreement with the others, not
        scored); ``None`` when nothing stands out.
    """

    image: str
    mask: str
    category: str
    iou_default: float | None
    iou_best: float | None
    flag: str | None


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`calibrate`.

    Attributes
    ----------
    settings : dict
        The chosen settings: ``image_size`` and every grid option (apply them with
        ``insid3 segment --settings``).
    defaults : dict
        The run's own values of the same options.
    default_score, best_score : float
        Mean leave-one-out IoU with ``defaults`` and with ``settings``.
    grid : tuple of (dict, float)
        Every grid point's settings and score, in grid order.
    references : tuple of ReferenceCheck
    engine : dict
        Backbone, weights and input size the calibration ran with.
    """

    settings: dict
    defaults: dict
    default_score: float
    best_score: float
    grid: tuple[tuple[dict, float], ...]
    references: tuple[ReferenceCheck, ...]
    engine: dict

    def document(self) -> dict:
        """The JSON document ``calibration.json`` holds."""
        return {
            "settings": self.settings,
            "defaults": self.defaults,
            "default_score": self.default_score,
            "best_score": self.best_score,
            "grid": [{"settings": settings, "score": score} for settings, score in self.grid],
            "references": [
                {"image": r.image, "mask": r.mask, "class": r.category, "iou_default": r.iou_default,
                 "iou_best": r.iou_best, "flag": r.flag} for r in self.references
            ],
            "engine": self.engine,
        }


@dataclass(frozen=True)
class _Episode:
    """One reference image as a target: its row in the loaded references, the classes it is
    segmented with (each with its reference rows) and the classes scored on it (their truth rows)."""

    target: int
    classes: tuple[tuple[str, tuple[int, ...]], ...]
    scored: tuple[tuple[str, tuple[int, ...]], ...]


def grid_option(spec: str) -> tuple[str, tuple]:
    """``NAME=V1,V2,...`` (e.g. ``tau=0.5,0.6``) as ``(name, values)``; a :class:`SettingsError`
    naming the problem."""
    name, separator, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not separator or name not in GRID_OPTIONS:
        raise SettingsError(f"--grid {spec!r}: expected NAME=V1,V2,... with NAME one of {', '.join(GRID_OPTIONS)}")
    if not values.strip():
        raise SettingsError(f"--grid {spec!r}: no value given")
    if any(not value.strip() for value in values.split(",")):
        raise SettingsError(f"--grid {spec!r}: an empty value between commas; expected NAME=V1,V2,...")
    parsed = tuple(dict.fromkeys(parse(name, value.strip(), f"--grid {name}") for value in values.split(",")))
    _check_values(name, parsed)
    return name, parsed


def _check_values(name: str, values) -> None:
    """A :class:`SettingsError` for the first of ``values`` option ``name`` refuses."""
    for value in values:
        try:
            EngineSettings(**{name: value})
        except SettingsError as err:  # named as the grid's value, not as the option's flag
            raise SettingsError(f"--grid {name}: {str(err).replace(describe(name), name)}") from None


def default_grid(settings: EngineSettings, components: int, width: int, grid_patches: int) -> dict[str, tuple]:
    """The grid searched when none is given: :data:`DEFAULT_TAUS`, :data:`DEFAULT_MERGE_THRESHOLDS`
    and :data:`SVD_FACTORS` times ``components`` (kept below the backbone ``width`` and the
    ``grid_patches`` directions a grid holds; the run's single value with a ``basis`` file)."""
    if settings.basis is not None:
        svd = (components,)
    else:
        svd = tuple(sorted({min(round(components * factor), width - 1, grid_patches) for factor in SVD_FACTORS}))
    return {"tau": DEFAULT_TAUS, "merge_threshold": DEFAULT_MERGE_THRESHOLDS, "svd_components": svd}


def calibrate(
    settings: EngineSettings,
    classes: Mapping[str, Sequence[tuple[ImageLike, MaskLike]]],
    negatives: Sequence[tuple[ImageLike, MaskLike]] = (),
    grid: Mapping[str, Sequence] | None = None,
    mask_names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    segmenter: Segmenter | None = None,
) -> Calibration:
    """Score every point of ``grid`` by leave-one-out episodes on the references; check each reference.

    Parameters
    ----------
    settings : EngineSettings
        The run's settings: the backbone, the input size, and the values of the options the grid
        does not vary (each grid axis also holds the run's own value, the default point).
    classes : mapping of str to sequence of (image, mask)
        References by class, as :meth:`~insid3_core.engine.Segmenter.encode` takes them; at least
        one class needs references on two images.
    negatives : sequence of (image, mask)
        Negative references, part of every episode.
    grid : mapping of str to sequence, optional
        Values per option of :data:`GRID_OPTIONS`, replacing the :func:`default_grid` ones of
        those options (give one value to hold an option fixed).
    mask_names : sequence of str, optional
        How to name each class pair's mask in the result, in the order of ``classes`` (default:
        the mask's path, or ``array``).
    progress : callable, optional
        Called with ``(done, total)`` episodes (each episode once per ``svd_components`` value).
    segmenter : Segmenter, optional
        ``settings.build()``, when the caller holds it already.

    Returns
    -------
    Calibration
    """
    episodes = calibration_episodes(classes)
    segmenter = settings.build() if segmenter is None else segmenter
    encoder = segmenter.encoder
    entries = [(name, image, mask) for name, pairs in classes.items() for image, mask in pairs]
    loaded = load_references([(image, mask) for _, image, mask in entries] + list(negatives), settings.image_size)
    features = encoder.reference_features(loaded, settings.batch_size)
    width, patches = segmenter.backbone.embed_dim, encoder.grid[0] * encoder.grid[1]
    defaults = {"tau": settings.tau, "merge_threshold": settings.merge_threshold,
                "svd_components": int(encoder.basis.shape[1]), "refinement": settings.refinement}
    axes = _axes({**default_grid(settings, defaults["svd_components"], width, patches), **(grid or {})},
                 defaults, settings)
    negative_rows = list(range(len(entries), len(loaded.names)))
    negative_parts = (features[negative_rows], loaded.masks[negative_rows]) if negatives else None

    truths = [{name: np.logical_or.reduce([loaded.truths[row] for row in rows]) for name, rows in episode.scored}
              for episode in episodes]  # each scored class's full-resolution truth, once for the whole grid
    targets = features[[episode.target for episode in episodes]]
    labels = {tau: cluster_patches(targets, tau, settings.clustering) for tau in axes["tau"]}  # (E, N) each
    points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    ious: dict[tuple, dict[tuple[str, int], float]] = {tuple(point.values()): {} for point in points}
    steps, done = len(axes["svd_components"]) * len(episodes), 0
    for components in axes["svd_components"]:
        basis = encoder.basis if components == defaults["svd_components"] else positional_basis(
            segmenter.backbone, settings.image_size, components, cache_dir())
        episode_encoder = Encoder(encoder.backbone, basis, encoder.image_size)
        for index, episode in enumerate(episodes):  # one episode's matches at a time: they are large
            references = [episode_encoder.reference_set(features[list(rows)], loaded.masks[list(rows)],
                                                        [loaded.names[row] for row in rows], negative_parts)
                          for _, rows in episode.classes]
            matches = match_targets(references, features[episode.target][None], basis)
            for point in points:
                if point["svd_components"] == components:
                    _score_episode(ious[tuple(point.values())], episode, truths[index], matches,
                                   labels[point["tau"]][index], point, features, loaded.pixels, settings.image_size)
            done += 1
            if progress is not None:
                progress(done, steps)
    scored = [(point, float(np.mean(list(ious[tuple(point.values())].values()))), ious[tuple(point.values())])
              for point in points]

    default_point = {name: defaults[name] for name in axes}
    default_score, default_ious = next((score, ious) for point, score, ious in scored if point == default_point)
    # the best score; among equal ones the point changing the fewest options (the run's own first)
    best_point, best_score, best_ious = max(
        scored, key=lambda item: (item[1], -sum(item[0][name] != default_point[name] for name in item[0])))
    names = list(mask_names) if mask_names is not None else [
        str(mask) if not isinstance(mask, np.ndarray) else "array" for _, _, mask in entries]
    references = _checks(entries, names, loaded, default_ious, best_ious, settings.min_area_ratio)
    return Calibration(
        settings={"image_size": settings.image_size, **best_point},
        defaults={"image_size": settings.image_size, **default_point},
        default_score=default_score,
        best_score=best_score,
        grid=tuple((point, score) for point, score, _ in scored),
        references=references,
        engine={"backbone": segmenter.backbone.name, "weights": segmenter.backbone.identity,
                "smoke_test": segmenter.backbone.is_smoke_test, "image_size": settings.image_size,
                "device": str(segmenter.backbone.device)},
    )


def _score_episode(ious: dict, episode: _Episode, truths: dict[str, np.ndarray], matches: Matches,
                   labels: torch.Tensor, point: dict, features: torch.Tensor, pixels: torch.Tensor,
                   image_size: int) -> None:
    """Select one episode's masks at ``point`` and put the IoU of each scored class against its
    ``truths`` mask in ``ious`` (keyed ``(class, target row)``); ``labels``: the target's ``(N,)``
    clusters at the point's tau; ``pixels``: the loaded references' ``(S, 3, s, s)`` images."""
    target = episode.target
    lowres = select_masks(matches, features[target][None], labels[None] if matches.matched else None,
                          point["merge_threshold"], point["refinement"], pixels[target][None])
    positions = {name: position for position, (name, _) in enumerate(episode.classes)}
    for name, truth in truths.items():
        position = positions[name]
        refined = None if lowres.refined is None else lowres.refined[position, 0]
        mask = full_resolution(lowres.masks[position, 0], refined, image_size, truth.shape)
        ious[(name, target)] = mask_iou(mask, truth)


def _axes(grid: Mapping[str, Sequence], defaults: dict, settings: EngineSettings) -> dict[str, tuple]:
    """Each grid option's values with the run's own value among them (every option, in
    :data:`GRID_OPTIONS` order; the ones not in ``grid`` hold the run's value only)."""
    unknown = set(grid) - set(GRID_OPTIONS)
    if unknown:
        raise SettingsError(f"calibration grid: unknown option(s) {', '.join(sorted(unknown))}; "
                            f"one of {', '.join(GRID_OPTIONS)}")
    if settings.basis is not None and set(grid.get("svd_components", ())) - {defaults["svd_components"]}:
        raise SettingsError("calibration grid: svd_components cannot vary with a --basis file (INSID3_BASIS)")
    axes = {}
    for name in GRID_OPTIONS:
        values = list(dict.fromkeys(grid.get(name, ())))
        _check_values(name, values)
        if defaults[name] not in values:
            values.append(defaults[name])
        axes[name] = tuple(sorted(values)) if name != "refinement" else tuple(values)
    return axes


def calibration_episodes(classes: Mapping[str, Sequence[tuple[ImageLike, MaskLike]]]) -> list[_Episode]:
    """The leave-one-out episodes of ``classes`` (as :func:`calibrate` takes them), from the
    images' names alone: the check a front end runs before the backbone loads. Raises
    :class:`InputError` when there is none (no class has references on two images)."""
    entries = [(name, image) for name, pairs in classes.items() for image, _ in pairs]
    episodes = _episodes([name for name, _ in entries], reference_names([image for _, image in entries]))
    if not episodes:
        raise InputError("calibration needs a class with references on at least two images (each is a "
                         "target for the others)")
    return episodes


def _episodes(categories: Sequence[str], images: Sequence[str]) -> list[_Episode]:
    """One episode per reference image with a class scored on it: a class with references on
    other images is segmented (from those), and scored where it also has one on this image."""
    episodes = []
    for image in dict.fromkeys(images):
        target = images.index(image)
        segmented, scored = [], []
        for name in dict.fromkeys(categories):
            rows = [row for row, category in enumerate(categories) if category == name]
            others = tuple(row for row in rows if images[row] != image)
            own = tuple(row for row in rows if images[row] == image)
            if others:
                segmented.append((name, others))
                if own:
                    scored.append((name, own))
        if scored:
            episodes.append(_Episode(target, tuple(segmented), tuple(scored)))
    return episodes


def _checks(entries, mask_names, loaded, default_ious, best_ious, min_area_ratio) -> tuple[ReferenceCheck, ...]:
    """Each class pair's IoUs and flag: near-empty mask, duplicate image of the same class,
    disagreement with the class's other references, or not scored."""
    thumbnails = F.interpolate(loaded.pixels.float(), size=(64, 64), mode="area")
    first_row = {name: loaded.names.index(name) for name in loaded.names}
    checks = []
    for row, (category, _, _) in enumerate(entries):
        image = loaded.names[row]
        key = (category, first_row[image])
        flags = []
        covered = float(loaded.truths[row].mean())
        if covered < min_area_ratio:
            flags.append(f"near-empty mask: covers {100 * covered:.2g} % of its image")
        for other, (other_category, _, _) in enumerate(entries):
            other_image = loaded.names[other]
            if other_category == category and other_image != image and first_row[other_image] == other and \
                    float((thumbnails[row] - thumbnails[other]).abs().mean()) < DUPLICATE_DIFFERENCE:
                flags.append(f"duplicate of {other_image}: its leave-one-out score is inflated")
        if key not in best_ious:
            flags.append(f"not scored: the only reference image of class {category!r}")
        else:
            others = [iou for (name, target), iou in best_ious.items() if (name, target) != key]
            if len(others) >= 2:
                median = statistics.median(others)
                if best_ious[key] < DISAGREEMENT_RATIO * median and median - best_ious[key] >= DISAGREEMENT_GAP:
                    flags.append(f"disagrees with the other references (leave-one-out IoU {best_ious[key]:.2f}, "
                                 f"theirs {median:.2f}): check its mask")
        checks.append(ReferenceCheck(image, mask_names[row], category, default_ious.get(key), best_ious.get(key),
                                     "; ".join(flags) or None))
    return tuple(checks)
