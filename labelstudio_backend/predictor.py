"""All labels of a task in one backbone pass: shared target features, per-label references."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from PIL import Image

from .references import Pairs

REFERENCE_CACHE_SIZE = 8


class Predictor:
    """Encode each label's references once per pool and segment targets with them.

    Callers serialise :meth:`references` and :meth:`segment` (they use the device).

    Parameters
    ----------
    segmenter : insid3_core.Segmenter
    batch_size : int
        Targets per backbone call.
    """

    def __init__(self, segmenter, batch_size: int = 4) -> None:
        self.segmenter = segmenter
        self.batch_size = batch_size
        self._encoded: OrderedDict[Hashable, dict] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def engine_id(self) -> str:
        """Short id of the weights, the engine settings that change masks and the verdict thresholds."""
        config, quality = self.segmenter.config, self.segmenter.quality
        settings = (f"{self.segmenter.backbone.identity}|{config.image_size}|{self.segmenter.basis.shape[1]}|"
                    f"{config.tau}|{config.merge_threshold}|{config.refinement}|{quality.min_area_ratio}|"
                    f"{quality.max_area_ratio}|{quality.max_components}")
        return hashlib.sha256(settings.encode()).hexdigest()[:8]

    def model_version(self, pool: str) -> str:
        """``insid3-<engine id>-<reference pool digest>``: changes with the backbone or the references.

        ``insid3-smoke-...`` on the bundled random-weight test checkpoint, so reviewers can tell.
        """
        prefix = "insid3-smoke" if self.segmenter.backbone.is_smoke_test else "insid3"
        return f"{prefix}-{self.engine_id}-{pool}"

    def references(self, pairs: Pairs, key: Hashable) -> dict:
        """``label -> ReferenceSet`` for ``pairs``, encoded once and cached under ``key``.

        Raises ``ValueError`` (``insid3_core.io.InputError``) naming a reference that cannot be used.
        """
        cached = self.cached(key)
        if cached is not None:
            return cached
        encoded = {label: self.segmenter.encode_references(list(found)) for label, found in pairs.items()}
        with self._cache_lock:
            self._encoded[key] = encoded
            while len(self._encoded) > REFERENCE_CACHE_SIZE:
                self._encoded.popitem(last=False)
        return encoded

    def cached(self, key: Hashable) -> dict | None:
        """The references cached under ``key``, or ``None``."""
        with self._cache_lock:
            if key not in self._encoded:
                return None
            self._encoded.move_to_end(key)
            return self._encoded[key]

    def segment(self, references: dict, images: Sequence[Image.Image]) -> list[dict]:
        """Per image, ``label -> SegmentationResult`` for every label of ``references``."""
        import torch
        from insid3_core.features import patch_features, resized_pixels

        size = self.segmenter.config.image_size
        results: list[dict] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            pixels = torch.stack([resized_pixels(image, size) for image in batch])
            features = patch_features(self.segmenter.backbone, pixels)
            sizes = [(image.height, image.width) for image in batch]
            per_label = {label: self.segmenter.segment_features(refs, features, sizes) for label, refs in references.items()}
            results.extend({label: found[index] for label, found in per_label.items()} for index in range(len(batch)))
        return results
