"""The operators' settings: every :class:`insid3_core.settings.EngineSettings` option under its own
name (``image_size``, ``refinement``, ``min_area_ratio``, ...), and the plugin's own ones.

Each setting takes, in order, the value given to the operator, the dataset's plugin settings
(``dataset.app_config.plugins["@insid3/fiftyone"]``), FiftyOne's App config plugin settings
(``fo.app_config.plugins["@insid3/fiftyone"]``, i.e. ``plugins`` in ``app_config.json``), the
``INSID3_<NAME>`` environment variable, and finally the built-in default. The plugin setting
``settings`` names a JSON file of engine options (``insid3 calibrate``'s ``calibration.json``): its
options come after the per-option plugin settings and before the environment.
"""

from __future__ import annotations

from insid3_core.settings import EngineSettings, SettingsError, parse, settings_file

PLUGIN_NAME = "@insid3/fiftyone"
PLUGIN_DEFAULTS = {"mask_dir": None, "delegation_threshold": 100, "settings": None, "ray_address": None,
                   "ray_actors": 1}
PLUGIN_MINIMUMS = {"delegation_threshold": 0, "ray_actors": 1}
"""The integer plugin settings and their smallest value (the others are strings)."""


def plugin_settings(dataset=None) -> dict:
    """The plugin's settings: App config ones, overridden by the dataset's own."""
    import fiftyone as fo

    merged = dict(fo.app_config.plugins.get(PLUGIN_NAME) or {})
    if dataset is not None:
        merged.update((dataset.app_config.plugins or {}).get(PLUGIN_NAME) or {})
    return merged


def kind(name: str) -> type:
    """The type of setting ``name``: ``int``, ``float`` or ``str``."""
    if name in PLUGIN_DEFAULTS:
        return int if name in PLUGIN_MINIMUMS else str
    return EngineSettings.__dataclass_fields__[name].metadata["kind"]


def engine_settings(params: dict, dataset=None) -> EngineSettings:
    """The run's :class:`EngineSettings`; a :class:`SettingsError` naming a bad setting."""
    configured = plugin_settings(dataset)
    overrides = {}
    for name in EngineSettings.names():
        if params.get(name) not in (None, ""):
            overrides[name] = _typed(name, params[name], f"'{name}'")
        elif configured.get(name) not in (None, ""):
            overrides[name] = _typed(name, configured[name], f"plugin setting '{name}'")
    if configured.get("settings"):
        overrides = {**settings_file(configured["settings"], "plugin setting 'settings'"), **overrides}
    return EngineSettings.from_env(**overrides)


def default(name: str, dataset=None):
    """Default of one setting for ``dataset`` (see the module docstring for the order of sources);
    the built-in default when the configured one is unusable (the form then shows the problem)."""
    if name in PLUGIN_DEFAULTS:
        try:
            return _configured(name, dataset)
        except SettingsError:
            return PLUGIN_DEFAULTS[name]
    try:
        return getattr(engine_settings({}, dataset), name)
    except SettingsError:
        return EngineSettings.__dataclass_fields__[name].default


def plugin_setting(name: str, params: dict, dataset=None):
    """A plugin-only setting (``mask_dir``, ``delegation_threshold``, ...): the operator's value,
    else the configured one, else the built-in default; a :class:`SettingsError` naming a bad one
    (where :func:`default`, which fills the forms, falls back to the built-in value)."""
    if params.get(name) not in (None, ""):
        return _typed(name, params[name], f"'{name}'")
    return _configured(name, dataset)


def _configured(name: str, dataset=None):
    """Plugin-only setting ``name`` from the plugin settings, else ``INSID3_<NAME>``, else its default."""
    from insid3_core.config import ENV_PREFIX, env_setting

    configured = plugin_settings(dataset).get(name)
    if configured not in (None, ""):
        return _typed(name, configured, f"plugin setting '{name}'")
    variable = env_setting(name)
    if variable is None:
        return PLUGIN_DEFAULTS[name]
    return _typed(name, variable, f"environment variable {ENV_PREFIX}{name.upper()}")


def _typed(name: str, value, where: str):
    """``value`` as setting ``name``'s type: typed form values pass, text (plugin settings) is parsed."""
    expected = kind(name)
    if name in PLUGIN_MINIMUMS:
        try:
            number = int(value) if isinstance(value, str) else value
        except ValueError:
            raise SettingsError(f"{where} must be an integer, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, int) or number < PLUGIN_MINIMUMS[name]:
            raise SettingsError(f"{where} must be an integer >= {PLUGIN_MINIMUMS[name]}, got {value!r}")
        return number
    if isinstance(value, str) and expected is not str:
        return parse(name, value, where)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value



def store(dataset, values: dict) -> None:
    """Write engine option values into ``dataset``'s plugin settings (saved with the dataset by
    the caller), where every later run and form of the dataset reads them."""
    plugins = dict(dataset.app_config.plugins or {})
    plugins[PLUGIN_NAME] = {**(plugins.get(PLUGIN_NAME) or {}), **values}
    dataset.app_config.plugins = plugins
