"""Feature extraction and its content-keyed on-disk cache (tiny sections, tiny encoder)."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import stdistill as sd
from stdistill import StdistillError
from stdistill.features.cache import CacheWarning, FeatureCache


class CountingNet(nn.Module):
    """conv -> pool -> linear; counts forward calls (one per batch)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def make_sections(n_sections: int = 2, n_spots: int = 10, seed: int = 0, with_image=True):
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(n_sections):
        img = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
        xy = rng.uniform(5, 150, (n_spots, 2))
        parts.append(sd.io.new_section(
            rng.poisson(2, (n_spots, 4)), genes=[f"g{i}" for i in range(4)], spots=[f"s{i}" for i in range(n_spots)],
            xy_px=xy, section=f"sec{k}", patient=f"p{k}", microns_per_pixel=1.0, spot_diameter_um=55.0,
            image=img if (with_image is True or k in with_image) else None,
        ))
    return sd.io.concat(parts)


@pytest.fixture
def counting():
    name = "test-counting"
    net = CountingNet()
    spec = sd.encoders.register_module(name, net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_px=32, dim=16,
                                       overwrite=True)
    enc = sd.encoders.load(spec)
    yield enc
    sd.encoders.unregister(name)


def _extract(adata, enc, cache, **kw):
    kw = {"size_um": 24, "px": 32, "batch_size": 4, "device": "cpu", "precision": "fp32", "cache_dir": cache, **kw}
    return sd.features.run_extraction(adata, enc, **kw)


def test_extract_writes_obsm_and_padding(tmp_path, counting):
    a = make_sections()
    a.obsm["spatial"][0] = [1.0, 1.0]  # a patch reaching beyond the image corner
    rep = _extract(a, counting, tmp_path)
    X = a.obsm["X_test-counting"]
    assert X.shape == (20, 16) and X.dtype == np.float32 and np.isfinite(X).all()
    assert a.obs["patch_padded"].dtype == bool and a.obs["patch_padded"].iloc[0] and a.obs["patch_padded"].sum() >= 1
    assert a.uns["features"]["X_test-counting"]["size_um"] == 24.0
    assert [s.status for s in rep.sections] == ["computed", "computed"]
    # the features are the encoder applied to the PatchDataset's patches
    ds = sd.pp.PatchDataset(a, size_um=24, px=32)
    with torch.inference_mode():
        want = counting(torch.stack([ds[i][0] for i in range(len(ds))])).numpy()
    np.testing.assert_allclose(X, want, rtol=1e-5, atol=1e-6)


def test_second_run_reads_the_cache(tmp_path, counting):
    a = make_sections()
    _extract(a, counting, tmp_path)
    first = a.obsm["X_test-counting"].copy()
    calls = counting.backbone.calls
    assert calls == 5  # 2 sections x 10 patches in batches of 4
    b = make_sections()  # same content, new objects
    rep = _extract(b, counting, tmp_path)
    assert counting.backbone.calls == calls  # no forward pass at all
    assert [s.status for s in rep.sections] == ["cache hit", "cache hit"]
    np.testing.assert_array_equal(b.obsm["X_test-counting"], first)
    assert len(FeatureCache(tmp_path).entries("test-counting")) == 2


def test_cache_key_follows_content(tmp_path, counting):
    a = make_sections()
    _extract(a, counting, tmp_path)
    n = counting.backbone.calls
    _extract(a, counting, tmp_path, size_um=30)  # other geometry
    assert counting.backbone.calls == n + 5
    b = make_sections()
    b.obsm["spatial"][0] += 1.0  # one spot of sec0 moved: only sec0 is recomputed
    rep = _extract(b, counting, tmp_path)
    assert [s.status for s in rep.sections] == ["computed", "cache hit"]
    with torch.no_grad():
        counting.backbone.net[-1].bias += 1.0  # other weights: the digest changes
    rep = _extract(b, counting, tmp_path)
    assert [s.status for s in rep.sections] == ["computed", "computed"]


def test_corrupt_or_truncated_entries_are_detected_and_recomputed(tmp_path, counting):
    a = make_sections()
    _extract(a, counting, tmp_path)
    good = a.obsm["X_test-counting"].copy()
    cache = FeatureCache(tmp_path)
    e0, e1 = (cache.path("test-counting", k) for k in _keys(cache))
    # 1) truncated file
    raw = e0.read_bytes()
    e0.write_bytes(raw[: len(raw) // 2])
    # 2) a valid HDF5 file whose numbers changed: only the stored checksum can tell
    with h5py.File(e1, "r+") as f:
        f["features"][0, 0] += 1.0
    b = make_sections()
    calls = counting.backbone.calls
    with pytest.warns(CacheWarning, match="corrupt") as rec:
        rep = _extract(b, counting, tmp_path)
    reasons = " ".join(str(w.message) for w in rec)
    assert "checksum mismatch" in reasons and "unreadable" in reasons
    assert [s.status for s in rep.sections] == ["computed", "computed"]
    assert counting.backbone.calls == calls + 5
    np.testing.assert_array_equal(b.obsm["X_test-counting"], good)
    # the entries were rewritten and are good again
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        rep = _extract(make_sections(), counting, tmp_path)
    assert [s.status for s in rep.sections] == ["cache hit", "cache hit"]


def _keys(cache):
    paths = cache.entries("test-counting")
    order = {}
    for p in paths:
        with h5py.File(p, "r") as f:
            order[f.attrs["section"]] = p.stem
    return [order["sec0"], order["sec1"]]


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path)
    feats = np.ones((3, 4), np.float32)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(StdistillError, match="cannot write the feature cache"):
        cache.put("enc", "k" * 32, feats, section="s")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing half-written, no temp file left
    monkeypatch.undo()
    p = cache.put("enc", "k" * 32, feats, section="s")
    np.testing.assert_array_equal(cache.get("enc", "k" * 32, n=3, dim=4), feats)
    with pytest.warns(CacheWarning, match="holds shape"):  # a shape mismatch is corrupt: removed, not an error
        assert cache.get("enc", "k" * 32, n=4, dim=4) is None
    assert not p.exists()


def test_cache_dir_env_and_disabled(tmp_path, monkeypatch, counting):
    monkeypatch.setenv("STDISTILL_CACHE", str(tmp_path / "root"))
    assert sd.features.default_cache_dir() == tmp_path / "root" / "features"
    a = make_sections()
    _extract(a, counting, None)
    assert len(FeatureCache().entries("test-counting")) == 2
    n = counting.backbone.calls
    _extract(a, counting, False)  # no cache: computed again, nothing written
    assert counting.backbone.calls == n + 5


def test_sections_without_image(tmp_path, counting):
    a = make_sections(3, with_image=(0, 2))
    with pytest.raises(StdistillError, match=r"no H&E image: \['sec1'\].*skip_missing=True"):
        _extract(a, counting, tmp_path)
    rep = _extract(a, counting, tmp_path, skip_missing=True)
    X = a.obsm["X_test-counting"]
    sec = a.obs["section"].astype(str).to_numpy()
    assert np.isnan(X[sec == "sec1"]).all() and np.isfinite(X[sec != "sec1"]).all()
    assert [s.status for s in rep.sections] == ["computed", "skipped (no image)", "computed"]


def test_default_encoder_end_to_end(tmp_path):
    a = make_sections(1, n_spots=3)
    b = a.copy()
    assert sd.features.extract(a, size_um=24, px=32, cache_dir=tmp_path, device="cpu") is None  # written in place
    X = a.obsm["X_effnet-lite0-imagenet"]
    assert X.shape == (3, 1280) and np.isfinite(X).all() and X.std() > 0
    assert a.uns["features"]["X_effnet-lite0-imagenet"]["precision"] in ("bf16", "fp32")
    c = sd.features.extract(b, size_um=24, px=32, cache_dir=tmp_path, device="cpu", copy=True)  # a cache hit
    assert c is not b and "X_effnet-lite0-imagenet" not in b.obsm and "features" not in b.uns
    np.testing.assert_array_equal(c.obsm["X_effnet-lite0-imagenet"], X)
    assert c.obs["patch_padded"].tolist() == a.obs["patch_padded"].tolist()


def test_bad_arguments(counting):
    a = make_sections(1, n_spots=3)
    with pytest.raises(StdistillError, match="precision"):
        _extract(a, counting, False, precision="fp8")
    with pytest.raises(StdistillError, match="batch_size"):
        _extract(a, counting, False, batch_size=0)
    with pytest.raises(StdistillError, match="unknown encoder"):
        sd.features.extract(a, "no-such-encoder", cache_dir=False)


def test_prefetch_propagates_errors():
    from stdistill.features.extract import prefetch

    def gen():
        yield 1
        raise ValueError("reader failed")

    it = prefetch(gen())
    assert next(it) == 1
    with pytest.raises(ValueError, match="reader failed"):
        next(it)
    assert list(prefetch(range(5), depth=1)) == [0, 1, 2, 3, 4]


def test_precision_resolution():
    from stdistill.features.extract import cpu_has_native_bf16, resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16-mixed", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"  # the same numbers on every CPU, native bf16 or not
    assert isinstance(cpu_has_native_bf16(), bool)


def test_worker_processes_give_the_same_features(counting):
    a, b = make_sections(), make_sections()
    _extract(a, counting, False)
    _extract(b, counting, False, num_workers=1)
    np.testing.assert_array_equal(a.obsm["X_test-counting"], b.obsm["X_test-counting"])
    assert callable(sd.features.extract_distributed)


def test_unchanged_loaded_encoder_shares_the_cache_with_its_name(tmp_path):
    a = make_sections(1, n_spots=2)
    sd.features.extract(a, "effnet-lite0-imagenet", size_um=24, px=32, cache_dir=tmp_path, device="cpu")
    enc = sd.encoders.load("effnet-lite0-imagenet")
    rep = sd.features.run_extraction(make_sections(1, n_spots=2), enc, size_um=24, px=32, cache_dir=tmp_path,
                                     device="cpu")
    assert [s.status for s in rep.sections] == ["cache hit"]
    with torch.no_grad():
        enc.backbone.conv_head.weight.mul_(1.01)  # fine-tuned: its own entry
    rep = sd.features.run_extraction(make_sections(1, n_spots=2), enc, size_um=24, px=32, cache_dir=tmp_path,
                                     device="cpu")
    assert [s.status for s in rep.sections] == ["computed"]


def test_run_extraction_takes_extracts_arguments(tmp_path):
    a = make_sections(1, n_spots=2)
    rep = sd.features.run_extraction(a, "effnet-lite0-imagenet", size_um=24, px=32, cache_dir=False, device="cpu",
                                     key_added="X_e")
    assert rep.key_added == "X_e" and a.obsm["X_e"].shape == (2, 1280) and rep.patches_computed == 2
    with pytest.raises(StdistillError, match="run_extraction: .*size_mu"):
        sd.features.run_extraction(a, size_mu=24)
