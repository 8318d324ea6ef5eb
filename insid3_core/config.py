"""Hyper-parameters of the pipeline and the environment variables that set defaults."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "INSID3_"
BATCH_SIZE = 4  # targets per backbone call, the default of the API and of every front end
SMOKE_TEST_NOTE = "random-weight TEST checkpoint: smoke-test masks, not DINOv3 quality"
CLUSTERING_METHODS = ("auto", "scipy", "torch", "triton")
REFINEMENTS = ("bilinear", "guided")


@dataclass(frozen=True)
class EngineConfig:
    """Hyper-parameters of the INSID3 pipeline (see ``docs/algorithm.md``).

    Parameters
    ----------
    image_size : int
        Side ``s`` of the square input; must be a multiple of the patch size (16).
    svd_components : int or None
        Number ``k`` of positional directions projected out. ``None`` picks the
        backbone's default (:func:`insid3_core.backbone.default_svd_components`).
    tau : float
        Clustering similarity; clusters merge while their average cosine distance
        is strictly below ``1 - tau``.
    merge_threshold : float
        Clusters whose aggregation score exceeds it form the mask.
    clustering : {"auto", "scipy", "torch"}
        Implementation of the (identical) clustering: ``auto`` uses torch on an accelerator
        and scipy on the CPU.
    refinement : {"bilinear", "guided"}
        Step 7: ``bilinear`` upsampling of the feature-resolution mask (the release's
        default), or ``guided``: a colour guided filter of that mask with the resized image
        as guide (:func:`insid3_core.refine.refine_masks`), snapping edges to the image.
    """

    image_size: int = 1024
    svd_components: int | None = None
    tau: float = 0.6
    merge_threshold: float = 0.2
    clustering: str = "auto"
    refinement: str = "bilinear"

    def __post_init__(self) -> None:
        check_integer("image_size", self.image_size)
        if self.svd_components is not None:
            check_integer("svd_components", self.svd_components)
        check_number("tau", self.tau)
        check_number("merge_threshold", self.merge_threshold)
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if self.svd_components is not None and self.svd_components < 0:
            raise ValueError(f"svd_components must be >= 0, got {self.svd_components}")
        if not -1.0 < self.tau < 1.0:
            raise ValueError(f"tau must lie in (-1, 1), got {self.tau}")
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ValueError(f"merge_threshold must lie in [-1, 1] (cluster scores lie in [-1, 1]), "
                             f"got {self.merge_threshold}")
        if self.clustering not in CLUSTERING_METHODS:
            raise ValueError(f"clustering must be one of {CLUSTERING_METHODS}, got {self.clustering!r}")
        if self.refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {REFINEMENTS}, got {self.refinement!r}")


def check_integer(name: str, value) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is an integer (NumPy's too; not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")


def is_finite_number(value) -> bool:
    """Whether ``value`` is a real number (not a bool) that a float holds finitely (an integer of
    400 digits is not: ``math.isfinite`` raises ``OverflowError`` on it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_number(name: str, value) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is a real number, ``ValueError`` unless finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not is_finite_number(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def number(text: str) -> float:
    """A finite float from ``text`` (``nan`` and ``inf`` raise ``ValueError``): the type of every
    float option and ``INSID3_*`` variable, so argparse and :func:`env_setting` say "not a valid number"."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def env_setting(name: str, default=None, cast=str):
    """Read ``INSID3_<NAME>`` from the environment.

    Parameters
    ----------
    name : str
        Setting name as on the command line, e.g. ``"image-size"`` or ``"image_size"``.
    default : object
        Returned when the variable is unset or empty.
    cast : callable
        Converts the string value; a failure raises ``ValueError`` naming the variable.
    """
    key = ENV_PREFIX + name.upper().replace("-", "_")
    raw = os.environ.get(key, "")
    if raw == "":
        return default
    try:
        return cast(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {key}={raw!r} is not a valid {cast.__name__}") from err


def cache_dir() -> Path:
    """Folder for cached positional bases: ``$INSID3_CACHE_DIR`` or ``~/.cache/insid3``."""
    configured = env_setting("cache_dir")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "insid3"


def clustering_bytes(image_size: int, patch_size: int = 16) -> int:
    """Memory one target's clustering needs at ``image_size``: its ``N x N`` patch distances
    (``N = (image_size / patch_size)^2``) twice over in float32 (scipy's condensed float64
    matrix is the same size)."""
    patches = (image_size // patch_size) ** 2
    return 8 * patches * patches

