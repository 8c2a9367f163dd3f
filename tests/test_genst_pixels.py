"""GenST with the histology VQ-VAE end to end on patch pixels (GenstConfig(histology="pixels"))."""

import anndata as ad
import numpy as np
import pytest
from _io_helpers import colour_sections
from safetensors.numpy import load_file
from typer.testing import CliRunner

import stdistill as sd
from stdistill.cli import app

pytest.importorskip("vector_quantize_pytorch")

from stdistill.recipes import GenST, GenstConfig, genst_patches  # noqa: E402

# 28 um patches (one coloured spot each) at 16 px, two stride-2 convolutions
PIX = {"histology": "pixels", "patch_um": 28.0, "patch_px": 16, "conv_channels": (8, 8), "codebook_size": 8,
       "hist_codebook_size": 8, "expr_epochs": 40, "max_epochs": 12, "batch_size": 8, "head_input": "continuous"}
QUICK = {**PIX, "expr_epochs": 5, "max_epochs": 2}
runner = CliRunner()


@pytest.fixture(scope="module")
def parts():
    a = colour_sections(3, 7, seed=0)
    pats = a.obs["patient"].astype(str).to_numpy()
    return {p: a[pats == p].copy() for p in ("P0", "P1", "P2")}


@pytest.fixture(scope="module")
def model(parts):
    return GenST(GenstConfig(**PIX)).fit(parts["P0"], n_genes=8, val=parts["P1"])


def test_pixel_model_predicts_shapes_and_learns_colour(parts, model):
    te = parts["P2"]
    assert model.net_.hist.encoder[0].weight.shape == (8, 3, 4, 4)  # a convolution over RGB patches
    assert model.predict(te) is None
    pred = te.obsm["genst_pred"]
    assert pred.shape == (te.n_obs, 8) and list(pred.columns) == model.genes_
    assert te.obsm["genst_sd"].shape == pred.shape and (te.obsm["genst_sd"].to_numpy() >= 0).all()
    assert model.sample(te, 5, seed=0, counts=True, inplace=False).shape == (te.n_obs, 5, 8)
    assert list(model.codebook_usage(te).index) == ["expression", "histology", "generated"]
    table = model.predictability(te)  # the patch colour drives expression; counts are Poisson on 49 spots
    assert table["generated"].mean() > 0.15 and table["reconstruction"].mean() > 0.3
    assert len(model.curve_) == PIX["max_epochs"] + 1 and max(model.curve_[1:]) > model.curve_[0]


def test_pixel_model_is_reproducible_and_reads_cached_patches(parts, model):
    te = parts["P2"]
    a, b = (GenST(GenstConfig(**QUICK)).fit(parts["P0"], n_genes=8).predict(te, inplace=False).to_numpy() for _ in range(2))
    np.testing.assert_array_equal(a, b)
    other = GenST(GenstConfig(**{**QUICK, "seed": 1})).fit(parts["P0"], n_genes=8)
    assert not np.array_equal(a, other.predict(te, inplace=False).to_numpy())
    cached = genst_patches(te, 28.0, 16, copy=True)  # the return rule: a new AnnData, te untouched
    assert "genst_patches" not in te.obsm and cached.uns["genst_patches"] == {"size_um": 28.0, "px": 16}
    assert cached.obsm["genst_patches"].shape == (te.n_obs, 3, 16, 16) and cached.obsm["genst_patches"].dtype == np.uint8
    del cached.uns["spatial"]  # no images left: the cache is what is read
    np.testing.assert_array_equal(model.predict(cached, inplace=False).to_numpy(), model.predict(te, inplace=False).to_numpy())


def test_pixel_model_pretrained_on_reconstruction(parts):
    m = GenST(GenstConfig(**{**QUICK, "hist_epochs": 3})).fit(parts["P0"], n_genes=8)
    h = m.history_
    assert list(h.loc[h["stage"] == "hist", "epoch"]) == [1, 2, 3] and (h.loc[h["stage"] == "hist", "rec_h"] > 0).all()
    assert (h["stage"] == "align").sum() == 2


def test_pixel_model_save_load_round_trip(parts, model, tmp_path):
    te = parts["P2"]
    model.save(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert weights["hist.encoder.0.weight"].ndim == 4 and "hist.decoder.0.weight" in weights
    m2 = GenST.load(tmp_path / "m")
    assert m2.config.histology == "pixels" and m2.config.conv_channels == (8, 8)
    assert m2.features_record_ == {"pixels": True, "size_um": 28.0, "px": 16}
    np.testing.assert_array_equal(model.predict(te, inplace=False).to_numpy(), m2.predict(te, inplace=False).to_numpy())
    np.testing.assert_array_equal(model.sample(te, 4, seed=2, counts=True, inplace=False),
                                  m2.sample(te, 4, seed=2, counts=True, inplace=False))


def test_pixel_model_bad_input(parts, model):
    te = parts["P2"]
    bare = ad.AnnData(obs=te.obs[["section", "patient"]].copy(), obsm={"spatial": te.obsm["spatial"]})
    with pytest.raises(sd.StdistillError, match="histology='pixels' needs each section's H&E image"):
        model.predict(bare)
    with pytest.raises(sd.StdistillError, match="patch_px divisible by 16"):
        GenstConfig(histology="pixels", patch_px=72)
    with pytest.raises(sd.StdistillError, match="histology must be one of"):
        GenstConfig(histology="rgb")


def test_cli_fit_and_predict_on_pixels(tmp_path):
    data = tmp_path / "d.h5ad"
    colour_sections(3, 6, seed=0).write_h5ad(data)
    model = tmp_path / "model"
    r = runner.invoke(app, ["genst", "fit", str(data), "--test-patients", "P2", "--val-patients", "P1", "--histology", "pixels",
                            "--patch-px", "16", "--n-genes", "6", "--codebook-size", "8", "--expr-epochs", "5",
                            "--max-epochs", "2", "-o", str(model)])
    assert r.exit_code == 0, r.output
    assert "patch pixels, 112 um at 16 px" in r.output and len(GenST.load(model).genes_) == 6
    out = tmp_path / "p.h5ad"
    r = runner.invoke(app, ["genst", "predict", str(model), str(data), "--sections", "S2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert ad.read_h5ad(out).obsm["genst_pred"].shape == (36, 6)
