"""Assemble a :class:`~labelstudio_backend.service.Backend` from settings and a segmenter."""

from __future__ import annotations

from .budget import PixelBudget
from .credentials import Credentials
from .images import ImageFetcher
from .predictor import Predictor
from .service import Backend
from .settings import Settings


def image_fetcher(settings: Settings) -> ImageFetcher:
    """The fetcher of task images for ``settings``; a ``ValueError`` naming ``LABEL_STUDIO_URL``,
    ``INSID3_ALLOWED_HOSTS`` or ``INSID3_ALLOWED_NETWORKS`` when it cannot be read (the commands
    make it before the model loads, so such a typo is told at once)."""
    return ImageFetcher(
        Credentials(settings.label_studio_url, settings.api_key),
        settings.allowed_hosts,
        settings.allowed_networks,
        settings.max_download_bytes,
        settings.max_pixels,
        settings.download_seconds,
        PixelBudget(settings.max_pixels_in_flight, settings.decode_wait),
    )


def build_backend(settings: Settings, segmenter, engine=None, fetcher: ImageFetcher | None = None) -> Backend:
    """The backend for ``settings``, predicting with ``segmenter`` (an ``insid3_core.Segmenter``).

    The Label Studio API is used when ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` are set.
    ``engine`` (the :class:`~insid3_core.settings.EngineSettings` ``segmenter`` was built from)
    is needed when ``settings.calibrate`` is on. ``fetcher``: :func:`image_fetcher` of
    ``settings``, when the caller made it already.
    """
    if settings.calibrate and engine is None:
        raise ValueError("INSID3_CALIBRATE=on needs the engine settings the segmenter was built from")
    api = None
    if settings.label_studio_url and settings.api_key:
        from .api import LabelStudioApi

        api = LabelStudioApi(settings.label_studio_url, settings.api_key)
    fetcher = image_fetcher(settings) if fetcher is None else fetcher
    predictor = Predictor(
        segmenter, settings.batch_size, settings.instances, settings.min_instance_patches, settings.negative_label,
        engine if settings.calibrate else None,
    )
    return Backend(settings, predictor, api, fetcher)
