"""All labels of a task in one pass: shared target features and clustering, per-label references."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from PIL import Image

from insid3_core import __version__ as insid3_version

from .references import Pairs

REFERENCE_CACHE_SIZE = 8
CALIBRATION_IMAGES = 3
"""Reference images a label needs before its pool is calibrated (each is a target for the others)."""
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedPool:
    """A reference pool encoded by the segmenter that predicts with it.

    Attributes
    ----------
    references : insid3_core.References
    segmenter : insid3_core.Segmenter
        The backend's, or one with the pool's calibrated settings.
    calibration : insid3_core.calibration.Calibration or None
        The pool's calibration, when one ran.
    """

    references: object
    segmenter: object
    calibration: object | None = None


class Predictor:
    """Encode each label's references once per pool and segment targets with them.

    Callers serialise :meth:`references` and :meth:`segment` (they use the device).

    Parameters
    ----------
    segmenter : insid3_core.Segmenter
    batch_size : int
        Targets per backbone call.
    instances : {"off", "necks", "components", "clusters"}
        How :meth:`split` cuts a label's mask into instances; ``off`` keeps it whole.
    min_instance_patches : int
        Instances of fewer feature patches are dropped.
    negative_label : str
        A reserved label whose references are negatives ("not this") of every other label and
        which is never predicted; empty for none.
    calibration : insid3_core.settings.EngineSettings or None
        The engine settings ``segmenter`` was built from, to calibrate each pool in which a label
        has references on :data:`CALIBRATION_IMAGES` images (``None``: no calibration). The
        chosen settings follow from the engine and the pool, so the model version (engine id
        and pool digest) names them.
    """

    def __init__(
        self,
        segmenter,
        batch_size: int = 4,
        instances: str = "off",
        min_instance_patches: int = 1,
        negative_label: str = "",
        calibration=None,
    ) -> None:
        self.segmenter = segmenter
        self.calibration = calibration
        self._calibrated: OrderedDict[tuple, object] = OrderedDict()
        self.batch_size = batch_size
        self.instances = instances
        self.min_instance_patches = min_instance_patches
        self.negative_label = negative_label
        self._encoded: OrderedDict[Hashable, dict] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def engine_id(self) -> str:
        """Short id of the engine's version, the weights, the engine settings that change masks, the
        verdict thresholds and, when on, the instance settings (so versions made with instances off
        stay the same)."""
        config, quality = self.segmenter.config, self.segmenter.quality
        settings = (f"{insid3_version}|{self.segmenter.backbone.identity}|{config.image_size}|{self.segmenter.basis.shape[1]}|"
                    f"{config.tau}|{config.merge_threshold}|{config.refinement}|{quality.min_area_ratio}|"
                    f"{quality.max_area_ratio}|{quality.max_components}")
        if self.instances != "off":
            settings += f"|instances {self.instances} {self.min_instance_patches}"
        if self.negative_label:
            settings += f"|negative {self.negative_label}"
        if self.calibration is not None:
            settings += "|calibrated"
        return hashlib.sha256(settings.encode()).hexdigest()[:8]

    def model_version(self, pool: str) -> str:
        """``insid3-<engine id>-<reference pool digest>``: changes with the backbone or the references.

        ``insid3-smoke-...`` on the bundled random-weight test checkpoint, so reviewers can tell.
        """
        prefix = "insid3-smoke" if self.segmenter.backbone.is_smoke_test else "insid3"
        return f"{prefix}-{self.engine_id}-{pool}"

    def classes_and_negatives(self, pairs: Pairs) -> tuple[dict, list]:
        """``pairs`` of each label split into the classes to predict (every label but
        ``negative_label``) and the negative label's pairs, the negatives of them all."""
        negatives = list(pairs.get(self.negative_label, ())) if self.negative_label else []
        return {label: list(found) for label, found in pairs.items() if label != self.negative_label}, negatives

    def references(self, pairs: Pairs, key: Hashable) -> EncodedPool:
        """The :class:`EncodedPool` of ``pairs`` (one class per label), calibrated when that is on
        and the pool allows it, encoded once and cached under ``key``.

        Raises ``ValueError`` (``insid3_core.io.InputError``) naming a reference that cannot be used.
        """
        cached = self.cached(key)
        if cached is not None:
            return cached
        classes, negatives = self.classes_and_negatives(pairs)
        if not classes:
            raise ValueError(f"only {self.negative_label!r} (negative) regions are annotated yet: "
                             "annotate at least one region of another label")
        segmenter, calibration = self.segmenter, None
        if self.calibration is not None and max(len({image for image, _ in found}) for found in classes.values()) \
                >= CALIBRATION_IMAGES:
            from insid3_core.calibration import calibrate

            calibration = calibrate(self.calibration, classes, negatives, segmenter=self.segmenter)
            segmenter = self.calibrated_segmenter(calibration.settings)
            log.info("calibrated the pool %s: leave-one-out IoU %.3f -> %.3f with %s", key[0],
                     calibration.default_score, calibration.best_score, calibration.settings)
        encoded = EncodedPool(segmenter.encode(classes, negatives), segmenter, calibration)
        with self._cache_lock:
            self._encoded[key] = encoded
            while len(self._encoded) > REFERENCE_CACHE_SIZE:
                self._encoded.popitem(last=False)
        return encoded

    def calibrated_segmenter(self, settings: dict):
        """A segmenter with the engine's settings and the calibrated ``settings`` (the backbone
        shared), kept for later pools that choose the same."""
        key = tuple(sorted(settings.items()))
        with self._cache_lock:
            if key not in self._calibrated:
                self._calibrated[key] = dataclasses.replace(self.calibration, **settings).build()
                while len(self._calibrated) > REFERENCE_CACHE_SIZE:
                    self._calibrated.popitem(last=False)
            return self._calibrated[key]

    def cached(self, key: Hashable):
        """The references cached under ``key``, or ``None``."""
        with self._cache_lock:
            if key not in self._encoded:
                return None
            self._encoded.move_to_end(key)
            return self._encoded[key]

    def segment(self, pool: EncodedPool, images: Sequence[Image.Image]) -> list[dict]:
        """Per image, ``label -> SegmentationResult`` for every label of the ``pool``.

        Each batch takes one backbone pass and one clustering shared by all labels; a patch
        claimed by several labels goes to the label most similar to it, so the masks of one
        image are disjoint. Runs in the request's thread (the caller holds the device).
        """
        return [dict(prediction.classes)
                for prediction in pool.segmenter.segment(pool.references, images, self.batch_size, workers=0)]

    def split(self, label: str, result) -> list | None:
        """The instances of ``label``'s ``SegmentationResult`` (``insid3_core.instances.Instance``
        list, empty when none), or ``None`` when instances are off."""
        from insid3_core.instances import split_instances

        if self.instances == "off":
            return None
        return split_instances(result, self.instances, self.min_instance_patches)
