"""PEKA recipe: end-to-end training, save/load, selection on inner patients (adapters: test_adapters.py)."""

import numpy as np
import pandas as pd
import pytest
from _io_helpers import colour_sections

import stdistill as sd
from stdistill import StdistillError
from stdistill.recipes import PEKA, PekaConfig, choose_peka, select_peka

from conftest import TINY_EFF as EFF, TINY_VIT as VIT

pytestmark = pytest.mark.usefixtures("tiny_encoders")


def _data(n_patients=3, side=5, n_genes=12, seed=0):
    """Sections whose spot colour drives expression (learnable from the patch)."""
    return colour_sections(n_patients, side, [f"G{i}" for i in range(n_genes)], seed)


def test_peka_fit_predict_save_load(tmp_path):
    a = _data()
    genes = list(a.var_names[:8])
    T = np.random.default_rng(0).normal(size=(a.n_obs, 6)).astype(np.float32)
    a.obsm["X_teacher"] = T
    train, val = ["S0", "S1"], ["S2"]
    cfg = PekaConfig(adapter="miss", rank=16, lr=1e-3, max_epochs=2, batch_size=16, n_clusters=3, size_um=32, px=32,
                     patience=5, val_metric="head", train_positions=None)
    model = sd.recipes.peka(a, "X_teacher", genes, train_sections=train, val_sections=val, encoder=EFF, config=cfg,
                            cache_dir=tmp_path / "trunk", key_added="X_peka")
    assert a.obsm["X_peka"].shape == (a.n_obs, 1280)
    assert [h["epoch"] for h in model.history_] == [0, 1, 2]  # epoch 0 = frozen encoder
    assert 0 <= model.best_epoch_ <= 2
    assert 0 < model.trainable_share < 0.2
    pred = model.predict(sd.io.subset_sections(a, val), inplace=False)
    assert list(pred.columns) == genes and pred.shape == (25, 8) and np.isfinite(pred.to_numpy()).all()
    assert any(p.exists() for p in (tmp_path / "trunk").iterdir())  # trunk activations cached on disk
    path = model.save(tmp_path / "peka")
    again = PEKA.load(path, cache_dir=tmp_path / "trunk")
    np.testing.assert_allclose(again.transform(a, inplace=False), a.obsm["X_peka"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(again.predict(a, inplace=False).to_numpy(), model.predict(a, inplace=False).to_numpy(), rtol=1e-4, atol=1e-4)


def test_peka_trains_the_adapter_and_refuses_leaks(tmp_path):
    a = _data(seed=1)
    genes = list(a.var_names[:6])
    T = np.random.default_rng(1).normal(size=(a.n_obs, 4)).astype(np.float32)
    tr = sd.io.subset_sections(a, ["S0", "S1"])
    sd.adapters.clear_trunk_cache()

    def fit():
        return PEKA(VIT, adapter="lora", rank=4, lr=1e-2, max_epochs=2, batch_size=10, n_clusters=2, size_um=32, px=32,
                    cache_dir=False).fit(tr, T[:50], genes)

    m = fit()  # trunk activations computed (cold cache) ...
    warm = fit()  # ... then read from memory: the same model (the adapter's random init does not depend on it)
    np.testing.assert_array_equal(warm.predict(tr, inplace=False).to_numpy(), m.predict(tr, inplace=False).to_numpy())
    lora_b = [p for n, p in m.net_.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.detach().abs().sum()) > 0 for p in lora_b)  # the adapter moved (it starts at zero)
    assert len(m.history_) == 2 and "train_kd" in m.history_[0] and "train_sa" in m.history_[0]
    leaky = sd.io.subset_sections(a, ["S1"])
    with pytest.raises(StdistillError, match="share patients"):
        PEKA(VIT, max_epochs=1, size_um=32, px=32, cache_dir=False).fit(tr, T[:50], genes, val=leaky)
    with pytest.raises(StdistillError, match="adapter"):
        PekaConfig(adapter="bone")
    with pytest.raises(StdistillError, match='use strategy="ddp"'):  # a child process's history cannot come back
        PEKA(VIT, strategy="ddp_spawn")


def test_select_peka_on_inner_patients(tmp_path):
    a = _data(n_patients=2, seed=2)
    genes = list(a.var_names[:6])
    T = np.random.default_rng(2).normal(size=(a.n_obs, 4)).astype(np.float32)
    base = PekaConfig(adapter="lora", rank=4, max_epochs=1, batch_size=10, n_clusters=2, size_um=32, px=32, val_metric="head")
    sel = select_peka(a, T, genes, [{"lr": 1e-3}, {"lr": 1e-2}], base=base, encoder=VIT, cache_dir=tmp_path)
    cfg, table = sel.config(), sel.table
    assert len(table) == 4 and set(table["split"]) == {"P0", "P1"}  # each patient validates once per candidate
    assert all(len(c) == 2 for c in table["curve"])  # epoch 0 (frozen) and epoch 1
    assert cfg.lr in (1e-3, 1e-2) and 0 <= cfg.max_epochs <= 1
    seen = []
    select_peka(a, T, genes, [{"lr": 1e-3}], base=base, encoder=VIT, cache_dir=tmp_path,
                inner=lambda tr, vp: seen.append((vp, tr.n_obs)) or {"genes": genes[:3]})
    assert seen == [("P0", 25), ("P1", 25)]  # inner parts re-derived once per split, without its patient
    with pytest.raises(StdistillError, match="at least 2"):
        select_peka(sd.io.subset_sections(a, ["S0"]), T[:25], genes, [{}], base=base, encoder=VIT)


def test_choose_peka_takes_best_mean_curve_and_epoch():
    grid = [{"lr": 1e-3, "w_kd": 0.0}, {"lr": 1e-4, "w_kd": 1.0}]
    table = pd.DataFrame({"candidate": [0, 0, 1, 1], "val_patient": ["A", "B", "A", "B"],
                          "curve": [[0.1, 0.3, 0.2], [0.1, 0.1, 0.2], [0.1, 0.2, 0.25], [0.1, 0.15, 0.2]]})
    base = PekaConfig(max_epochs=2)
    best = choose_peka(table, grid, base)  # means: [0.1, 0.2, 0.2] and [0.1, 0.175, 0.225]
    assert (best.lr, best.w_kd, best.max_epochs) == (1e-4, 1.0, 2)
    kd_off = choose_peka(table, grid, base, where=lambda g: g["w_kd"] == 0)
    assert (kd_off.lr, kd_off.max_epochs) == (1e-3, 1)  # first epoch reaching the best mean
    worse = pd.DataFrame({"candidate": [0], "val_patient": ["A"], "curve": [[0.3, 0.2, 0.1]]})
    assert choose_peka(worse, grid[:1], base).max_epochs == 0  # nothing beats the frozen encoder
    assert choose_peka(worse.assign(curve=[[0.3, 0.2, 0.1]]), grid[:1], PekaConfig(val_metric="mse")).max_epochs == 2
    with pytest.raises(StdistillError, match="no candidate"):
        choose_peka(table, grid, base, where=lambda g: g["lr"] > 1)


def test_peka_trains_on_activations_read_from_disk_as_on_the_tensor(tmp_path, monkeypatch):
    from stdistill.adapters._trunk import SectionActivations, clear_trunk_cache

    a = _data()
    genes = list(a.var_names[:8])
    a.obsm["X_teacher"] = np.random.default_rng(0).normal(size=(a.n_obs, 6)).astype(np.float32)
    cfg = PekaConfig(adapter="miss", rank=16, lr=1e-3, max_epochs=1, batch_size=16, n_clusters=3, size_um=32, px=32,
                     val_metric="head", train_positions=None)
    kw = dict(train_sections=["S0", "S1"], val_sections=["S2"], encoder=EFF, config=cfg, cache_dir=tmp_path / "trunk")
    clear_trunk_cache()
    mem = sd.recipes.peka(a, "X_teacher", genes, key_added="X_mem", run_dir=tmp_path / "r1", **kw)
    monkeypatch.setenv("STDISTILL_TRUNK_MEMORY_GB", "1e-9")  # below any section: read from disk when indexed
    reads = []
    get = SectionActivations.__getitem__
    monkeypatch.setattr(SectionActivations, "__getitem__", lambda self, key: reads.append(1) or get(self, key))
    lazy = sd.recipes.peka(a, "X_teacher", genes, key_added="X_lazy", run_dir=tmp_path / "r2", **kw)
    assert reads  # the training read its batches from the disk cache
    np.testing.assert_array_equal(a.obsm["X_lazy"], a.obsm["X_mem"])
    np.testing.assert_array_equal(lazy.predict(a, inplace=False).to_numpy(), mem.predict(a, inplace=False).to_numpy())
