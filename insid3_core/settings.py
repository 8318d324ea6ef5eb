"""One object holding every engine option, read the same way by every front end.

:class:`EngineSettings` lists each option once, with its type, default, help text and
``INSID3_<NAME>`` variable. The command line (:meth:`EngineSettings.add_arguments` and
:meth:`EngineSettings.from_arguments`), the FiftyOne operator and plugin settings, the Label
Studio backend and ``preannotate`` (:meth:`EngineSettings.from_env`) all build it, and
:meth:`EngineSettings.build` makes the :class:`~insid3_core.engine.Segmenter` (the backbone
stays loaded across builds in one process). A bad value is a :class:`SettingsError` naming the
option and its variable.

Options may also come from a JSON file (:func:`settings_file`: ``insid3 calibrate``'s
``calibration.json``, or an object of options): ``--settings FILE`` on the command line,
``INSID3_SETTINGS`` in the environment. Each option takes the first of: its flag (or the value a
front end passes), the ``--settings`` file, its ``INSID3_<NAME>`` variable, the ``INSID3_SETTINGS``
file, the built-in default.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .config import BATCH_SIZE, CLUSTERING_METHODS, ENV_PREFIX, REFINEMENTS, EngineConfig, is_finite_number
from .instances import INSTANCE_METHODS
from .io import json_value, read_small_file

PRECISIONS = ("float32", "float16", "bfloat16")


class SettingsError(ValueError):
    """An engine option with a bad value; the message names the option and its variable."""


def _option(default, help: str, kind=str, choices=None, minimum=None, flag: str | None = None):
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices, "minimum": minimum,
                                            "flag": flag})


PATH_OPTIONS = ("weights", "basis")
"""The options that may name a local file or folder: anchored where they were given
(:meth:`EngineSettings.anchored`, :func:`settings_file`)."""


@dataclass(frozen=True)
class EngineSettings:
    """Every option of the engine (see ``docs/algorithm.md`` for what each step does).

    Attributes
    ----------
    weights : str or None
        Meta DINOv3 ``.pth`` checkpoint (Meta's constructor arguments from ``PATH.json`` beside
        it), a Hugging Face transformers snapshot folder (or its repo id, found in the Hugging
        Face cache) or a timm-layout ``.safetensors`` file; ``None`` with no ``backbone``: the
        bundled random-weight test checkpoint.
    backbone : str or None
        A timm DINOv3 model name (downloads its weights; needs the network).
    device, precision : str
        ``auto|cpu|cuda|cuda:N|mps``; ``float32|float16|bfloat16`` (half precision on a GPU only).
    image_size, svd_components, basis, tau, merge_threshold, clustering, refinement
        The pipeline's :class:`~insid3_core.config.EngineConfig` and positional basis.
    min_area_ratio, max_area_ratio, max_components
        The quality verdicts' :class:`~insid3_core.quality.QualityThresholds`.
    instance_method, min_instance_patches
        How a mask is split into instances, where a front end asks for instances.
    batch_size, workers
        Targets per backbone call; threads decoding targets and finishing masks (``None``:
        4 beside a GPU, 2 on the CPU; 0: everything in the caller's thread).
    """

    weights: str | None = _option(None, "Meta DINOv3 .pth checkpoint (constructor arguments from PATH.json when "
                                        "present), Hugging Face snapshot folder or cached repo id, or timm-layout "
                                        ".safetensors; none: the random-weight TEST checkpoint", flag="PATH")
    backbone: str | None = _option(None, "timm DINOv3 model name, e.g. vit_large_patch16_dinov3_qkvb.lvd1689m "
                                         "(needs network)", flag="NAME")
    device: str = _option("auto", "auto|cpu|cuda|cuda:N|mps")
    precision: str = _option("float32", "backbone precision (half on GPU only)", choices=PRECISIONS)
    image_size: int = _option(1024, "square input side, a multiple of 16", int, minimum=16)
    svd_components: int | None = _option(None, "positional directions removed (none: half the backbone width, "
                                                "500 for ViT-L)", int, minimum=0)
    basis: str | None = _option(None, "(C, k) .npy positional basis (orthonormal columns) to use instead of computing it", flag="NPY")
    tau: float = _option(0.6, "clusters merge while their average cosine distance is below 1 - tau", float)
    merge_threshold: float = _option(0.2, "clusters scoring above it form the mask", float)
    clustering: str = _option("auto", "clustering implementation (same partition): auto = triton on a CUDA GPU "
                                      "(torch without triton), scipy on CPU", choices=CLUSTERING_METHODS)
    refinement: str = _option("bilinear", "mask edges: bilinear upsampling (the release) or a guided filter "
                                          "on the image", choices=REFINEMENTS)
    min_area_ratio: float = _option(0.001, "a mask covering less of the image is too_small", float)
    max_area_ratio: float = _option(0.9, "a mask covering more of the image is too_large", float)
    max_components: int = _option(4, "a mask of more connected regions is fragmented", int, minimum=1)
    instance_method: str = _option("necks", "how a mask is split into instances", choices=INSTANCE_METHODS)
    min_instance_patches: int = _option(1, "instances of fewer feature patches are dropped", int, minimum=1)
    batch_size: int = _option(BATCH_SIZE, "targets per backbone call", int, minimum=1)
    workers: int | None = _option(None, "threads decoding targets ahead of the device and finishing masks "
                                        "(none: 4 beside a GPU, 2 on the CPU; 0 runs everything in one thread)",
                                  int, minimum=0)

    def __post_init__(self) -> None:
        for option in dataclasses.fields(self):
            value, meta = getattr(self, option.name), option.metadata
            if value is None and option.default is None:
                continue
            if meta["kind"] is float and not is_finite_number(value):
                raise SettingsError(f"{describe(option.name)} must be a finite number, got {value!r}")
            if meta["kind"] is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise SettingsError(f"{describe(option.name)} must be an integer, got {value!r}")
            if meta["kind"] is str and not isinstance(value, str):
                raise SettingsError(f"{describe(option.name)} must be a string, got {value!r}")
            if meta["kind"] is str and not value.strip():
                raise SettingsError(f"{describe(option.name)} is empty; leave it unset for its default")
            if meta["kind"] in (int, float):  # NumPy scalars become Python numbers (JSON, hashing, describe())
                object.__setattr__(self, option.name, meta["kind"](value))
                value = getattr(self, option.name)
            if meta["choices"] and value not in meta["choices"]:
                raise SettingsError(f"{describe(option.name)} must be one of {', '.join(meta['choices'])}, got {value!r}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise SettingsError(f"{describe(option.name)} must be >= {meta['minimum']}, got {value}")
        if self.weights and self.backbone:
            raise SettingsError("give --weights (INSID3_WEIGHTS) or --backbone (INSID3_BACKBONE), not both")
        try:
            self.config()
            self.quality()
        except ValueError as err:  # the message starts with the option's name, or names two of them
            name, _, rest = str(err).partition(" ")
            raise SettingsError(f"{describe(name)} {rest}" if name in self.names() else str(err)) from None

    def anchored(self) -> EngineSettings:
        """These settings with ``weights`` and ``basis`` made absolute where they name a file or
        folder here: what travels to other processes, whose working directory is not this one's (a
        Ray worker's). A path that is not here (one the workers' nodes hold) is left as it is."""
        return dataclasses.replace(self, **{name: str(Path(value).expanduser().resolve())
                                            for name in PATH_OPTIONS
                                            if (value := getattr(self, name)) and Path(value).expanduser().exists()})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option's name, in order."""
        return tuple(option.name for option in dataclasses.fields(cls))

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "EngineSettings":
        """Settings from ``INSID3_<NAME>`` variables (``environ``: default ``os.environ``), ``overrides``
        (option name -> value, ``None`` meaning unset) winning over them."""
        environ = os.environ if environ is None else environ
        unknown = set(overrides) - set(cls.names())
        if unknown:
            raise SettingsError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        shared = environ.get(variable("settings"), "")
        values = settings_file(shared, variable("settings")) if shared else {}
        for option in dataclasses.fields(cls):
            given = overrides.get(option.name)
            if given is not None:
                values[option.name] = given
                continue
            raw = environ.get(variable(option.name), "")
            if raw != "":
                values[option.name] = parse(option.name, raw, variable(option.name))
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
        """Add every option (less ``exclude``) as ``--<name>``; unset flags fall back to
        ``INSID3_<NAME>`` then the default, read by :meth:`from_arguments` (so a bad variable is
        reported by name when the command runs, not while its parser is built)."""
        group = parser.add_argument_group("engine (each also set by its INSID3_<NAME> environment variable)")
        sources = group.add_mutually_exclusive_group() if "weights" not in exclude else group
        group.add_argument("--settings", metavar="FILE", help="engine options from a JSON file, e.g. insid3 "
                           "calibrate's calibration.json; flags override it (INSID3_SETTINGS: a file below the "
                           "INSID3_<NAME> variables)")
        for option in dataclasses.fields(cls):
            if option.name in exclude:
                continue
            meta = option.metadata
            shown = "none" if option.default is None else option.default
            target = sources if option.name in ("weights", "backbone") else group
            target.add_argument(
                "--" + option.name.replace("_", "-"), default=None, choices=meta["choices"], metavar=meta["flag"],
                type=_argument_type(option.name), help=f"{meta['help']} (default {shown}; {variable(option.name)})",
            )

    @classmethod
    def from_arguments(cls, arguments: argparse.Namespace, defaults: dict | None = None) -> "EngineSettings":
        """Settings from parsed :meth:`add_arguments` flags, then the ``--settings`` file, then
        ``defaults`` (option name -> value), then ``INSID3_*``, then the built-in defaults."""
        given = {name: getattr(arguments, name) for name in cls.names() if getattr(arguments, name, None) is not None}
        path = getattr(arguments, "settings", None)
        from_file = settings_file(path, "--settings") if path else {}
        return cls.from_env(**{**(defaults or {}), **from_file, **given})

    def config(self) -> EngineConfig:
        """The pipeline's hyper-parameters."""
        return EngineConfig(image_size=self.image_size, svd_components=self.svd_components, tau=self.tau,
                            merge_threshold=self.merge_threshold, clustering=self.clustering,
                            refinement=self.refinement)

    def quality(self):
        """The verdicts' :class:`~insid3_core.quality.QualityThresholds`."""
        from .quality import QualityThresholds

        return QualityThresholds(self.min_area_ratio, self.max_area_ratio, self.max_components)

    def build(self):
        """A :class:`~insid3_core.engine.Segmenter` with these settings; the backbone of the same
        ``(weights or backbone, device, precision)`` is loaded once per process."""
        from .engine import Segmenter

        self.check_basis_file()
        self.clustering_on_device()
        return Segmenter(self.load_backbone(), self.config(), self.quality(), basis_file=self.basis)

    def clustering_on_device(self) -> str:
        """The clustering ``clustering`` runs on ``device`` (``auto`` resolved); a
        :class:`SettingsError` when it cannot run there (``triton`` off CUDA), before anything loads."""
        from .backbone import resolve_device
        from .clustering import clustering_method

        device = resolve_device(self.device)
        try:
            return clustering_method(self.clustering, device)
        except ValueError:
            raise SettingsError(f"{describe('clustering')} 'triton' needs a CUDA device, and {describe('device')} "
                                f"{self.device!r} is {device.type}: choose another clustering (auto picks one "
                                "for the device) or a CUDA device") from None

    def check_basis_file(self) -> None:
        """Raise :class:`SettingsError` when ``basis`` names no file (before anything is loaded)."""
        if self.basis is not None and not Path(self.basis).expanduser().is_file():
            found = "not a regular file" if Path(self.basis).expanduser().exists() else "no such file"
            raise SettingsError(f"--basis (INSID3_BASIS) {self.basis}: {found}")

    def load_backbone(self):
        """The backbone these settings name (kept loaded for later calls in the process)."""
        from .backbone import TEST_CHECKPOINT, load_backbone

        if self.weights is not None and not Path(self.weights).expanduser().exists() and self.weights.count("/") != 1:
            raise SettingsError(f"--weights (INSID3_WEIGHTS) {self.weights}: no such file or folder")
        key = (self.weights or self.backbone or TEST_CHECKPOINT, self.device, self.precision)
        with _BACKBONES_LOCK:
            if key not in _BACKBONES:
                _BACKBONES.clear()  # one backbone at a time: they are large
                _BACKBONES[key] = load_backbone(*key)
            return _BACKBONES[key]

    def describe(self) -> dict:
        """The settings as a JSON-ready dict: the provenance written beside results."""
        return {name: getattr(self, name) for name in self.names()}


_BACKBONES: dict = {}
_BACKBONES_LOCK = threading.Lock()


def settings_file(path: str | Path, where: str) -> dict:
    """Engine options from the JSON file ``path`` (given by ``where``, e.g. ``--settings``): the
    ``settings`` object of a ``calibration.json``, else the document itself, an object of option
    name -> value; a :class:`SettingsError` naming the file when it is unreadable, not such an
    object, or holds an unknown option or a bad value. A relative ``weights`` or ``basis`` that
    names a file or folder beside the settings file is that one (else it is read as given: from
    the working directory, or as a Hugging Face repo id)."""
    try:
        document = json_value(read_small_file(path).decode("utf-8"))
    except OSError as err:
        raise SettingsError(f"{where} {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise SettingsError(f"{where} {path}: not a JSON document ({err})") from None
    if isinstance(document, dict) and isinstance(document.get("settings"), dict):
        document = document["settings"]
    if not isinstance(document, dict):
        raise SettingsError(f"{where} {path}: expected a JSON object of engine options, got {type(document).__name__}")
    unknown = sorted(set(document) - set(EngineSettings.names()))
    if unknown:
        raise SettingsError(f"{where} {path}: unknown engine option(s) {', '.join(unknown)}")
    options = {name: value for name, value in document.items() if value is not None}
    try:
        EngineSettings(**options)
    except SettingsError as err:
        raise SettingsError(f"{where} {path}: {err}") from None
    beside = Path(path).expanduser().parent
    for name in PATH_OPTIONS:
        if name in options and not Path(options[name]).expanduser().is_absolute() and (beside / options[name]).exists():
            options[name] = str(beside / options[name])
    return options


def variable(name: str) -> str:
    """The environment variable of option ``name``: ``INSID3_<NAME>``."""
    return ENV_PREFIX + name.upper()


def describe(name: str) -> str:
    """How a message names option ``name``: its name, flag and variable (front ends show one of them)."""
    return f"{name} (--{name.replace('_', '-')}, {variable(name)})"


def out_of_memory_message(error: BaseException) -> str | None:
    """What a front end tells its user when ``error`` is a failed allocation (``torch.OutOfMemoryError``
    on a device, the CPU allocator's ``RuntimeError``, NumPy's ``MemoryError``): which settings
    lower the memory a run needs. ``None`` for any other error."""
    import torch

    text = " ".join(str(error).split())
    if not (isinstance(error, (torch.OutOfMemoryError, MemoryError))
            or (isinstance(error, RuntimeError) and "can't allocate memory" in text)):
        return None
    sentences = text.split(". ")
    first = next((index for index, sentence in enumerate(sentences) if "allocate" in sentence or "memory" in sentence), 0)
    what = ". ".join(sentences[first:first + 2]).rstrip(".") or type(error).__name__  # not torch's advice on its allocator
    return (f"out of memory ({what}); lower {describe('batch_size')} or {describe('image_size')}, "
            f"or run on a device with more memory")


def parse(name: str, text: str, where: str):
    """Option ``name``'s value from ``text``; a :class:`SettingsError` naming ``where`` when it does not parse."""
    kind = EngineSettings.__dataclass_fields__[name].metadata["kind"]
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not is_finite_number(value)):
        expected = {int: "an integer", float: "a finite number"}.get(kind, "a string")
        raise SettingsError(f"{where}={text!r} is not {expected}")
    return value


def _argument_type(name: str):
    kind = EngineSettings.__dataclass_fields__[name].metadata["kind"]
    if kind is str:
        return str

    def convert(text: str):
        try:
            return parse(name, text, "value")
        except SettingsError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = kind.__name__
    return convert
