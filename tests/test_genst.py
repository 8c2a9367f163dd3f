"""GenST: two aligned VQ-VAEs generating expression from H&E features (recipes/_genst.py, cli/genst.py)."""

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _io_helpers import colour_sections
from typer.testing import CliRunner

import stdistill as sd
from stdistill.cli import app

from conftest import TINY_EFF

pytest.importorskip("vector_quantize_pytorch")

from stdistill.recipes import GenST, GenstConfig, select_genst  # noqa: E402

KEY = "X_fake"
FAST = {"codebook_size": 16, "hist_codebook_size": 16, "expr_epochs": 25, "max_epochs": 6, "batch_size": 64}
runner = CliRunner()


@pytest.fixture(scope="module")
def sim():
    """Simulated sections of 3 patients; 'histology' features = the spots' cell-type mixture, mixed and noisy."""
    a = sd.datasets.simulated(n_sections=3, n_patients=3, spots_per_section=120, n_genes=500, seed=0)
    P = a.obsm["celltype_props"].to_numpy()
    rng = np.random.default_rng(0)
    a.obsm[KEY] = (P @ rng.normal(size=(P.shape[1], 24)) + 0.3 * rng.normal(size=(a.n_obs, 24))).astype(np.float32)
    a.uns["features"] = {KEY: {"encoder": "fake-encoder", "dim": 24, "size_um": 112.0, "px": 224, "precision": "fp32"}}
    pats = a.obs["patient"].astype(str).to_numpy()
    parts = {p: a[pats == p].copy() for p in ("simP0", "simP1", "simP2")}
    genes = sd.pp.hest_genes(parts["simP0"], 20)
    return parts, genes


@pytest.fixture(scope="module")
def model(sim):
    parts, genes = sim
    return GenST(GenstConfig(**FAST), feature_key=KEY).fit(parts["simP0"], genes, val=parts["simP1"])


def test_expression_vqvae_reconstructs_better_than_the_mean(sim, model):
    parts, genes = sim
    te = parts["simP2"]
    y = np.log1p(te[:, genes].X.toarray())
    mean_train = np.log1p(parts["simP0"][:, genes].X.toarray()).mean(0)
    rec = model.reconstruct(te).to_numpy()
    assert rec.shape == y.shape and list(model.reconstruct(te).columns) == genes
    assert ((rec - y) ** 2).mean() < 0.8 * ((mean_train - y) ** 2).mean()
    table = model.predictability(te)
    assert list(table.columns) == ["generated", "reconstruction"] and set(table.index) == set(genes)
    assert table["reconstruction"].mean() > 0.3 and table["generated"].mean() > 0.2
    assert len(model.curve_) == FAST["max_epochs"] + 1 and model.curve_[-1] > model.curve_[0]
    assert {"expr", "align"} == set(model.history_["stage"])
    usage = model.codebook_usage(te)
    assert list(usage.index) == ["expression", "histology", "generated"]
    assert (usage["perplexity"] > 1).all() and usage["collapsed"].dtype == bool


def test_generation_on_features_without_genes(sim, model):
    parts, genes = sim
    te = parts["simP2"]
    tiles = ad.AnnData(obs=te.obs[["section", "patient"]].copy(), obsm={KEY: te.obsm[KEY]}, uns={"features": te.uns["features"]})
    assert tiles.n_vars == 0
    assert model.predict(tiles) is None
    pred = tiles.obsm["genst_pred"]
    assert isinstance(pred, pd.DataFrame) and pred.shape == (te.n_obs, len(genes)) and list(pred.columns) == genes
    assert tiles.obsm["genst_sd"].shape == pred.shape
    assert (tiles.obsm["genst_sd"].to_numpy() >= 0).all() and np.isfinite(pred.to_numpy()).all()
    np.testing.assert_allclose(pred.to_numpy(), model.predict(te, inplace=False).to_numpy())
    usage = model.codebook_usage(tiles)
    assert list(usage.index) == ["histology", "generated"]


def test_sampling_is_reproducible(sim, model):
    te = sim[0]["simP2"]
    assert model.sample(te, 6, seed=3) is None  # obsm["genst_samples"] and obsm["genst_sd"]
    a = te.obsm["genst_samples"]
    b = model.sample(te, 6, seed=3, inplace=False)
    assert a.shape == (te.n_obs, 6, len(model.genes_))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, model.sample(te, 6, seed=4, inplace=False))
    c1 = model.sample(te, 5, seed=1, counts=True, top_k=3, temperature=0.5, inplace=False)
    model.sample(te, 5, seed=1, counts=True, top_k=3, temperature=0.5)
    c2 = te.obsm["genst_samples"]
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(te.obsm["genst_sd"].to_numpy(), c2.std(1), rtol=1e-6)
    one = model.sample(te, 4, seed=0, top_k=1, inplace=False)  # a single code per spot: no spread
    assert np.allclose(one.std(1), 0.0)


def test_save_load_identical_and_other_encoder_refused(sim, model, tmp_path):
    te = sim[0]["simP2"].copy()
    model.save(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
    m2 = GenST.load(tmp_path / "m")
    b = sd.bundle.load_bundle(tmp_path / "m")
    assert b.recipe == "genst" and b.outputs == {"genes": model.genes_} and b.features["encoder"] == "fake-encoder"
    np.testing.assert_array_equal(model.predict(te, inplace=False).to_numpy(), m2.predict(te, inplace=False).to_numpy())
    np.testing.assert_array_equal(model.sample(te, 4, seed=2, counts=True, inplace=False),
                                  m2.sample(te, 4, seed=2, counts=True, inplace=False))
    other = te.copy()
    other.uns["features"] = {KEY: {**te.uns["features"][KEY], "encoder": "uni2-h"}}
    with pytest.raises(sd.StdistillError, match="encoder='uni2-h'.*trained on encoder='fake-encoder'"):
        m2.predict(other)
    wide = ad.AnnData(obs=te.obs[["section", "patient"]].copy(), obsm={KEY: np.zeros((te.n_obs, 30), np.float32)})
    with pytest.raises(sd.StdistillError, match="30 features.*trained on 24"):
        m2.predict(wide)
    with pytest.raises(sd.StdistillError, match="no such model bundle"):
        GenST.load(tmp_path / "nothing")


def test_select_chooses_on_inner_patients(sim, tmp_path):
    parts, _ = sim
    train = sd.io.concat([parts["simP0"], parts["simP1"]])
    grid = [{"w_con": 0.0}, {"w_con": 0.5, "head_input": "continuous"}]
    base = GenstConfig(**{**FAST, "expr_epochs": 10, "max_epochs": 3})
    sel = select_genst(train, grid, base=base, feature_key=KEY, n_genes=15)
    cfg, table = sel.config(), sel.table
    assert set(table["split"]) == {"simP0", "simP1"} and len(table) == 4 and sel.criterion.metric == "val_pearson"
    assert all(len(c) == 4 for c in table["curve"]) and 0 <= cfg.max_epochs <= 3
    m = GenST(cfg, feature_key=KEY).fit(train, sd.pp.hest_genes(train, 15), selection=sel)  # recorded in its bundle
    assert GenST.load(m.save(tmp_path / "m")).selection_.to_dict() == sel.to_dict()
    with pytest.raises(sd.StdistillError, match="quantizer"):
        GenstConfig(quantizer="rvq")


@pytest.mark.usefixtures("tiny_encoders")
def test_cli_fit_predict_sample_on_tiles(tmp_path, monkeypatch):
    monkeypatch.setenv("STDISTILL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.h5ad"
    colour_sections(3, 6, seed=0).write_h5ad(data)
    model = tmp_path / "model"
    r = runner.invoke(app, ["genst", "fit", str(data), "--test-patients", "P2", "--val-patients", "P1", "--features", "X_tiny",
                            "--encoder", TINY_EFF, "--n-genes", "6", "--codebook-size", "8", "--expr-epochs", "5",
                            "--max-epochs", "2", "-o", str(model)])
    assert r.exit_code == 0, r.output
    assert "Held-out Pearson r per gene" in r.output and "Codebook usage" in r.output and (model / "config.json").exists()
    assert len(pd.read_csv(model / "test_predictability.csv")) == 6

    # H&E-only tiles of section S0 (no genes): features extracted with the model's encoder
    src = colour_sections(3, 6, seed=0)
    tiles = sd.pp.tile(sd.io.image(src, "S0"), size_um=28, microns_per_pixel=1.0, section="T0", min_tissue=0.0)
    assert tiles.n_vars == 0
    tf = tmp_path / "tiles.h5ad"
    sd.io.write_h5ad(tiles, tf)
    for cmd in (["predict"], ["sample", "--n-samples", "4", "--seed", "1", "--counts"]):
        out = tmp_path / f"{cmd[0]}.h5ad"
        r = runner.invoke(app, ["genst", cmd[0], str(model), str(tf), "-o", str(out), *cmd[1:]])
        assert r.exit_code == 0, r.output
        p = ad.read_h5ad(out)
        assert list(p.obsm["genst_pred"].columns) == GenST.load(model).genes_
        assert p.obsm["genst_sd"].shape == (tiles.n_obs, 6) and p.uns["features"]["X_tiny"]["encoder"] == TINY_EFF
    assert p.obsm["genst_samples"].shape == (tiles.n_obs, 4, 6)


def test_cli_bad_input_is_one_error_line(tmp_path, monkeypatch, capsys):
    from stdistill.cli import main

    monkeypatch.setattr(sys, "argv", ["stdistill", "genst", "predict", str(tmp_path / "nope"), "simulated",
                                      "-o", str(tmp_path / "o.h5ad")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "no such model bundle" in err[0]


def test_fit_trains_on_its_thread_count_whatever_gene_selection_does(sim, monkeypatch):
    """scanpy's gene selection can change torch's thread count (numba's OpenMP layer): genes are
    chosen before GenST sets its own, so training runs on ``num_threads`` either way."""
    import torch

    import stdistill.pp.genes as genes_mod
    import stdistill.recipes._genst._model as model_mod

    parts, _ = sim
    real_hest, real_fit = genes_mod.hest_genes, model_mod._fit_module
    seen = []

    def hest_then_threads(*a, **k):
        torch.set_num_threads(3)
        return real_hest(*a, **k)

    def fit_spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real_fit(*a, **k)

    monkeypatch.setattr(genes_mod, "hest_genes", hest_then_threads)
    monkeypatch.setattr(model_mod, "_fit_module", fit_spy)
    before = torch.get_num_threads()
    try:
        GenST(GenstConfig(**{**FAST, "expr_epochs": 2, "max_epochs": 1}), feature_key=KEY).fit(parts["simP0"], n_genes=10)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]
