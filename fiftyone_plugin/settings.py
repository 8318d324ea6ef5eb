"""Defaults of the operators' engine inputs.

Each input takes, in order, the value given to the operator, the dataset's plugin settings
(``dataset.app_config.plugins["@insid3/fiftyone"]``), FiftyOne's App config plugin settings
(``fo.app_config.plugins["@insid3/fiftyone"]``, i.e. ``plugins`` in ``app_config.json``), the
``INSID3_<NAME>`` environment variable, and finally the built-in default below.
"""

from __future__ import annotations

PLUGIN_NAME = "@insid3/fiftyone"

DEFAULTS = {
    "weights": None,
    "image_size": 1024,
    "svd_components": None,
    "tau": 0.6,
    "merge_threshold": 0.2,
    "device": "auto",
    "precision": "float32",
    "batch_size": 4,
    "mask_dir": None,
    "delegation_threshold": 100,
    "instance_method": "necks",
    "min_instance_patches": 1,
}

CASTS = {
    "image_size": int,
    "svd_components": int,
    "tau": float,
    "merge_threshold": float,
    "batch_size": int,
    "delegation_threshold": int,
    "min_instance_patches": int,
}


def plugin_settings(dataset=None) -> dict:
    """The plugin's settings: App config ones, overridden by the dataset's own."""
    import fiftyone as fo

    merged = dict(fo.app_config.plugins.get(PLUGIN_NAME) or {})
    if dataset is not None:
        merged.update((dataset.app_config.plugins or {}).get(PLUGIN_NAME) or {})
    return merged


def default(name: str, dataset=None):
    """Default of one setting (see the module docstring for the order of sources)."""
    from insid3_core.config import env_setting

    configured = plugin_settings(dataset).get(name)
    if configured not in (None, ""):
        return _cast(name, configured, f"plugin setting '{name}'")
    return env_setting(name, DEFAULTS[name], CASTS.get(name, str))


def resolve(params: dict, dataset=None) -> dict:
    """Every setting of :data:`DEFAULTS`: the operator's value where given, else its default.

    Raises ``ValueError`` naming the setting whose value has the wrong type."""
    return {
        name: _cast(name, params[name], f"'{name}'") if params.get(name) not in (None, "") else default(name, dataset)
        for name in DEFAULTS
    }


def _cast(name: str, value, where: str):
    cast = CASTS.get(name, str)
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be {'an integer' if cast is int else 'a number'}, got {value!r}") from None
