"""All labels of a task in one backbone pass: shared target features, per-label references."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from PIL import Image

from .references import Pairs

REFERENCE_CACHE_SIZE = 8


class Predictor:
    """Encode each label's references once per pool version and segment targets with them.

    Parameters
    ----------
    segmenter : insid3_core.Segmenter
    batch_size : int
        Targets per backbone call.
    """

    def __init__(self, segmenter, batch_size: int = 4) -> None:
        self.segmenter = segmenter
        self.batch_size = batch_size
        self._encoded: OrderedDict[str, dict] = OrderedDict()

    @property
    def engine_id(self) -> str:
        """Short id of the weights and engine settings, part of every model version."""
        config = self.segmenter.config
        settings = f"{self.segmenter.backbone.identity}|{config.image_size}|{self.segmenter.basis.shape[1]}|{config.tau}|{config.merge_threshold}"
        return hashlib.sha256(settings.encode()).hexdigest()[:8]

    def model_version(self, pool: str) -> str:
        """``insid3-<engine id>-<reference pool digest>``: changes with the backbone or the references.

        ``insid3-smoke-...`` on the bundled random-weight test checkpoint, so reviewers can tell.
        """
        prefix = "insid3-smoke" if self.segmenter.backbone.is_smoke_test else "insid3"
        return f"{prefix}-{self.engine_id}-{pool}"

    def references(self, pairs: Pairs, pool: str) -> dict:
        """``label -> ReferenceSet`` for a pool (cached by its digest ``pool``)."""
        if pool not in self._encoded:
            self._encoded[pool] = {label: self.segmenter.encode_references(list(found)) for label, found in pairs.items()}
            while len(self._encoded) > REFERENCE_CACHE_SIZE:
                self._encoded.popitem(last=False)
        self._encoded.move_to_end(pool)
        return self._encoded[pool]

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
