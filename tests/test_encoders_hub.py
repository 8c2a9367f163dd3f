"""The real ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` path, offline.

A hand-made Hugging Face cache (``models--ORG--NAME/snapshots/<sha>/{config.json,
model.safetensors}`` + ``refs/main``) holds tiny random models of the same families as the
registry's hub entries; ``HF_HUB_CACHE`` points at it and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import stdistill as sd
from stdistill._utils import file_digest
from stdistill.encoders import EncoderSpec, LicenceWarning
from stdistill.encoders import _load as L

SHA = "0123456789abcdef0123456789abcdef01234567"

# UNI's family (timm vit_large_patch16_224), shrunk to one block with a narrow MLP; the spec's
# own kwargs (init_values, dynamic_img_size) still apply, and its 1024-d output is kept.
UNI_TINY_ARGS = {"depth": 1, "mlp_ratio": 0.25}

TINY_VIRCHOW_KW = {
    "img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": 1e-5,
    "num_classes": 0, "mlp_ratio": 2.0, "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True,
    "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU",
}


def make_hub_model(cache, repo_id: str, architecture: str, model_args: dict, spec_kwargs: dict, seed: int = 0):
    """Write a random timm model into a local hub cache in the layout huggingface_hub reads."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, **{**model_args, **L._resolve_kwargs(spec_kwargs),
                                                                 "num_classes": 0}).eval()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / SHA
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "model_args": model_args,
        "pretrained_cfg": {"tag": "test", "input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225], "num_classes": 0},
    }
    (snap / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "model.safetensors"))
    return model, snap / "model.safetensors"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))  # read at import time by huggingface_hub
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True, raising=False)
    return cache


def _patches(n=2, px=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)


def test_uni_loads_through_timm_hub_path_from_local_cache(hub_cache):
    spec = sd.encoders.get_spec("uni")
    ref, wfile = make_hub_model(hub_cache, "MahmoodLab/uni", "vit_large_patch16_224", UNI_TINY_ARGS, dict(spec.kwargs))
    assert sd.encoders.list_encoders().loc["uni", "usable_offline"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LicenceWarning)
        enc = sd.encoders.load("uni")
    assert len(enc.backbone.blocks) == 1  # the hand-made weights, not a random full-size model
    assert enc.weights_digest == file_digest(wfile)
    x = _patches()
    with torch.inference_mode():
        got = enc(x)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        want = ref((x.float() / 255 - mean) / std)
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, want)


def test_cls_mean_patch_pooling_and_weights_path(hub_cache, tmp_path):
    sd.encoders.register(EncoderSpec(
        name="test-tiny-virchow", source="hf-hub", model_id="hf-hub:test-org/tiny-virchow", arch="vit_base_patch16_224",
        kwargs=TINY_VIRCHOW_KW, input_px=32, pooling="cls+mean_patch", dim=64, licence="test",
    ), overwrite=True)
    try:
        ref, wfile = make_hub_model(hub_cache, "test-org/tiny-virchow", "vit_base_patch16_224", {}, TINY_VIRCHOW_KW)
        enc = sd.encoders.load("test-tiny-virchow")
        x = _patches(3, 32)
        with torch.inference_mode():
            got = enc(x)
            tokens = ref.forward_features((x.float() / 255 - enc.mean) / enc.std)
            assert tokens.shape[1] == 1 + 4 + 4  # class token, 4 registers, 2x2 patches
            want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
            torch.testing.assert_close(got, want)
            # the same weights given as a local file, no hub involved
            got2 = sd.encoders.load("test-tiny-virchow", weights=wfile)(x)
        torch.testing.assert_close(got2, want)
    finally:
        sd.encoders.unregister("test-tiny-virchow")


def test_hub_cache_env_vars_in_a_fresh_process(tmp_path):
    """What a user does: HF_HUB_CACHE=<dir> HF_HUB_OFFLINE=1, nothing patched."""
    cache = tmp_path / "hub"
    cache.mkdir()
    make_hub_model(cache, "MahmoodLab/uni", "vit_large_patch16_224", UNI_TINY_ARGS,
                   dict(sd.encoders.get_spec("uni").kwargs))
    code = (
        "import warnings, torch, stdistill as sd\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    e = sd.encoders.load('uni')\n"
        "print('warned', any('CC-BY-NC-ND' in str(x.message) for x in w))\n"
        "print('blocks', len(e.backbone.blocks), 'dim', e(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape[1])\n"
        "try:\n"
        "    sd.encoders.load('uni2-h')\n"
        "except sd.StdistillError as err:\n"
        "    print('error', err)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warned True" in out.stdout
    assert "blocks 1 dim 1024" in out.stdout
    assert "error cannot load encoder 'uni2-h' (MahmoodLab/UNI2-h): the weights are not in the local hub cache" in out.stdout
