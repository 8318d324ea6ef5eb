"""Loading a frozen DINOv3 ViT through timm.

The sources :func:`load_backbone` accepts:

* a Meta ``.pth`` checkpoint (``dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth`` …), whose keys
  are converted by timm's DINOv3 converter; the architecture is read from the weights, and a
  JSON sidecar (``X.json`` beside ``X.pth``) holding the keyword arguments of Meta's
  ``DinoVisionTransformer`` overrides what the weights cannot tell (heads, norm, RoPE base);
* a Hugging Face transformers snapshot folder (``config.json`` + ``model.safetensors``), or its
  repo id (``facebook/dinov3-vitl16-pretrain-lvd1689m``) when it is in the Hugging Face cache;
  renamed into Meta's layout by :mod:`insid3_core.hf_weights`;
* a ``.safetensors`` file in timm's own layout;
* a timm model name such as ``vit_large_patch16_dinov3_qkvb.lvd1689m`` (downloads when online);
* :data:`TEST_CHECKPOINT`: the small random-weight checkpoint bundled with the package, for smoke tests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .io import file_digest, json_value

BUNDLED_CHECKPOINT = Path(__file__).parent / "weights" / "tiny_dinov3_meta.pth"
TEST_CHECKPOINT = "insid3-test-checkpoint"
"""The name :func:`load_backbone` takes for the bundled random-weight checkpoint (smoke tests only)."""
SMOKE_TEST_BANNER = """\
############################################################################
#  NO DINOv3 WEIGHTS CONFIGURED: running on the bundled random-weight TEST  #
#  checkpoint. These masks are a SMOKE TEST, not DINOv3 quality.            #
#  Pass --weights PATH (or set INSID3_WEIGHTS) to a real DINOv3 checkpoint. #
############################################################################"""

DINOV3_MODELS = {
    # embed_dim, swiglu -> timm architecture with the qkv bias kept
    (384, False): "vit_small_patch16_dinov3_qkvb",
    (384, True): "vit_small_plus_patch16_dinov3_qkvb",
    (768, False): "vit_base_patch16_dinov3_qkvb",
    (1024, False): "vit_large_patch16_dinov3_qkvb",
    (1280, True): "vit_huge_plus_patch16_dinov3_qkvb",
}

SVD_COMPONENTS_DEFAULT = {1024: 500}
"""Positional directions removed per backbone width; widths not listed use half the width.

The release removes 500 for ViT-L (C = 1024), about half its width; the same share is kept
for the other sizes so the debiased features always keep half their dimensions."""

_META_NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5}
_META_SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
_META_DEFAULTS = {
    "patch_size": 16,
    "pos_embed_rope_base": 100.0,
    "pos_embed_rope_normalize_coords": "separate",
    "norm_layer": "layernormbf16",
    "ffn_ratio": 4.0,
    "ffn_layer": "mlp",
    "qkv_bias": True,
    "n_storage_tokens": 0,
}


class BackboneError(RuntimeError):
    """A backbone could not be loaded; the message names the source and the problem."""


@dataclass
class Backbone:
    """A frozen DINOv3 ViT ready for feature extraction.

    Attributes
    ----------
    model : torch.nn.Module
        timm ``Eva`` model in eval mode on ``device`` with parameters in ``dtype``.
    name : str
        timm architecture name.
    identity : str or None
        Stable identifier of the weights (used to cache the positional basis); ``None`` for
        random weights, which are never cached.
    device : torch.device
    dtype : torch.dtype
        Compute dtype of the backbone; features are always returned in float32.
    is_smoke_test : bool
        True for the bundled random-weight checkpoint: masks carry no semantics.
    images_seen : int
        Images passed through the backbone so far (counts reference re-encoding).
    """

    model: nn.Module
    name: str
    identity: str | None
    device: torch.device
    dtype: torch.dtype
    is_smoke_test: bool = False
    images_seen: int = 0

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def default_svd_components(self) -> int:
        """Per-backbone default ``k`` (see :data:`SVD_COMPONENTS_DEFAULT`)."""
        return SVD_COMPONENTS_DEFAULT.get(self.embed_dim, self.embed_dim // 2)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``auto|cuda|mps|cpu`` (or ``cuda:N``) to an available :class:`torch.device`."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise BackboneError(f"device {name!r} is none of auto, cpu, cuda, cuda:N, mps")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {name!r} requested but CUDA is not available")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise BackboneError(f"device {name!r} requested but MPS is not available")
    return resolved


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``float32|float16|bfloat16`` -> dtype; half precision is refused on the CPU."""
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if precision not in dtypes:
        raise BackboneError(f"precision must be one of {sorted(dtypes)}, got {precision!r}")
    if precision != "float32" and device.type == "cpu":
        raise BackboneError(f"half precision ({precision}) needs a GPU; use float32 on the CPU")
    return dtypes[precision]


def load_backbone(
    source: str | Path,
    device: str | torch.device = "auto",
    precision: str = "float32",
) -> Backbone:
    """Load a DINOv3 backbone from a checkpoint file or a timm model name.

    Parameters
    ----------
    source : str or Path
        Path to a Meta ``.pth`` checkpoint, a timm DINOv3 model name, or :data:`TEST_CHECKPOINT`
        for the bundled random-weight test checkpoint (smoke tests only).
    device : str
        ``auto``, ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.
    precision : str
        ``float32`` (default), ``float16`` or ``bfloat16`` (GPU only).
    """
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    if source is None or str(source) == "":
        raise BackboneError(f"no backbone given: a checkpoint path, a timm DINOv3 model name, or {TEST_CHECKPOINT!r} "
                            "for the bundled random-weight test checkpoint")
    path = Path(source).expanduser()
    smoke = False
    if str(source) == TEST_CHECKPOINT:
        model, name, identity = _from_meta_checkpoint(BUNDLED_CHECKPOINT)
        smoke = True
    elif path.is_file() and path.suffix == ".safetensors":
        model, name, identity = _from_timm_safetensors(path)
    elif path.is_file():
        model, name, identity = _from_meta_checkpoint(path)
        smoke = path.resolve() == BUNDLED_CHECKPOINT.resolve()
    elif (snapshot := _snapshot(str(source))) is not None:
        model, name, identity = _from_transformers(snapshot)
    else:
        model, name, identity = _from_timm_name(str(source))
    model = model.to(device=torch_device, dtype=dtype).eval().requires_grad_(False)
    return Backbone(model, name, identity, torch_device, dtype, is_smoke_test=smoke)


def check_source(source: str | Path) -> None:
    """:class:`BackboneError` unless ``source`` is an existing file, a Hugging Face snapshot (folder
    or cached repo id) or a timm DINOv3 model name, without loading anything (for forms that
    check their settings before a run)."""
    if Path(source).expanduser().is_file() or _snapshot(str(source)) is not None:
        return
    try:
        _check_dinov3_name(str(source))
    except BackboneError:
        raise BackboneError(f"weights {str(source)!r}: no such file or Hugging Face snapshot, and not a timm "
                            "DINOv3 model name") from None


def _snapshot(source: str) -> Path | None:
    """The transformers snapshot ``source`` names (see :func:`insid3_core.hf_weights.snapshot_folder`);
    :class:`BackboneError` for a folder that is none, or a repo id missing from the cache."""
    from .hf_weights import hub_cache, snapshot_folder

    folder = snapshot_folder(source)
    path = Path(source).expanduser()
    if folder is None and path.is_dir():
        raise BackboneError(f"{path}: a folder without config.json, not a Hugging Face snapshot")
    if folder is None and source.count("/") == 1 and not path.exists() and not source.startswith((".", "/", "~")):
        raise BackboneError(f"{source!r}: no such file, and not in the Hugging Face cache {hub_cache()} (this "
                            f"machine may be offline: download it where the hub is reachable, e.g. `hf download "
                            f"{source}`, and copy the snapshot folder or set HF_HOME)")
    return folder


def random_backbone(
    name: str, device: str | torch.device = "auto", precision: str = "float32", seed: int = 0
) -> Backbone:
    """The real timm architecture ``name`` with random weights, for speed measurements only."""
    _check_dinov3_name(name)
    import timm

    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    model = model.to(device=torch_device, dtype=dtype).eval().requires_grad_(False)
    return Backbone(model, name, None, torch_device, dtype)


def _check_dinov3_name(name: str) -> None:
    import timm

    architecture = name.split(".")[0]
    if architecture not in timm.list_models("*dinov3*"):
        known = ", ".join(timm.list_models("*dinov3*"))
        raise BackboneError(
            f"{name!r} is neither an existing checkpoint file nor a timm DINOv3 model (known: {known})"
        )


def _from_timm_name(name: str) -> tuple[nn.Module, str, str]:
    _check_dinov3_name(name)
    import timm

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # hub errors come in many types (HTTP, offline, missing file)
        raise BackboneError(
            f"could not download the weights of timm model {name!r} ({type(err).__name__}: {err}); "
            "this machine may be offline: pass --weights PATH to a local DINOv3 checkpoint"
        ) from err
    tag = model.pretrained_cfg.get("tag") or "default"
    return model, name.split(".")[0], f"timm-{name.split('.')[0]}.{tag}"


def _from_transformers(folder: Path) -> tuple[nn.Module, str, str]:
    """A transformers DINOv3 snapshot, renamed into Meta's layout and built like a Meta checkpoint."""
    from .hf_weights import transformers_state, weight_files

    try:
        state, arguments = transformers_state(folder)
    except ValueError as err:
        raise BackboneError(str(err)) from None
    model, name = _meta_model(state, {**_META_DEFAULTS, **arguments}, folder, folder / "config.json")
    repository = folder.parent.parent.name if folder.parent.name == "snapshots" else folder.name
    digest = hashlib.sha256("".join(file_digest(path) for path in weight_files(folder)).encode()).hexdigest()[:16]
    return model, name, f"hf-{repository.removeprefix('models--')}-{digest}"


def _from_timm_safetensors(path: Path) -> tuple[nn.Module, str, str]:
    """DINOv3 weights in timm's own layout, the architecture read from their shapes."""
    import timm
    from timm.models.eva import checkpoint_filter_fn

    from .hf_weights import read_safetensors, timm_layout_arguments

    try:
        weights = read_safetensors(path)
        arguments = timm_layout_arguments(weights, path)
    except ValueError as err:
        raise BackboneError(str(err)) from None
    gated = arguments.pop("gated")
    name = DINOV3_MODELS.get((arguments["embed_dim"], gated), DINOV3_MODELS[(384, gated)])
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **arguments)
        missing, unexpected = model.load_state_dict(checkpoint_filter_fn(weights, model), strict=False)
    except (AssertionError, RuntimeError, TypeError, ValueError) as err:
        raise BackboneError(f"{path}: weights do not fit {name} ({_first_line(err)})") from None
    if missing or unexpected:
        raise BackboneError(f"{path}: weights do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, name, f"{path.stem}-{file_digest(path)}"


def _from_meta_checkpoint(path: Path) -> tuple[nn.Module, str, str]:
    state = _unwrap_state_dict(_load_tensors(path), path)
    from_weights = _arguments_from_weights(state, path)
    arguments = {**_META_DEFAULTS, **from_weights}
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        given = _read_sidecar(sidecar)
        for key in ("embed_dim", "depth", "patch_size", "n_storage_tokens"):
            if key in given and given[key] != from_weights[key]:
                raise BackboneError(f"{sidecar}: {key}={given[key]!r}, but the weights of {path.name} have {from_weights[key]}")
        arguments.update(given)
    if "num_heads" not in arguments:
        raise BackboneError(
            f"{path}: width {arguments['embed_dim']} is not a standard DINOv3 size; put Meta's "
            f"constructor arguments (num_heads, ...) in {sidecar}"
        )
    heads, width = arguments["num_heads"], arguments["embed_dim"]
    if not isinstance(heads, int) or heads < 1 or width % heads:
        raise BackboneError(f"{sidecar}: num_heads={heads!r} does not divide the width {width} of {path.name}")
    model, name = _meta_model(state, arguments, path, sidecar)
    return model, name, f"{path.stem}-{file_digest(path)}"


def _meta_model(state: dict, arguments: dict, path: Path, sidecar: Path) -> tuple[nn.Module, str]:
    """The timm model of Meta-layout weights ``state`` and Meta constructor ``arguments`` (from
    ``path``; ``sidecar``: where the user gives what the weights cannot tell)."""
    import timm
    from timm.layers import LayerNorm
    from timm.models.eva import checkpoint_filter_fn

    name, timm_arguments = _timm_arguments(arguments, path)
    try:
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            norm_layer=partial(LayerNorm, eps=_META_NORM_EPS[arguments["norm_layer"]]),
            **timm_arguments,
        )
    except (AssertionError, ArithmeticError, RuntimeError, TypeError, ValueError) as err:
        raise BackboneError(f"{path}: {name} cannot be built with {timm_arguments} ({_first_line(err)})") from None
    periods = state.get("rope_embed.periods")
    expected = model.rope.periods.float()
    if periods is not None and (periods.shape != expected.shape or not torch.allclose(periods.float(), expected, rtol=1e-4)):
        raise BackboneError(
            f"{path}: the checkpoint's RoPE periods differ from those of base "
            f"{arguments['pos_embed_rope_base']}; give Meta's constructor arguments in {sidecar.name}"
        )
    try:
        missing, unexpected = model.load_state_dict(checkpoint_filter_fn(state, model), strict=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise BackboneError(f"{path}: weights do not fit {name} ({_first_line(err)})") from None
    if missing or unexpected:
        raise BackboneError(
            f"{path}: weights do not fit {name} ({arguments['embed_dim']} wide, depth "
            f"{arguments['depth']}): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model, name


def _load_tensors(path: Path):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never pickled code."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):
        raise BackboneError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file "
                            f"starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        if "weights_only" in str(err):
            reason = "it holds Python objects besides tensors, and insid3 loads tensors only"
        else:
            reason = f"{type(err).__name__}: {_first_line(err)}"
        raise BackboneError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _unwrap_state_dict(state, path: Path) -> dict:
    for key in ("model", "teacher", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if isinstance(state, dict) and any(str(key).startswith("backbone.") for key in state):
        # a training checkpoint's teacher: backbone.<key> beside its heads (dino_head.*, ibot_head.*)
        state = {str(key).removeprefix("backbone."): value for key, value in state.items()
                 if str(key).startswith("backbone.")}
    if not isinstance(state, dict) or "cls_token" not in state or "storage_tokens" not in state:
        raise BackboneError(f"{path}: not a DINOv3 checkpoint in Meta's format (no cls_token/storage_tokens)")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise BackboneError(f"{path}: {key!r} holds a {type(value).__name__}, not a tensor")
    return state


_SIDECAR_TYPES = {
    "embed_dim": int, "depth": int, "num_heads": int, "patch_size": int, "n_storage_tokens": int,
    "ffn_ratio": float, "pos_embed_rope_base": float, "qkv_bias": bool, "norm_layer": str, "ffn_layer": str,
    "pos_embed_rope_normalize_coords": str, "untie_cls_and_patch_norms": bool,
    "untie_global_and_local_cls_norm": bool,
}


def _read_sidecar(sidecar: Path) -> dict:
    """Meta's constructor arguments from ``sidecar``, checked to be a JSON object of the right types."""
    try:
        arguments = json_value(sidecar.read_text(encoding="utf-8"))
    except ValueError as err:
        raise BackboneError(f"{sidecar}: invalid JSON ({err})") from None
    if not isinstance(arguments, dict):
        raise BackboneError(f"{sidecar}: must hold a JSON object of Meta's DinoVisionTransformer arguments, "
                            f"not a {type(arguments).__name__}")
    for key, kind in _SIDECAR_TYPES.items():
        if key not in arguments:
            continue
        value = arguments[key]
        number = kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number or type(value) is kind) or (kind is int and value < 1) or (number and not value > 0):
            expected = {int: "a positive integer", float: "a positive number", bool: "true or false", str: "a string"}
            raise BackboneError(f"{sidecar}: {key} must be {expected[kind]}, got {value!r}")
    return arguments


def _arguments_from_weights(state: dict, path: Path) -> dict:
    """Meta constructor arguments that the weights determine (64 channels per head assumed)."""
    try:
        return _read_architecture(state)
    except (KeyError, IndexError, ValueError) as err:
        missing = f"no {err.args[0]!r}" if isinstance(err, KeyError) else _first_line(err)
        raise BackboneError(f"{path}: not a DINOv3 checkpoint in Meta's format ({missing})") from None


def _read_architecture(state: dict) -> dict:
    blocks = [key.split(".")[1] for key in state if key.startswith("blocks.")]
    if not blocks:
        raise ValueError("no transformer blocks (blocks.N.*)")
    embed_dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(block) for block in blocks)
    swiglu = "blocks.0.mlp.w1.weight" in state
    hidden = state["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    arguments = {
        "embed_dim": embed_dim,
        "depth": depth,
        "patch_size": state["patch_embed.proj.weight"].shape[-1],
        "n_storage_tokens": state["storage_tokens"].shape[1],
        "ffn_layer": "swiglu" if swiglu else "mlp",
        "ffn_hidden": hidden,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
    }
    if embed_dim % 64 == 0:
        arguments["num_heads"] = embed_dim // 64
    return arguments


def _timm_arguments(arguments: dict, path: Path) -> tuple[str, dict]:
    """Translate Meta's ``DinoVisionTransformer`` arguments into timm ``Eva`` arguments."""
    unsupported = {
        "pos_embed_rope_normalize_coords": lambda v: v != "separate",
        "pos_embed_rope_min_period": lambda v: v is not None,
        "pos_embed_rope_max_period": lambda v: v is not None,
        "untie_cls_and_patch_norms": bool,
        "untie_global_and_local_cls_norm": bool,
        "norm_layer": lambda v: v not in _META_NORM_EPS,
        "ffn_layer": lambda v: v != "mlp" and v not in _META_SWIGLU_ALIGN,
    }
    for key, is_unsupported in unsupported.items():
        if key in arguments and is_unsupported(arguments[key]):
            raise BackboneError(f"{path}: Meta argument {key}={arguments[key]!r} is not supported")
    embed_dim = arguments["embed_dim"]
    swiglu = arguments["ffn_layer"] != "mlp"
    hidden = arguments.get("ffn_hidden") or int(embed_dim * arguments["ffn_ratio"])
    name = DINOV3_MODELS.get((embed_dim, swiglu), DINOV3_MODELS[(384, swiglu)])
    timm_arguments = {
        "embed_dim": embed_dim,
        "depth": arguments["depth"],
        "num_heads": arguments["num_heads"],
        "patch_size": arguments["patch_size"],
        "qkv_bias": arguments["qkv_bias"],
        "num_reg_tokens": arguments["n_storage_tokens"],
        "rope_temperature": float(arguments["pos_embed_rope_base"]),
        "mlp_ratio": hidden / embed_dim,
    }
    if swiglu:
        timm_arguments["swiglu_align_to"] = _META_SWIGLU_ALIGN[arguments["ffn_layer"]]
    return name, timm_arguments


def announce_smoke_test(backbone: Backbone, stream=None) -> None:
    """Print :data:`SMOKE_TEST_BANNER` (to ``stream``, default standard error) when ``backbone`` is
    the bundled random-weight test checkpoint; the one place the warning is written."""
    import sys

    if backbone.is_smoke_test:
        print(SMOKE_TEST_BANNER, file=stream or sys.stderr)
