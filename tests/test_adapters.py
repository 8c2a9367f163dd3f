"""Shared adapters: cuts, peft targets, exact trunk/tail split, the bounded trunk cache."""

import numpy as np
import pytest
import torch
from torch import nn

import stdistill as sd
from stdistill import StdistillError
from stdistill.adapters import (
    AdapterConfig,
    Pointwise,
    Tail,
    adapter_targets,
    add_adapter,
    default_train_from,
    parse_cut,
    trunk,
)

from conftest import TINY_EFF as EFF, TINY_VIT as VIT

pytestmark = pytest.mark.usefixtures("tiny_encoders")


def test_pointwise_is_exact():
    conv = nn.Conv2d(8, 5, 1, bias=True)
    x = torch.randn(2, 8, 3, 4)
    torch.testing.assert_close(Pointwise(conv)(x), conv(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(StdistillError, match="1x1"):
        Pointwise(nn.Conv2d(8, 5, 3))


def test_miss_cannot_wrap_conv2d_so_convs_become_linear():
    """peft's MiSS supports nn.Linear only; that is why PEKA rewrites 1x1 convolutions."""
    import peft

    m = nn.Sequential(nn.Conv2d(4, 4, 1))
    with pytest.raises((TypeError, ValueError)):
        peft.inject_adapter_in_model(peft.MissConfig(r=2, target_modules=["0"]), m)


def test_targets_per_architecture():
    eff = sd.encoders.load(EFF).backbone
    assert default_train_from(eff) == "blocks.6.0.conv_pwl"
    assert adapter_targets(eff) == ["blocks.6.0.conv_pwl", "conv_head"]
    t5 = adapter_targets(eff, "blocks.5")
    assert "blocks.5.0.conv_pw" in t5 and "blocks.6.0.conv_pwl" in t5 and "blocks.4.0.conv_pw" not in t5
    vit = sd.encoders.load(VIT).backbone
    assert default_train_from(vit) == "blocks.2"
    assert adapter_targets(vit) == ["blocks.2.attn.qkv"]
    assert adapter_targets(vit, "blocks.0") == [f"blocks.{i}.attn.qkv" for i in range(3)]
    with pytest.raises(StdistillError, match="not a cut"):
        adapter_targets(vit, "layer3")
    with pytest.raises(StdistillError, match="skip"):
        parse_cut(eff, "blocks.5.1.conv_pwl")  # that block has a residual connection


@pytest.mark.parametrize("enc_name,cut", [(EFF, None), (EFF, "blocks.5"), (EFF, "blocks.4.1"), (EFF, "blocks.0"), (EFF, "input"), (VIT, None), (VIT, "blocks.0"),
                                          (VIT, "blocks.1"), (VIT, "input")])
def test_trunk_then_tail_equals_encoder(enc_name, cut):
    enc = sd.encoders.load(enc_name).eval()
    x = torch.randint(0, 255, (3, 3, 40, 40), dtype=torch.uint8)
    c = parse_cut(enc.backbone, cut)
    with torch.no_grad():
        ref = enc(x)
        out = Tail(enc, c).eval()(trunk(enc, c, x))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("adapter,init", [("miss", True), ("miss", "bat"), ("lora", True)])
def test_adapter_only_trainable_and_starts_at_identity(adapter, init):
    import copy

    frozen = sd.encoders.load(EFF).eval()
    enc = copy.deepcopy(frozen)
    cfg = AdapterConfig(adapter=adapter, rank=32 if init == "bat" else 16, miss_init=init)
    info = add_adapter(enc.backbone, cfg)
    trainable = [n for n, p in enc.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(("miss_" in n) or ("lora_" in n) for n in trainable)
    assert info["n_trainable"] == sum(p.numel() for p in enc.backbone.parameters() if p.requires_grad)
    assert 0 < info["share"] < 0.1
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), frozen(x), rtol=1e-4, atol=1e-4)




def test_trunk_matches_timm_forward_intermediates_at_boundaries():
    """Where timm exposes the cut (block / stage ends), the trunk is exactly its intermediate."""
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    vit = sd.encoders.load(VIT).eval()
    eff = sd.encoders.load(EFF).eval()
    with torch.no_grad():
        (ref,) = vit.backbone.forward_intermediates(vit.preprocess(x), indices=[1], intermediates_only=True, output_fmt="NLC")
        got = trunk(vit, parse_cut(vit.backbone, "blocks.2"), x)
        n_prefix = vit.backbone.num_prefix_tokens
        torch.testing.assert_close(got[:, n_prefix:], ref)
        (ref,) = eff.backbone.forward_intermediates(eff.preprocess(x), indices=[5], intermediates_only=True, extra_blocks=True)
        torch.testing.assert_close(trunk(eff, parse_cut(eff.backbone, "blocks.5"), x), ref)


def test_trunk_cache_memory_is_bounded(monkeypatch):
    from stdistill.adapters._trunk import _LRU

    lru = _LRU()
    monkeypatch.setenv("STDISTILL_TRUNK_MEMORY_GB", str(3 * 4000 / 2**30))  # room for 3 tensors of 4000 bytes
    for i in range(5):
        lru.put(str(i), torch.zeros(1000, dtype=torch.float32))
    assert lru.nbytes <= 3 * 4000 and lru.get("0") is None and lru.get("4") is not None
    lru.get("2")  # used: kept over "3" when the next one comes
    lru.put("5", torch.zeros(1000))
    assert lru.get("2") is not None and lru.get("3") is None
    lru.put("big", torch.zeros(10_000))  # larger than the whole budget: nothing kept
    assert lru.nbytes == 0


def test_trunk_activations_skip_the_memory_cache_past_its_budget(tmp_path, monkeypatch):
    from _io_helpers import colour_sections

    from stdistill.adapters._trunk import _MEMORY, clear_trunk_cache, trunk_activations

    a = colour_sections(2, 3, ["G0", "G1"], 0)  # two sections of 9 spots
    enc = sd.encoders.load(EFF).eval()
    cfg = AdapterConfig(size_um=32, px=32)
    clear_trunk_cache()
    h = trunk_activations(enc, a, cfg, cache_dir=tmp_path)
    assert _MEMORY.nbytes == h.numel() * h.element_size()  # within the default budget: both sections kept
    clear_trunk_cache()
    monkeypatch.setenv("STDISTILL_TRUNK_MEMORY_GB", str(0.75 * h.numel() * h.element_size() / 2**30))
    h2 = trunk_activations(enc, a, cfg, cache_dir=tmp_path)  # one section fits, the whole output does not
    assert _MEMORY.nbytes == 0
    torch.testing.assert_close(h2, h)


def test_trunk_activations_cache_on_disk_and_in_memory(tmp_path):
    from _io_helpers import colour_sections

    from stdistill.adapters import clear_trunk_cache, trunk_activations

    a = colour_sections(1, 4, ["G0", "G1"], 0)
    enc = sd.encoders.load(EFF).eval()
    cfg = AdapterConfig(size_um=32, px=32)
    clear_trunk_cache()
    h1 = trunk_activations(enc, a, cfg, cache_dir=tmp_path)
    assert h1.shape[:2] == (a.n_obs, 1) and h1.dtype == torch.float16 and len(list(tmp_path.glob("*.npy"))) == 1
    clear_trunk_cache()
    h2 = trunk_activations(enc, a, cfg, cache_dir=tmp_path)  # read back from disk
    torch.testing.assert_close(h1, h2)
    assert not np.shares_memory(h1.numpy(), h2.numpy())


def test_trunk_activations_read_lazily_from_disk_past_the_budget(tmp_path, monkeypatch):
    import pickle

    from _io_helpers import colour_sections

    from stdistill.adapters._trunk import (
        SectionActivations,
        clear_trunk_cache,
        trunk_activations,
    )

    a = colour_sections(2, 3, ["G0", "G1"], 0)  # two sections of 9 spots
    a = a[np.r_[9:18, 0:9]].copy()  # rows of the sections in another order than the sections
    enc = sd.encoders.load(EFF).eval()
    cfg = AdapterConfig(size_um=32, px=32)
    clear_trunk_cache()
    h = trunk_activations(enc, a, cfg, cache_dir=tmp_path)
    assert isinstance(trunk_activations(enc, a, cfg, cache_dir=tmp_path, lazy="auto"), torch.Tensor)  # fits the budget
    monkeypatch.setenv("STDISTILL_TRUNK_MEMORY_GB", str(0.5 * h.numel() * h.element_size() / 2**30))
    lz = trunk_activations(enc, a, cfg, cache_dir=tmp_path, lazy="auto")
    assert isinstance(lz, SectionActivations) and len(lz) == len(h) and lz.shape == tuple(h.shape) and lz.dtype == h.dtype
    idx = torch.tensor([17, 0, 9, 8, 3])
    torch.testing.assert_close(lz[idx], h[idx])
    torch.testing.assert_close(lz[2:11, 0], h[2:11, 0])
    torch.testing.assert_close(lz[5], h[5])
    torch.testing.assert_close(pickle.loads(pickle.dumps(lz))[idx], h[idx])
    with pytest.raises(StdistillError, match="disk cache"):
        trunk_activations(enc, a, cfg, cache_dir=False, lazy=True)
