"""Encoder registry, the offline default's weights, Encoder.forward, weights=, licence warnings, errors."""

from __future__ import annotations

import dataclasses
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import stdistill as sd
from stdistill import StdistillError
from stdistill.encoders import EncoderSpec, LicenceWarning
from stdistill.encoders import _load as L


def _tiny_module(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))


@pytest.fixture
def tiny():
    name = "test-tiny-enc"
    sd.encoders.register_module(name, _tiny_module(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_px=32, dim=16,
                                overwrite=True)
    yield name
    sd.encoders.unregister(name)


# ------------------------------------------------------------------ registry

def test_registry_has_the_required_entries_with_facts():
    df = sd.encoders.list_encoders()
    for name in ("uni", "uni2-h", "h-optimus-0", "h-optimus-1", "virchow2", "conch", "resnet50-imagenet", "effnet-lite0-imagenet"):
        assert name in df.index
    assert {"dim", "licence", "gated", "usable_offline", "restricts_derivatives"} <= set(df.columns)
    assert df.loc["effnet-lite0-imagenet", "usable_offline"] and df.loc["effnet-lite0-imagenet", "dim"] == 1280
    assert "not a pathology model" in sd.encoders.get_spec("effnet-lite0-imagenet").notes.lower()
    assert df.loc["uni", "restricts_derivatives"] and df.loc["uni2-h", "restricts_derivatives"]
    assert df.loc["uni", "licence"] == df.loc["uni2-h", "licence"] == "CC-BY-NC-ND-4.0"
    assert df.loc["h-optimus-0", "licence"] == "Apache-2.0" and not df.loc["h-optimus-0", "restricts_derivatives"]
    assert df.loc["virchow2", "dim"] == 2560 and sd.encoders.get_spec("virchow2").pooling == "cls+mean_patch"
    assert df.loc["uni2-h", "dim"] == 1536 and df.loc["conch", "dim"] == 512
    assert sd.encoders.get_spec("resnet50-imagenet").model_id == "resnet50.tv_in1k"


def test_spec_is_frozen_and_validated():
    spec = sd.encoders.get_spec("uni")
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'dim'"):
        spec.dim = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.kwargs["init_values"] = 1.0  # read-only mapping
    with pytest.raises(StdistillError, match="pooling"):
        EncoderSpec(name="x", source="timm", model_id="resnet18", pooling="max")  # type: ignore[arg-type]
    with pytest.raises(StdistillError, match="hf-hub:ORG/NAME"):
        EncoderSpec(name="x", source="hf-hub", model_id="MahmoodLab/uni")


def test_unknown_and_duplicate_names(tiny):
    with pytest.raises(StdistillError, match="unknown encoder 'nope'.*effnet-lite0-imagenet"):
        sd.encoders.get_spec("nope")
    with pytest.raises(StdistillError, match="already registered"):
        sd.encoders.register_module(tiny, _tiny_module(), mean=(0, 0, 0), std=(1, 1, 1), input_px=32, dim=16)


def test_register_timm_reads_config_and_dim():
    spec = sd.encoders.register_timm("test-resnet18", "resnet18", licence="Apache-2.0", overwrite=True)
    try:
        assert spec.dim == 512 and spec.input_px == 224 and spec.mean == pytest.approx((0.485, 0.456, 0.406))
        assert "test-resnet18" in sd.encoders.list_encoders().index
        with pytest.raises(StdistillError, match="pass dim="):
            sd.encoders.register_timm("test-hub", "hf-hub:org/model")
    finally:
        sd.encoders.unregister("test-resnet18")


# ------------------------------------------------------------------ the offline default

def test_effnet_package_weights_map_one_to_one_onto_timm():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(L.effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    mapped = L.effnet_lite0_state_dict(model)
    assert len(src) == len(mapped) == len(model.state_dict()) == 296
    for (ks, vs), (kd, vd) in zip(src.items(), mapped.items()):
        assert vs.shape == vd.shape and torch.equal(vs, vd), (ks, kd)


def test_effnet_imagenet_head_recognises_natural_images():
    """The mapped weights are the real ImageNet model: a cat is a cat, an espresso an espresso."""
    import timm
    from PIL import Image
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(L.effnet_lite0_state_dict(model))
    cats = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat
    for img, want in ((data.chelsea(), cats), (data.coffee(), {967})):  # 967: espresso
        x = torch.from_numpy(np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC)).copy())
        x = (x.permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        with torch.inference_mode():
            top = int(model(x).argmax())
        assert top in want, top


def test_default_encoder_forward_uint8_float_resize():
    enc = sd.encoders.load("effnet-lite0-imagenet")
    assert isinstance(enc.backbone, nn.Module) and enc.dim == 1280 and not enc.training
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=g)
    with torch.inference_mode():
        a = enc(x8)
        b = enc(x8.float() / 255)
        c = enc(x8[:, :, :112, :112])  # resized to 224 inside
    assert a.shape == (2, 1280) and a.dtype == torch.float32 and c.shape == (2, 1280)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(c).all()
    with pytest.raises(StdistillError, match=r"RGB in \[0, 1\]"):
        enc(x8.float())  # 0-255 floats
    with pytest.raises(StdistillError, match=r"\(B, 3, H, W\)"):
        enc(x8[:, :1])


# ------------------------------------------------------------------ user modules and weights=

def test_register_module_forward_and_weights_files(tmp_path, tiny):
    from safetensors.torch import save_file

    enc = sd.encoders.load(tiny)
    x = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    other = _tiny_module(seed=1)
    save_file(other.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(other.state_dict(), tmp_path / "w.pt")
    ref = nn.Sequential(*other).eval()
    with torch.inference_mode():
        xin = torch.nn.functional.interpolate(x.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
        want = ref((xin - 0.5) / 0.25)
        for f in ("w.safetensors", "w.pt"):
            got = sd.encoders.load(tiny, weights=tmp_path / f)(x)
            torch.testing.assert_close(got, want)
        assert not torch.allclose(enc(x), want)
    assert sd.encoders.load(tiny, weights=tmp_path / "w.pt").weights_digest != enc.weights_digest
    # an Encoder's own state_dict() ("backbone." keys) loads back, also for the default encoder
    default = sd.encoders.load("effnet-lite0-imagenet")
    torch.save(default.state_dict(), tmp_path / "effnet.pt")
    again = sd.encoders.load("effnet-lite0-imagenet", weights=tmp_path / "effnet.pt")
    with torch.inference_mode():
        torch.testing.assert_close(again(x), default(x))


def test_weights_are_never_unpickled(tmp_path, tiny):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"w": Evil()}, fh, protocol=2)
    with pytest.raises(StdistillError, match="cannot read weights safely"):
        sd.encoders.load(tiny, weights=tmp_path / "evil.pt")
    torch.save({"0.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(StdistillError, match="do not fit"):
        sd.encoders.load(tiny, weights=tmp_path / "bad.pt")
    with pytest.raises(StdistillError, match="does not exist"):
        sd.encoders.load(tiny, weights=tmp_path / "absent.safetensors")


def test_wrong_dim_in_spec_is_reported():
    sd.encoders.register_module("test-wrong-dim", _tiny_module(), mean=(0, 0, 0), std=(1, 1, 1), input_px=32, dim=99,
                                overwrite=True)
    try:
        with pytest.raises(StdistillError, match="dim=99"):
            sd.encoders.load("test-wrong-dim")(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    finally:
        sd.encoders.unregister("test-wrong-dim")


# ------------------------------------------------------------------ licences and errors

def test_licence_warning_once_for_restricted_encoders(monkeypatch):
    monkeypatch.setattr(L, "_WARNED", set())
    with pytest.warns(LicenceWarning, match="CC-BY-NC-ND-4.0.*derivatives"):
        with pytest.raises(StdistillError):
            sd.encoders.load("uni")  # offline: fails after warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", LicenceWarning)
        with pytest.raises(StdistillError):
            sd.encoders.load("uni")  # no second warning
        sd.encoders.load("effnet-lite0-imagenet")  # Apache-2.0: never warns


@pytest.mark.parametrize("name", ["uni", "uni2-h", "virchow2", "resnet50-imagenet"])
def test_offline_without_weights_gives_one_clear_error(name, tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True, raising=False)
    spec = sd.encoders.get_spec(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LicenceWarning)
        with pytest.raises(StdistillError) as e:
            sd.encoders.load(name)
    msg = str(e.value)
    assert name in msg and spec.hub_id in msg and "\n" not in msg
    assert "not in the local hub cache" in msg and "weights=" in msg and "huggingface-cli login" in msg


def test_gated_and_unauthorised_hub_errors_are_explained():
    import httpx2
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    spec = sd.encoders.get_spec("uni2-h")
    resp = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co/MahmoodLab/UNI2-h"))
    msg = str(L.explain_hub_error(spec, GatedRepoError("Access to model MahmoodLab/UNI2-h is restricted", response=resp)))
    assert "gated" in msg and "accept the terms on https://huggingface.co/MahmoodLab/UNI2-h" in msg
    assert "huggingface-cli login" in msg and "weights=" in msg
    msg = str(L.explain_hub_error(spec, RepositoryNotFoundError("401 Client Error", response=resp)))
    assert "not logged in" in msg and "huggingface-cli login" in msg


def test_conch_without_package_names_the_install_command():
    try:
        import conch  # noqa: F401
        pytest.skip("the conch package is installed here")
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LicenceWarning)
        with pytest.raises(StdistillError, match="pip install git\\+https://github.com/mahmoodlab/CONCH.git"):
            sd.encoders.load("conch")
