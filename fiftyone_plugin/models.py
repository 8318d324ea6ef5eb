"""The backbone and segmenter, loaded on first use and kept for later runs in the process."""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_CACHE: dict = {}


def segmenter(settings: dict):
    """A :class:`insid3_core.Segmenter` for the engine ``settings`` (see :mod:`.settings`).

    The backbone of the last ``(weights, device, precision)`` asked for stays loaded, and
    so do the segmenters built on it (one per engine configuration), so consecutive runs
    in the same process load the weights and compute the positional basis once.
    """
    from insid3_core import EngineConfig, Segmenter, load_backbone

    source = (settings["weights"], settings["device"], settings["precision"])
    config = EngineConfig(
        image_size=settings["image_size"],
        svd_components=settings["svd_components"],
        tau=settings["tau"],
        merge_threshold=settings["merge_threshold"],
    )
    with _LOCK:
        if _CACHE.get("source") != source:
            _CACHE.clear()
            _CACHE.update(source=source, backbone=load_backbone(*source), segmenters={})
        segmenters = _CACHE["segmenters"]
        if config not in segmenters:
            segmenters[config] = Segmenter(_CACHE["backbone"], config)
        return segmenters[config]
