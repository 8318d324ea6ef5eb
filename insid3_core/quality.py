"""Quality verdicts on predicted masks, for curators reviewing failure categories."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .config import check_integer, check_number

VERDICTS = ("ok", "too_small", "too_large", "fragmented", "empty")


@dataclass(frozen=True)
class QualityThresholds:
    """Limits behind the verdicts.

    Parameters
    ----------
    min_area_ratio : float
        A mask covering less than this fraction of the image is ``too_small``.
    max_area_ratio : float
        A mask covering more than this fraction is ``too_large``.
    max_components : int
        A mask with more connected regions (8-connectivity) is ``fragmented``.
    """

    min_area_ratio: float = 0.001
    max_area_ratio: float = 0.9
    max_components: int = 4

    def __post_init__(self) -> None:
        check_number("min_area_ratio", self.min_area_ratio)
        check_number("max_area_ratio", self.max_area_ratio)
        check_integer("max_components", self.max_components)
        if not 0.0 <= self.min_area_ratio <= self.max_area_ratio <= 1.0:
            raise ValueError(
                f"need 0 <= min_area_ratio <= max_area_ratio <= 1, got {self.min_area_ratio}, {self.max_area_ratio}"
            )
        if self.max_components < 1:
            raise ValueError(f"max_components must be >= 1, got {self.max_components}")


@dataclass(frozen=True)
class QualityReport:
    """Verdict on one mask and the numbers behind it.

    Attributes
    ----------
    verdict : str
        One of :data:`VERDICTS`; the first that applies of empty, too_small, too_large,
        fragmented, else ok.
    area_ratio : float
        Foreground pixels / all pixels.
    components : int
        Connected regions (8-connectivity).
    largest_component_ratio : float
        Share of the foreground in the largest region (1.0 for one region, 0.0 when empty).
    """

    verdict: str
    area_ratio: float
    components: int
    largest_component_ratio: float

    def as_dict(self) -> dict:
        return asdict(self)


def quality_report(mask: np.ndarray, thresholds: QualityThresholds = QualityThresholds()) -> QualityReport:
    """Judge a ``(H, W)`` mask against ``thresholds``.

    Parameters
    ----------
    mask : array_like
        ``(H, W)``; bool, or any numbers with nonzero pixels as foreground (a 0/255 mask file
        reads the same as its bool mask).
    thresholds : QualityThresholds
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"quality_report: the mask must be (H, W), got shape {mask.shape}")
    if mask.dtype != bool:
        mask = mask != 0
    area = int(mask.sum())
    area_ratio = area / mask.size if mask.size else 0.0
    regions, components = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    largest = int(np.bincount(regions.ravel())[1:].max()) if components else 0
    if area == 0:
        verdict = "empty"
    elif area_ratio < thresholds.min_area_ratio:
        verdict = "too_small"
    elif area_ratio > thresholds.max_area_ratio:
        verdict = "too_large"
    elif components > thresholds.max_components:
        verdict = "fragmented"
    else:
        verdict = "ok"
    return QualityReport(verdict, area_ratio, int(components), largest / area if area else 0.0)
