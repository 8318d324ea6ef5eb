"""DINOv3 weights as Hugging Face ships them: a transformers snapshot (folder or cached repo id)
and a timm-layout safetensors file give the features of their own implementations."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import EXAMPLES
from insid3_core import BackboneError, load_backbone
from insid3_core.backbone import check_source
from insid3_core.features import normalise, patch_features, resized_pixels
from insid3_core.io import load_image

transformers = pytest.importorskip("transformers")

REGISTERS = 4


def tiny_config(**changes):
    """A small DINOv3 ViT: 128 wide (two heads of 64), 2 layers, 4 registers."""
    values = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                  num_register_tokens=REGISTERS, image_size=64, layerscale_value=0.5)
    return transformers.DINOv3ViTConfig(**{**values, **changes})


def saved_model(folder, **changes):
    """A tiny ``DINOv3ViTModel`` with random weights (non-trivial layer scales and biases), saved
    with ``save_pretrained``."""
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(tiny_config(**changes)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lambda1" in name or name.endswith("bias"):
                parameter.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def pixels():
    """The example scenes at 128 px, ``(4, 3, 128, 128)`` uint8."""
    targets = sorted((EXAMPLES / "targets").glob("*.png"))[:4]
    return torch.stack([resized_pixels(load_image(target), 128) for target in targets])


def transformers_features(model, pixels) -> torch.Tensor:
    """transformers' own forward: the final-norm patch tokens, L2-normalised."""
    with torch.no_grad():
        hidden = model(pixel_values=normalise(pixels)).last_hidden_state
    return F.normalize(hidden[:, 1 + REGISTERS:], dim=-1)


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_a_transformers_snapshot_gives_transformers_features(tmp_path, pixels, gated):
    changes = {"use_gated_mlp": True, "hidden_act": "silu"} if gated else {}
    model = saved_model(tmp_path / "dinov3-tiny", **changes)
    backbone = load_backbone(tmp_path / "dinov3-tiny", device="cpu")
    ours = patch_features(backbone, pixels)
    theirs = transformers_features(model, pixels)
    difference = (ours - theirs).abs().max().item()
    print(f"\nmax feature difference to transformers ({'swiglu' if gated else 'mlp'}): {difference:.2e}")
    assert difference < 1e-4
    assert backbone.identity.startswith("hf-dinov3-tiny-") and not backbone.is_smoke_test


def test_a_repo_id_is_found_in_the_hugging_face_cache_offline(tmp_path, monkeypatch, pixels):
    model = saved_model(tmp_path / "saved")
    snapshot = tmp_path / "hf" / "hub" / "models--facebook--dinov3-tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tmp_path / "saved", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_source("facebook/dinov3-tiny")
    backbone = load_backbone("facebook/dinov3-tiny", device="cpu")
    assert (patch_features(backbone, pixels) - transformers_features(model, pixels)).abs().max() < 1e-4
    assert backbone.identity.startswith("hf-facebook--dinov3-tiny-")
    with pytest.raises(BackboneError, match="'facebook/dinov3-absent': no such file, and not in the Hugging Face cache"):
        load_backbone("facebook/dinov3-absent", device="cpu")


def test_a_config_that_is_not_dinov3_is_refused_naming_the_folder(tmp_path):
    saved_model(tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    with pytest.raises(BackboneError, match=f"{tmp_path / 'other'}: config.json describes a 'vit' model, not DINOv3"):
        load_backbone(tmp_path / "other", device="cpu")
    (tmp_path / "other" / "config.json").write_text(json.dumps({}))
    with pytest.raises(BackboneError, match="config.json names no model_type, not DINOv3"):
        load_backbone(tmp_path / "other", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="a folder without config.json"):
        load_backbone(tmp_path / "empty", device="cpu")
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BackboneError, match="model.safetensors: not a readable safetensors file"):
        load_backbone(tmp_path / "other", device="cpu")


def test_a_sharded_snapshot_is_read_through_its_index(tmp_path, pixels):
    """Large DINOv3 checkpoints ship as shards listed by ``model.safetensors.index.json``; a
    PyTorch ``.bin`` snapshot is refused (unpickling runs code) and a broken index is named."""
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(tiny_config()).eval()
    folder = tmp_path / "dinov3-sharded"
    model.save_pretrained(folder, max_shard_size="200KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2 and not (folder / "model.safetensors").exists()
    backbone = load_backbone(folder, device="cpu")
    assert (patch_features(backbone, pixels) - transformers_features(model, pixels)).abs().max() < 1e-4

    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(BackboneError, match="model.safetensors.index.json: not a safetensors index"):
        load_backbone(folder, device="cpu")
    pickled = tmp_path / "dinov3-bin"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(BackboneError, match="no model.safetensors \\(PyTorch .bin snapshots are not read"):
        load_backbone(pickled, device="cpu")


def test_a_timm_layout_safetensors_file_gives_the_same_features(tmp_path, pixels):
    from safetensors.torch import save_file

    import timm

    from insid3_core.backbone import Backbone

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, depth=2).eval()
    original = Backbone(model, "vit_small_patch16_dinov3_qkvb", None, torch.device("cpu"), torch.float32)
    save_file({name: value.contiguous() for name, value in model.state_dict().items()}, tmp_path / "tiny_timm.safetensors")
    loaded = load_backbone(tmp_path / "tiny_timm.safetensors", device="cpu")
    np.testing.assert_array_equal(patch_features(loaded, pixels).numpy(), patch_features(original, pixels).numpy())
    assert loaded.name == original.name and len(loaded.model.blocks) == 2
    save_file({"weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(BackboneError, match="other.safetensors: not DINOv3 weights in timm's layout"):
        load_backbone(tmp_path / "other.safetensors", device="cpu")


def test_insid3_segment_runs_on_a_transformers_snapshot(tmp_path):
    from insid3_core.cli import main

    saved_model(tmp_path / "dinov3-tiny")
    out = tmp_path / "out"
    reference = [str(EXAMPLES / "reference" / "disks.png"), str(EXAMPLES / "reference" / "disks_mask.png")]
    assert main(["segment", "--ref", *reference, "--weights", str(tmp_path / "dinov3-tiny"), "--device", "cpu",
                 "--image-size", "128", "--out", str(out), str(EXAMPLES / "targets")]) == 0
    document = json.loads((out / "annotations.json").read_text())
    assert len(document["images"]) == 8 and document["info"]["weights"].startswith("hf-dinov3-tiny-")
