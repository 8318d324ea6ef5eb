"""DINOv3 weights as Hugging Face ships them: transformers snapshots and timm-layout safetensors.

* A transformers snapshot (``facebook/dinov3-vitl16-pretrain-lvd1689m``): a folder holding
  ``config.json`` (``model_type`` ``dinov3_vit``) and ``model.safetensors`` (or shards listed in
  ``model.safetensors.index.json``). :func:`transformers_state` reads the architecture from the
  config and renames the weights into Meta's layout, which :mod:`insid3_core.backbone` already
  turns into timm's. A repo id given offline is looked up in the Hugging Face cache
  (``HF_HOME/hub/models--<org>--<name>/snapshots/<revision>/``) by :func:`snapshot_folder`.
* A single ``.safetensors`` file with timm's own parameter names (timm's hub releases):
  :func:`timm_layout_arguments` reads the architecture from its shapes.

Written here because transformers' and timm's DINOv3 implementations share no converter; the
renaming follows transformers' ``convert_dinov3_vit_to_hf.py`` in reverse.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .io import json_value

HF_MODEL_TYPE = "dinov3_vit"
_NORM_LAYERS = {1e-5: "layernormbf16", 1e-6: "layernorm"}  # Meta's norm_layer names by epsilon
_LAYER_MODULES = {  # transformers -> Meta, inside layer.N (saved files) / blocks.N
    "norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_MLP_MODULES = {False: {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"},
                True: {"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"}}


def snapshot_folder(source: str) -> Path | None:
    """The transformers snapshot ``source`` names: a folder with a ``config.json``, or a repo id
    (``org/name``) already in the Hugging Face cache; ``None`` when it is neither."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path if (path / "config.json").is_file() else None
    if source.count("/") != 1 or path.exists():
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True, cache_dir=hub_cache()))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def hub_cache() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub`` (default
    ``~/.cache/huggingface/hub``), read when called."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser() / "hub"


def transformers_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Meta-layout weights and Meta ``DinoVisionTransformer`` arguments of a transformers snapshot.

    Raises ``ValueError`` naming the folder when its config is not a DINOv3 ViT or asks for what
    Meta's architecture does not have.
    """
    config = _read_config(folder)
    if (model_type := config.get("model_type")) != HF_MODEL_TYPE:
        described = "names no model_type" if model_type is None else f"describes a {model_type!r} model"
        raise ValueError(f"{folder}: config.json {described}, not DINOv3 (model_type {HF_MODEL_TYPE!r})")
    gated = bool(config.get("use_gated_mlp", False))
    expected_act = "silu" if gated else "gelu"
    if config.get("hidden_act", "gelu") != expected_act:
        raise ValueError(f"{folder}: hidden_act {config.get('hidden_act')!r} is not DINOv3's {expected_act!r}")
    epsilon = config.get("layer_norm_eps", 1e-5)
    if epsilon not in _NORM_LAYERS:
        raise ValueError(f"{folder}: layer_norm_eps {epsilon} is none of DINOv3's (1e-5, 1e-6)")
    weights = _read_weights(folder)
    try:
        arguments = _meta_arguments(config, gated, epsilon)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder}: config.json lacks or mistypes a DINOv3 field ({err})") from None
    try:
        return _meta_layout(weights, arguments["depth"], gated, arguments["qkv_bias"], folder), arguments
    except KeyError as err:
        raise ValueError(f"{folder}: no {err.args[0]!r} among its weights: not a DINOv3 ViT snapshot") from None


def _meta_layout(weights: dict[str, torch.Tensor], depth: int, gated: bool, biased: bool,
                 folder: Path) -> dict[str, torch.Tensor]:
    """The transformers weights under Meta's names (q, k, v joined into qkv, a missing k bias as zeros)."""
    state = {"cls_token": weights["embeddings.cls_token"],
             "storage_tokens": weights["embeddings.register_tokens"],
             "patch_embed.proj.weight": weights["embeddings.patch_embeddings.weight"],
             "patch_embed.proj.bias": weights["embeddings.patch_embeddings.bias"],
             "norm.weight": weights["norm.weight"], "norm.bias": weights["norm.bias"]}
    modules = {**_LAYER_MODULES, **_MLP_MODULES[gated]}
    weights = {key.removeprefix("model."): value for key, value in weights.items()}  # transformers 5 in memory
    for key, value in weights.items():
        if not key.startswith("layer."):
            continue
        _, layer, rest = key.split(".", 2)
        module, _, kind = rest.rpartition(".")
        if module in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
            continue  # joined into qkv below
        if rest in modules:  # the layer scales: a parameter, not a module
            state[f"blocks.{layer}.{modules[rest]}"] = value
        elif module in modules:
            state[f"blocks.{layer}.{modules[module]}.{kind}"] = value
        else:
            raise ValueError(f"{folder}: unexpected weight {key!r} for a DINOv3 ViT")
    for layer in range(depth):
        source = f"layer.{layer}.attention."
        projections = [weights[f"{source}{name}_proj.weight"] for name in "qkv"]
        state[f"blocks.{layer}.attn.qkv.weight"] = torch.cat(projections)
        if biased:
            state[f"blocks.{layer}.attn.qkv.bias"] = torch.cat([
                weights.get(f"{source}{name}_proj.bias", torch.zeros(projections[0].shape[0])) for name in "qkv"])
    return state


def _meta_arguments(config: dict, gated: bool, epsilon: float) -> dict:
    """Meta ``DinoVisionTransformer`` arguments of a transformers config."""
    biased = any(config.get(name, True) for name in ("query_bias", "key_bias", "value_bias"))
    return {
        "embed_dim": int(config["hidden_size"]), "depth": int(config["num_hidden_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "patch_size": int(config.get("patch_size", 16)), "n_storage_tokens": int(config.get("num_register_tokens", 0)),
        "ffn_layer": "swiglu" if gated else "mlp", "ffn_hidden": int(config["intermediate_size"]),
        "qkv_bias": biased, "pos_embed_rope_base": float(config.get("rope_theta", 100.0)),
        "norm_layer": _NORM_LAYERS[epsilon],
    }


def timm_layout_arguments(weights: dict[str, torch.Tensor], where: Path) -> dict:
    """The timm ``Eva`` arguments of DINOv3 weights in timm's own layout (64 channels per head
    assumed, as in every DINOv3 release); ``ValueError`` naming ``where`` otherwise."""
    try:
        embed_dim = weights["cls_token"].shape[-1]
        depth = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("blocks."))
        gated = "blocks.0.mlp.fc1_g.weight" in weights
        hidden = weights["blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
        arguments = {
            "embed_dim": embed_dim, "depth": depth, "num_heads": embed_dim // 64,
            "patch_size": weights["patch_embed.proj.weight"].shape[-1],
            "num_reg_tokens": weights["reg_token"].shape[1] if "reg_token" in weights else 0,
            "qkv_bias": "blocks.0.attn.q_bias" in weights or "blocks.0.attn.qkv.bias" in weights,
            "mlp_ratio": hidden / embed_dim,
        }
    except (KeyError, IndexError, ValueError) as err:
        missing = f"no {err.args[0]!r}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{where}: not DINOv3 weights in timm's layout ({missing})") from None
    if embed_dim % 64:
        raise ValueError(f"{where}: width {embed_dim} is not a multiple of DINOv3's 64 channels per head")
    return {**arguments, "gated": gated}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one ``.safetensors`` file; ``ValueError`` naming it when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _read_config(folder: Path) -> dict:
    try:
        config = json_value((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: config.json is not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder}: config.json must hold a JSON object")
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, or of the shards its index lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json_value(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors index ({err})") from None
        weights = {}
        for shard in shards:
            weights.update(read_safetensors(folder / Path(shard).name))
        return weights
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder}: no model.safetensors (PyTorch .bin snapshots are not read: they unpickle code)")
    return read_safetensors(folder / "model.safetensors")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a snapshot, for its identity digest."""
    return sorted(folder.glob("*.safetensors"))
