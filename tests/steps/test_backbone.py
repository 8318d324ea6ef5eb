"""Loading DINOv3 backbones: Meta checkpoints (with and without sidecar), timm names, devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from insid3_core import BackboneError, load_backbone
from insid3_core.backbone import BUNDLED_CHECKPOINT, resolve_device, resolve_dtype


def meta_state_dict(embed_dim: int, depth: int, swiglu: bool, hidden: int, base: float = 100.0) -> dict:
    """Random weights under Meta's DINOv3 key names (head size 64, 4 storage tokens)."""
    head_dim = 64
    state = {
        "cls_token": torch.randn(1, 1, embed_dim),
        "storage_tokens": torch.randn(1, 4, embed_dim),
        "mask_token": torch.randn(1, embed_dim),
        "patch_embed.proj.weight": torch.randn(embed_dim, 3, 16, 16) * 0.02,
        "patch_embed.proj.bias": torch.randn(embed_dim) * 0.02,
        "rope_embed.periods": base ** (2 * torch.arange(head_dim // 4) / (head_dim // 2)),
        "norm.weight": torch.rand(embed_dim) + 0.5,
        "norm.bias": torch.randn(embed_dim) * 0.1,
    }
    mask = torch.ones(3 * embed_dim)
    mask[embed_dim : 2 * embed_dim] = 0
    for i in range(depth):
        block = {
            "norm1.weight": torch.rand(embed_dim) + 0.5,
            "norm1.bias": torch.randn(embed_dim) * 0.1,
            "attn.qkv.weight": torch.randn(3 * embed_dim, embed_dim) * 0.02,
            "attn.qkv.bias": torch.randn(3 * embed_dim) * 0.1,
            "attn.qkv.bias_mask": mask,
            "attn.proj.weight": torch.randn(embed_dim, embed_dim) * 0.02,
            "attn.proj.bias": torch.randn(embed_dim) * 0.1,
            "ls1.gamma": torch.rand(embed_dim),
            "norm2.weight": torch.rand(embed_dim) + 0.5,
            "norm2.bias": torch.randn(embed_dim) * 0.1,
            "ls2.gamma": torch.rand(embed_dim),
        }
        if swiglu:
            block |= {
                "mlp.w1.weight": torch.randn(hidden, embed_dim) * 0.02,
                "mlp.w1.bias": torch.randn(hidden) * 0.1,
                "mlp.w2.weight": torch.randn(hidden, embed_dim) * 0.02,
                "mlp.w2.bias": torch.randn(hidden) * 0.1,
                "mlp.w3.weight": torch.randn(embed_dim, hidden) * 0.02,
                "mlp.w3.bias": torch.randn(embed_dim) * 0.1,
            }
        else:
            block |= {
                "mlp.fc1.weight": torch.randn(hidden, embed_dim) * 0.02,
                "mlp.fc1.bias": torch.randn(hidden) * 0.1,
                "mlp.fc2.weight": torch.randn(embed_dim, hidden) * 0.02,
                "mlp.fc2.bias": torch.randn(embed_dim) * 0.1,
            }
        state |= {f"blocks.{i}.{key}": value for key, value in block.items()}
    return state


def test_bundled_checkpoint_keeps_nonzero_qkv_bias(tiny_backbone):
    state = torch.load(BUNDLED_CHECKPOINT, weights_only=True)
    stored = state["blocks.0.attn.qkv.bias"]
    attention = tiny_backbone.model.blocks[0].attn
    q_bias, _, v_bias = stored.chunk(3)
    assert q_bias.abs().sum() > 0 and v_bias.abs().sum() > 0
    assert torch.equal(attention.q_bias, q_bias)
    assert torch.equal(attention.v_bias, v_bias)
    assert tiny_backbone.is_smoke_test and tiny_backbone.embed_dim == 96
    assert tiny_backbone.num_prefix_tokens == 5
    assert tiny_backbone.default_svd_components() == 48


@pytest.mark.parametrize(
    "swiglu, hidden, expected",
    [(False, 1536, "vit_small_patch16_dinov3_qkvb"), (True, 1536, "vit_small_plus_patch16_dinov3_qkvb")],
)
def test_standard_width_meta_checkpoint_without_sidecar(tmp_path, swiglu, hidden, expected):
    path = tmp_path / "dinov3_vits16_pretrain_test.pth"
    torch.save(meta_state_dict(384, 2, swiglu, hidden), path)
    backbone = load_backbone(path, device="cpu")
    assert backbone.name == expected
    assert backbone.embed_dim == 384 and len(backbone.model.blocks) == 2
    assert backbone.model.blocks[0].attn.num_heads == 6
    assert backbone.default_svd_components() == 192
    assert not backbone.is_smoke_test
    assert backbone.identity.startswith("dinov3_vits16_pretrain_test-")
    with torch.inference_mode():
        tokens = backbone.model.forward_features(torch.zeros(1, 3, 64, 64))
    assert tokens.shape == (1, 5 + 16, 384)


def test_sidecar_overrides_weights(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(meta_state_dict(384, 1, False, 1536, base=50.0), path)
    with pytest.raises(BackboneError, match="RoPE periods"):
        load_backbone(path, device="cpu")
    (tmp_path / "odd.json").write_text(json.dumps({"pos_embed_rope_base": 50.0, "num_heads": 6}))
    assert load_backbone(path, device="cpu").model.rope.temperature == 50.0


def test_nonstandard_width_needs_sidecar(tmp_path):
    path = tmp_path / "tiny.pth"
    shutil.copy(BUNDLED_CHECKPOINT, path)
    with pytest.raises(BackboneError, match="sidecar|constructor arguments"):
        load_backbone(path, device="cpu")


def test_unsupported_meta_argument_is_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    shutil.copy(BUNDLED_CHECKPOINT, path)
    arguments = json.loads(BUNDLED_CHECKPOINT.with_suffix(".json").read_text())
    (tmp_path / "tiny.json").write_text(json.dumps(arguments | {"pos_embed_rope_normalize_coords": "max"}))
    with pytest.raises(BackboneError, match="pos_embed_rope_normalize_coords"):
        load_backbone(path, device="cpu")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "hostile.pth"
    torch.save({"cls_token": torch.zeros(1), "payload": BackboneError("not a tensor")}, path)
    with pytest.raises(BackboneError, match="not a readable PyTorch checkpoint") as refused:
        load_backbone(path, device="cpu")
    assert "loads tensors only" in str(refused.value) and "weights_only=False" not in str(refused.value)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda state, sidecar: {k: v for k, v in state.items() if not k.startswith("blocks.")}, "no transformer blocks"),
    (lambda state, sidecar: {k: v for k, v in state.items() if k != "patch_embed.proj.weight"}, "no 'patch_embed.proj.weight'"),
    (lambda state, sidecar: {**state, "cls_token": 3}, "'cls_token' holds a int, not a tensor"),
    (lambda state, sidecar: "a JSON string", "must hold a JSON object"),
    (lambda state, sidecar: [sidecar], "must hold a JSON object"),
    (lambda state, sidecar: {**sidecar, "num_heads": "three"}, "num_heads must be a positive integer"),
    (lambda state, sidecar: {**sidecar, "qkv_bias": "yes"}, "qkv_bias must be true or false"),
    (lambda state, sidecar: {**sidecar, "depth": 10_000}, "depth=10000, but the weights of tiny.pth have 4"),
    (lambda state, sidecar: {**sidecar, "ffn_layer": "swiglu999"}, "ffn_layer='swiglu999' is not supported"),
    (lambda state, sidecar: {**state, "blocks.0.attn.gate.weight": torch.zeros(2)}, "weights do not fit"),
])
def test_damaged_checkpoints_and_sidecars_name_the_file_and_the_problem(tmp_path, damage, message):
    """Each of these gave a bare Python error ("max() arg is an empty sequence", ...) or a traceback."""
    path = tmp_path / "tiny.pth"
    state = torch.load(BUNDLED_CHECKPOINT, weights_only=True)
    sidecar = json.loads(BUNDLED_CHECKPOINT.with_suffix(".json").read_text())
    damaged = damage(state, sidecar)
    torch.save(damaged if isinstance(damaged, dict) and "cls_token" in damaged else state, path)
    (tmp_path / "tiny.json").write_text(json.dumps(sidecar if isinstance(damaged, dict) and "cls_token" in damaged
                                                   else damaged))
    with pytest.raises(BackboneError, match="tiny") as refused:
        load_backbone(path, device="cpu")
    assert message in str(refused.value)


@pytest.mark.parametrize("wrapper", ["model", "teacher", "state_dict"])
def test_a_training_checkpoint_wrapping_the_weights_gives_the_same_features(tmp_path, wrapper):
    """Meta's training code saves ``{"teacher": {"backbone.<key>": ..., "dino_head.<key>": ...}, ...}``
    beside other entries; the backbone's weights are taken from inside, the heads left out."""
    from insid3_core.features import patch_features

    state = torch.load(BUNDLED_CHECKPOINT, weights_only=True)
    path = tmp_path / "tiny.pth"
    heads = {"dino_head.mlp.0.weight": torch.zeros(4, 4), "ibot_head.last_layer.weight": torch.zeros(4, 4)}
    torch.save({wrapper: {**{f"backbone.{key}": value for key, value in state.items()}, **heads},
                "iteration": torch.tensor(7)}, path)
    shutil.copy(BUNDLED_CHECKPOINT.with_suffix(".json"), tmp_path / "tiny.json")
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    wrapped = patch_features(load_backbone(path, device="cpu"), pixels)
    torch.testing.assert_close(wrapped, patch_features(load_backbone(BUNDLED_CHECKPOINT, device="cpu"), pixels),
                               rtol=0, atol=0)


def test_not_a_dinov3_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(BackboneError, match="not a DINOv3 checkpoint"):
        load_backbone(path, device="cpu")


def test_timm_name_offline_says_how_to_proceed():
    """A fresh process, since the hub reads HF_HUB_OFFLINE when first imported."""
    code = (
        "from insid3_core import BackboneError, load_backbone\n"
        "try:\n    load_backbone('vit_small_patch16_dinov3_qkvb.lvd1689m', device='cpu')\n"
        "except BackboneError as err:\n    print(err)\n"
    )
    environment = os.environ | {"HF_HUB_OFFLINE": "1"}
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment).stdout
    assert "could not download the weights of timm model" in output and "--weights PATH" in output


def test_unknown_name_lists_known_models():
    with pytest.raises(BackboneError, match="vit_large_patch16_dinov3"):
        load_backbone("no_such_model", device="cpu")


def test_device_and_precision_validation():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(BackboneError, match="half precision"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(BackboneError, match="precision must be"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="CUDA is not available"):
            resolve_device("cuda")
