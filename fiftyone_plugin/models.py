"""The backbone and segmenter, loaded on first use and kept for later runs in the process."""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_CACHE: dict = {}
PATCH_SIZE = 16  # of every DINOv3 ViT


def engine_problem(settings: dict) -> str | None:
    """What would stop :func:`segmenter` or the run with these engine ``settings``, without loading
    anything (shown in the operator's form before a run starts); ``None`` when they look right."""
    from insid3_core import BackboneError, EngineConfig, InputError
    from insid3_core.backbone import check_source, resolve_device, resolve_dtype
    from insid3_core.engine import check_image_size_fits
    from insid3_core.io import check_writable_folder

    try:
        config = EngineConfig(image_size=settings["image_size"], svd_components=settings["svd_components"],
                              tau=settings["tau"], merge_threshold=settings["merge_threshold"])
        device = resolve_device(settings["device"])
        resolve_dtype(settings["precision"], device)
        check_image_size_fits(config.image_size, PATCH_SIZE, device)
        if settings["weights"]:
            check_source(settings["weights"])
        for name in ("batch_size", "min_instance_patches"):
            if settings[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {settings[name]}")
        if settings["mask_dir"]:
            check_writable_folder(settings["mask_dir"], "Mask folder")
    except (BackboneError, InputError, ValueError) as err:
        return str(err)
    return None


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
