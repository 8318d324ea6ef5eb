"""The segmenter of a run's engine settings, kept for later runs in the process, and the check of
those settings before a run."""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_SEGMENTERS: dict = {}
PATCH_SIZE = 16  # of every DINOv3 ViT


def engine_problem(engine) -> str | None:
    """What would stop a run with ``engine`` (:class:`insid3_core.settings.EngineSettings`) and a
    mask folder, without loading anything (shown in the operator's form before a run starts);
    ``None`` when they look right."""
    from insid3_core import BackboneError
    from insid3_core.backbone import check_source, resolve_device, resolve_dtype
    from insid3_core.engine import check_image_size_fits

    try:
        device = resolve_device(engine.device)
        resolve_dtype(engine.precision, device)
        check_image_size_fits(engine.image_size, PATCH_SIZE, device)
        engine.check_basis_file()
        for source in (engine.weights, engine.backbone):
            if source:
                check_source(source)
    except (BackboneError, ValueError) as err:
        return str(err)
    return None


def segmenter(engine):
    """A :class:`insid3_core.Segmenter` for ``engine`` (:class:`insid3_core.settings.EngineSettings`).

    The backbone stays loaded across runs (see :meth:`EngineSettings.load_backbone`), and so do
    the segmenters built on it, one per setting of what the segmenter holds, so consecutive
    runs compute the positional basis once.
    """
    import dataclasses

    key = dataclasses.replace(engine, batch_size=1, workers=None, instance_method="necks", min_instance_patches=1)
    with _LOCK:
        built = _SEGMENTERS.get(key)
        if built is None or built.backbone is not engine.load_backbone():
            _SEGMENTERS.clear()
            built = _SEGMENTERS[key] = engine.build()
        return built
