"""`stdistill expression bench|peka|predict` and the expression figures."""

import json

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
    return colour_sections(n_patients, side, genes, seed, features_key="X_feat")


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
    with pytest.raises(sd.StdistillError, match="holds 3 sections: pass section="):
        sd.pl.expression_maps(a, "ERBB2", {"ridge": res.predictions["P1"]["ERBB2"]})
    with pytest.raises(sd.StdistillError, match="'S9' is not in the AnnData"):
        sd.pl.niches(a, ["section"], section="S9")
    r = runner.invoke(app, ["expression", "bench", str(f), "-f", "X_nope", "-o", str(out)])
    assert r.exit_code != 0


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
        model = tmp_path / "peka.safetensors"
        r = runner.invoke(app, ["expression", "peka", str(f), "--test-patients", "P2", "--val-patients", "P1",
                                "--encoder", "test-cli-vit", "--adapter", "lora", "--rank", "4", "--epochs", "1", "--n-clusters", "4",
                                "--genes", str(_genes(tmp_path, a)), "-o", str(model)])
        assert r.exit_code == 0, r.output
        assert model.exists()
        preds = tmp_path / "pred" / "p.csv"
        r = runner.invoke(app, ["expression", "predict", str(model), str(f), "--sections", "S2", "-o", str(preds),
                                "--map-gene", "G0"])
        assert r.exit_code == 0, r.output
        p = pd.read_csv(preds, index_col=0)
        assert p.shape == (25, 11) and (tmp_path / "pred" / "G0_S2.png").exists()
        r = runner.invoke(app, ["expression", "peka", str(f), "--test-patients", "P9"])
        assert r.exit_code != 0
        grid = ["expression", "peka", str(f), "--test-patients", "P2", "--encoder", "test-cli-vit", "--adapter", "lora",
                "--rank", "4", "--epochs", "1", "--n-clusters", "4", "--genes", str(_genes(tmp_path, a)), "-o", str(model)]
        r = runner.invoke(app, [*grid, "--lr", "1e-3,1e-2"])  # a grid: chosen on P0 <-> P1, then trained on both
        assert r.exit_code == 0, r.output
        assert "chosen: lr=" in r.output and r.output.count("P0") >= 2
        r = runner.invoke(app, [*grid, "--lr", "1e-3,fast"])
        assert isinstance(r.exception, sd.StdistillError) and "--lr must be a number or a comma list" in str(r.exception)
    finally:
        sd.encoders.unregister("test-cli-vit")
