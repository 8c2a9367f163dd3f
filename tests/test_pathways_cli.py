"""`stdistill pathways score|stamp|predict` and the pathway figures."""

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _io_helpers import colour_sections
from typer.testing import CliRunner

import stdistill as sd
from stdistill.cli import app

from conftest import TINY_VIT

runner = CliRunner()

GENES = [f"G{i}" for i in range(12)]


def _gmt(tmp_path):
    """Three sets with >= 5 genes of the data, one with 2 (dropped at min_genes=5)."""
    p = tmp_path / "toy.gmt"
    p.write_text("SET_A\tfirst half\t" + "\t".join(GENES[:6]) + "\n"
                 "SET_B\tsecond half\t" + "\t".join(GENES[6:]) + "\n"
                 "SET_EVEN\teven genes\t" + "\t".join(GENES[::2]) + "\n"
                 "SET_SMALL\ttoo small\tG1\tG3\tNOT_A_GENE\n")
    return p


def _scored(tmp_path, seed=0):
    """Three imaged sections (one per patient) scored through the CLI; returns the scored file."""
    f = tmp_path / "d.h5ad"
    colour_sections(3, 5, GENES, seed).write_h5ad(f)
    out = tmp_path / "scored.h5ad"
    r = runner.invoke(app, ["pathways", "score", str(f), "--genesets", str(_gmt(tmp_path)), "--method", "mean_z", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 pathways x 75 spots" in r.output and "dropped 1 gene sets" in r.output
    return out


def test_score_writes_activities(tmp_path):
    out = _scored(tmp_path)
    a = ad.read_h5ad(out)
    df = a.obsm["pathway_scores"]
    assert isinstance(df, pd.DataFrame) and list(df.columns) == ["SET_A", "SET_B", "SET_EVEN"]
    per_section = df.groupby(a.obs["section"].astype(str).to_numpy()).mean()
    np.testing.assert_allclose(per_section.to_numpy(), 0.0, atol=1e-9)  # standardised within each section
    assert a.uns["pathway_scores"]["params"]["method"] == "mean_z"


def test_bad_genesets_is_one_error_line(tmp_path, monkeypatch, capsys):
    from stdistill.cli import main

    f = tmp_path / "d.h5ad"
    colour_sections(1, 3, GENES, 0).write_h5ad(f)
    monkeypatch.setattr(sys, "argv", ["stdistill", "pathways", "score", str(f), "--genesets", str(tmp_path / "nope.gmt"),
                                      "-o", str(tmp_path / "o.h5ad")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.gmt" in err[0]
    assert not (tmp_path / "o.h5ad").exists()


@pytest.mark.usefixtures("tiny_encoders")
def test_stamp_and_predict_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("STDISTILL_CACHE", str(tmp_path / "cache"))
    scored = _scored(tmp_path, seed=1)
    model = tmp_path / "stamp"
    base = ["pathways", "stamp", str(scored), "--test-patients", "P2", "--encoder", TINY_VIT, "--adapter", "lora",
            "--rank", "4", "--max-epochs", "1", "--size-um", "32", "--px", "32", "--batch-size", "10", "-o", str(model)]
    r = runner.invoke(app, [*base, "--val-patients", "P1", "--val-metric", "head"])
    assert r.exit_code == 0, r.output
    assert model.exists() and "STAMP settings" in r.output and "Held-out Pearson r per pathway" in r.output
    assert "mean over 3 pathways" in r.output and "SET_" in r.output and "{" not in r.output  # a table, not a dict
    per = pd.read_csv(tmp_path / "stamp_test_pearson.csv", index_col=0)
    assert list(per.columns) == ["P2"] and len(per) == 3

    # unscored data: scored in the command, training patients first
    r = runner.invoke(app, [*base[:2], str(tmp_path / "d.h5ad"), *base[3:], "--genesets", str(_gmt(tmp_path)),
                            "--method", "mean_z", "--val-patients", "P1", "--val-metric", "head"])
    assert r.exit_code == 0, r.output
    assert "scored mean_z" in r.output and "3 pathways x 25 spots" in r.output and "mean over 3 pathways" in r.output

    r = runner.invoke(app, [*base, "--w-con", "0,1", "--val-metric", "head"])  # a grid: chosen on P0 <-> P1
    assert r.exit_code == 0, r.output
    assert "Selection over 2 candidates x 2 splits: max head" in r.output and "grid, leave one training patient out" in r.output
    r = runner.invoke(app, [*base, "--w-con", "0,1", "--val-patients", "P1"])
    assert isinstance(r.exception, sd.StdistillError) and "drop --val-patients" in str(r.exception)

    pred_out, plots = tmp_path / "pred.h5ad", tmp_path / "plots"
    r = runner.invoke(app, ["pathways", "predict", str(model), str(scored), "--sections", "S2", "-o", str(pred_out),
                            "--plot", str(plots)])
    assert r.exit_code == 0, r.output
    p = ad.read_h5ad(pred_out)
    assert p.obsm["X_stamp"].shape == (25, 192) and list(p.obsm["pathway_pred"].columns) == ["SET_A", "SET_B", "SET_EVEN"]
    assert (plots / "pathways_S2.png").stat().st_size > 1000 and (plots / "pathway_bars.png").exists()

    # H&E only: the same section without genes or measured activities
    he = ad.read_h5ad(scored)
    he = sd.io.subset_sections(he, ["S2"])[:, []].copy()
    del he.obsm["pathway_scores"], he.uns["pathway_scores"]
    f = tmp_path / "he.h5ad"
    he.write_h5ad(f)
    r = runner.invoke(app, ["pathways", "predict", str(model), str(f), "-o", str(tmp_path / "he_pred.h5ad"),
                            "--plot", str(tmp_path / "he_plots"), "--plot-pathways", "SET_B"])
    assert r.exit_code == 0, r.output
    got = ad.read_h5ad(tmp_path / "he_pred.h5ad")
    assert got.n_vars == 0 and np.isfinite(got.obsm["pathway_pred"].to_numpy()).all()
    np.testing.assert_allclose(got.obsm["pathway_pred"].to_numpy(), p.obsm["pathway_pred"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "he_plots" / "pathways_S2.png").exists() and not (tmp_path / "he_plots" / "pathway_bars.png").exists()


def test_stamp_targets_ignore_held_out_patients(tmp_path):
    """Scoring inside `pathways stamp`: the test patient's spots change neither the kept sets nor the
    training targets; held-out spots get the training columns (a set undetected there is 0)."""
    import warnings

    from stdistill.cli._common import patient_split
    from stdistill.cli.pathways import KEY, score_split

    extra = [f"X{i}" for i in range(6)]
    a = colour_sections(3, 5, GENES + extra, 2)
    X = a.X.toarray()
    p2 = (a.obs["patient"] == "P2").to_numpy()
    X[np.ix_(~p2, [a.var_names.get_loc(g) for g in extra])] = 0  # X* genes detected in P2 only
    X[np.ix_(p2, [a.var_names.get_loc(g) for g in GENES[6:]])] = 0  # SET_B undetected in P2
    a.X = X
    gmt = _gmt(tmp_path)
    gmt.write_text(gmt.read_text() + "SET_X\tP2 only\t" + "\t".join(extra) + "\n")

    with_p2 = patient_split(a, "P2", None)
    s = score_split(with_p2, str(gmt), "mean_z")
    without = patient_split(sd.io.subset_sections(a, ["S0", "S1"]), "", None)
    score_split(without, str(gmt), "mean_z")
    cols = ["SET_A", "SET_B", "SET_EVEN"]
    tr = with_p2["train"].obsm[KEY]
    assert list(tr.columns) == cols and s["dropped"] == ["SET_SMALL", "SET_X"]
    pd.testing.assert_frame_equal(tr, without["train"].obsm[KEY])
    te = with_p2["test"].obsm[KEY]
    assert list(te.columns) == cols and s["filled"] == {"test": ["SET_B"]} and (te["SET_B"] == 0).all()
    np.testing.assert_allclose(te[["SET_A", "SET_EVEN"]].mean().to_numpy(), 0.0, atol=1e-9)  # per-section standardised

    # scoring every patient at once (as before) keeps SET_X and moves the training rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = sd.pp.pathway_scores(a, str(gmt), "mean_z", standardize="section", copy=True).obsm[KEY]
    assert "SET_X" in whole.columns
    assert not np.allclose(whole.loc[tr.index, cols].to_numpy(), tr.to_numpy())


def _with_predictions(seed=0):
    a = colour_sections(2, 4, GENES, seed)
    rng = np.random.default_rng(seed)
    names = ["PW_A", "PW_B", "PW_C"]
    meas = pd.DataFrame(rng.normal(size=(a.n_obs, 3)), index=a.obs_names, columns=names)
    a.obsm["pathway_scores"] = meas
    a.obsm["pathway_pred"] = meas * 0.5 + pd.DataFrame(rng.normal(size=(a.n_obs, 3)), index=a.obs_names, columns=names)
    return a


def test_pathway_maps_and_bars(tmp_path):
    a = _with_predictions()
    fig = sd.pl.pathways(a, ["PW_A", "PW_B"], section="S0", path=tmp_path / "m.png")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 and len(fig.axes) == 6  # 2 pathways x (measured, predicted) + one shared colour bar per row
    assert "r = " in panels[1].get_title() and "measured" in panels[0].get_title()
    assert "shared colour scale per pathway" in fig._suptitle.get_text()
    assert (tmp_path / "m.png").stat().st_size > 1000
    fig = sd.pl.pathways(a, "PW_C", section="S1", scale="panel")
    assert len(fig.axes) == 4 and "each panel its own" in fig._suptitle.get_text()

    he = a.copy()
    del he.obsm["pathway_scores"]
    fig = sd.pl.pathways(he, ["PW_A", "PW_B", "PW_C"], section="S0")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 and all("predicted" in ax.get_title() and "r = " not in ax.get_title() for ax in panels)
    with pytest.raises(sd.StdistillError, match="not in obsm"):
        sd.pl.pathways(a, ["NOPE"], section="S0")

    per = pd.DataFrame({"fold0": [0.5, 0.2, -0.1], "fold1": [0.6, 0.1, 0.0], "fold2": [0.4, 0.3, np.nan]},
                       index=["PW_A", "PW_B", "PW_C"])
    fig = sd.pl.pathway_bars(per, top=2, path=tmp_path / "b.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["PW_A", "PW_B"]
    assert ax.patches[0].get_width() == pytest.approx(0.5) and "3 folds" in ax.get_xlabel()
    assert (tmp_path / "b.png").stat().st_size > 1000
