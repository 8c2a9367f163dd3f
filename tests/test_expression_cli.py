"""`stdistill expression bench|peka|predict` and the expression figures."""

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from _io_helpers import colour_sections
from typer.testing import CliRunner

import stdistill as sd
from stdistill.cli import app

runner = CliRunner()


def _imaged(n_patients=3, side=5, n_genes=12, seed=0):
    genes = [f"G{i}" for i in range(n_genes - 1)] + ["ERBB2"]
    return colour_sections(n_patients, side, genes, seed, feature_key="X_feat")


def test_bench_cli_and_figures(tmp_path):
    a = _imaged()
    f = tmp_path / "d.h5ad"
    a.write_h5ad(f)
    out = tmp_path / "bench"
    r = runner.invoke(app, ["expression", "bench", str(f), "-f", "X_feat", "--genes", str(_genes(tmp_path, a)), "-o", str(out)])
    assert r.exit_code == 0, r.output
    pf = pd.read_csv(out / "per_fold.csv")
    assert len(pf) == 3 and "r_ERBB2" in pf.columns
    s = json.loads((out / "summary.json").read_text())
    assert s["pearson_mean"] == pytest.approx(pf["pearson_mean"].mean())
    assert (out / "pearson_bars.png").stat().st_size > 1000
    res = sd.bench.expression(a, "X_feat", genes=list(a.var_names[:11]), extra_genes=["ERBB2"], key_added=None)
    fig = sd.pl.expression_maps(a, "ERBB2", {"ridge": res.predictions["P1"]["ERBB2"]}, section="S1", path=tmp_path / "m.png")
    assert len(fig.axes) >= 2 and (tmp_path / "m.png").stat().st_size > 1000
    assert "r = " in fig.axes[1].get_title()
    pred = res.predictions["P1"]["ERBB2"] - 1.0  # undershooting head; not measured in the data below
    fig = sd.pl.expression_maps(a[:, ["G0"]].copy(), "ERBB2", {"ridge": pred}, section="S1")
    assert [ax.get_title() for ax in fig.axes][0] == "ridge" and "not measured" in fig._suptitle.get_text()
    assert fig.axes[0].collections[0].get_array().min() >= 0  # drawn clipped at 0
    with pytest.raises(sd.StdistillError, match="holds 3 sections: pass section="):
        sd.pl.expression_maps(a, "ERBB2", {"ridge": res.predictions["P1"]["ERBB2"]})
    with pytest.raises(sd.StdistillError, match="'S9' is not in the AnnData"):
        sd.pl.niches(a, ["section"], section="S9")
    r = runner.invoke(app, ["expression", "bench", str(f), "-f", "X_nope", "-o", str(out)])
    assert r.exit_code != 0


def test_bench_cli_feature_candidates_are_chosen_per_fold(tmp_path):
    a = _imaged()
    rng = np.random.default_rng(0)
    a.obsm["X_noise"] = rng.normal(size=a.obsm["X_feat"].shape).astype("float32")
    f = tmp_path / "d.h5ad"
    a.write_h5ad(f)
    out = tmp_path / "bench"
    r = runner.invoke(app, ["expression", "bench", str(f), "-f", "noise=X_noise,feat=X_feat,both=X_feat+X_noise",
                            "--genes", str(_genes(tmp_path, a)), "-o", str(out)])
    assert r.exit_code == 0, r.output
    pf, sel = pd.read_csv(out / "per_fold.csv"), pd.read_csv(out / "selection.csv")  # every fold's Selection table
    assert list(sel.columns) == ["candidate", "features", "split", "score", "seconds", "fold"]
    assert len(sel) == 3 * 3 * 2  # 3 folds x 3 candidates x 2 inner patients
    assert (pf["chosen"] != "noise").all()  # the features carry the signal; noise does not
    inner = sel.groupby(["fold", "features"], sort=False)["score"].mean().unstack()
    assert list(pf["chosen"]) == list(inner.loc[pf["fold"]].idxmax(axis=1))
    assert "fold P0: feature candidates on its training patients" in r.output and "chosen: features=" in r.output
    r = runner.invoke(app, ["expression", "bench", str(f), "-f", "noise=X_noise,feat", "-o", str(out)])
    assert r.exit_code != 0 and "is not name=KEY" in str(r.exception)


def _genes(tmp_path, a):
    p = tmp_path / "var_genes.json"
    p.write_text(json.dumps({"genes": list(a.var_names[:11])}))
    return p


def test_peka_and_predict_cli(tmp_path):
    def make():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2)

    sd.encoders.register_module("test-cli-vit", make, mean=(0.5,) * 3, std=(0.5,) * 3, input_px=32, dim=192, overwrite=True)
    try:
        a = _imaged(seed=1)
        f = tmp_path / "d.h5ad"
        a.write_h5ad(f)
        model = tmp_path / "peka"
        r = runner.invoke(app, ["expression", "peka", str(f), "--test-patients", "P2", "--val-patients", "P1",
                                "--encoder", "test-cli-vit", "--adapter", "lora", "--rank", "4", "--epochs", "1", "--n-clusters", "4",
                                "--genes", str(_genes(tmp_path, a)), "-o", str(model)])
        assert r.exit_code == 0, r.output
        assert model.exists() and "PEKA: 11 genes; adapter lora rank 4" in r.output and "{" not in r.output
        preds = tmp_path / "pred" / "p.csv"
        r = runner.invoke(app, ["expression", "predict", str(model), str(f), "--sections", "S2", "-o", str(preds),
                                "--map-gene", "G0"])
        assert r.exit_code == 0, r.output
        p = pd.read_csv(preds, index_col=0)
        assert p.shape == (25, 11) and (tmp_path / "pred" / "G0_S2.png").exists()
        assert (p.to_numpy() >= 0).all()  # log1p predictions are clipped at 0
        he = tmp_path / "he_only.h5ad"  # H&E-only data: G0 not measured -> the prediction alone
        a[:, ["G5"]].copy().write_h5ad(he)
        r = runner.invoke(app, ["expression", "predict", str(model), str(he), "--sections", "S2", "-o",
                                str(tmp_path / "he" / "p.csv"), "--map-gene", "G0,NOPE"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "he" / "G0_S2.png").exists() and "no map for NOPE" in r.output
        r = runner.invoke(app, ["expression", "peka", str(f), "--test-patients", "P9"])
        assert r.exit_code != 0
        grid = ["expression", "peka", str(f), "--test-patients", "P2", "--encoder", "test-cli-vit", "--adapter", "lora",
                "--rank", "4", "--epochs", "1", "--n-clusters", "4", "--genes", str(_genes(tmp_path, a)), "-o", str(model)]
        r = runner.invoke(app, [*grid, "--lr", "1e-3,1e-2"])  # a grid: chosen on P0 <-> P1, then trained on both
        assert r.exit_code == 0, r.output
        assert "chosen: lr=" in r.output and "P0" in r.output and "P1" in r.output  # each inner patient's score
        record = json.loads((model / "config.json").read_text())["bundle"]["training"]["selection"]
        split = record["table"]["columns"].index("split")
        assert record["choice"]["settings"]["lr"] in (1e-3, 1e-2) and {r[split] for r in record["table"]["rows"]} == {"P0", "P1"}
        assert sd.recipes.PEKA.load(model).selection_.choice == record["choice"]
        r = runner.invoke(app, [*grid, "--lr", "1e-3,fast"])
        assert isinstance(r.exception, sd.StdistillError) and "--lr must be a number or a comma list" in str(r.exception)
    finally:
        sd.encoders.unregister("test-cli-vit")
