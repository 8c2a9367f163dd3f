"""The niche recipe end to end (leave-one-patient-out), its CLI, and the teacher on real HER2ST."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from stdistill import StdistillError
from stdistill.cli import app

from test_niches import toy


@pytest.fixture(scope="module")
def labelled():
    a = toy(image=True, noise=1.5, seed=3)
    lab = {"0": "invasive cancer", "1": "connective tissue", "2": "adipose tissue"}
    a.obs["pathology"] = a.obs["niche_true"].map(lab).astype(object)
    a.obs.loc[a.obs_names[:3], "pathology"] = "undetermined"  # ignored by macro-F1
    return a


def test_run_leave_one_patient_out(tmp_path, labelled):
    from stdistill.recipes import niches

    a = labelled.copy()
    df, figs = niches.run(a, "X_toy", 3, out_dir=tmp_path, seed=0, student_kwargs={"max_epochs": 15, "patience": 4},
                          verbose=False)
    assert set(df["fold"]) == {"P0", "P1", "P2"}
    for fold, g in df.groupby("fold"):
        methods = set(g["method"])
        assert {"student", "kmeans", "kmeans_nbr", "teacher"} <= methods
        assert any(m.startswith("trivial (all") for m in methods)  # the trivial macro-F1 line
        st = g[g["method"] == "student"].iloc[0]
        assert 0 <= st["id_acc"] <= 1 and st["seen_share"] == 1.0 and not st["single_niche"]
        assert st["teacher_sizes"].count("/") == 2 and st["f1_section"] == f"{fold}S0"
        assert np.isfinite(g.loc[g["method"] == "teacher", "macro_f1"]).all()
    s = niches.summary(df)
    assert list(s.index) == ["student", "kmeans", "kmeans_nbr"]
    assert s.loc["student", "ari"] > 0.3  # the toy niches are learnable from the features
    assert df.attrs["teacher_nmi_patient"] < 0.2
    assert len(figs) == 3 and all(p.exists() and p.suffix == ".png" for p in figs)
    assert (tmp_path / "metrics_K3.csv").exists() and (tmp_path / "teacher_sizes_K3.csv").exists()
    assert a.obs["niche_student"].notna().all()  # each spot predicted once, while held out
    # same seed -> same numbers
    df2, _ = niches.run(labelled.copy(), "X_toy", 3, seed=0, student_kwargs={"max_epochs": 15, "patience": 4},
                        figures=False, verbose=False)
    pd.testing.assert_series_equal(df["ari"], df2["ari"])


def test_run_scores_the_refined_student_beside_the_raw_one(labelled):
    from stdistill.recipes import niches

    kw = dict(student_kwargs={"max_epochs": 6, "patience": 4}, figures=False, verbose=False)
    raw, _ = niches.run(labelled.copy(), "X_toy", 3, seed=0, **kw)
    both, _ = niches.run(labelled.copy(), "X_toy", 3, seed=0, refine=True, **kw)
    r = both[both["method"] == "student_refined"]
    assert len(r) == 3 and np.isfinite(r["ari"]).all() and np.isfinite(r["macro_f1"]).all()
    pd.testing.assert_frame_equal(raw[raw["method"] == "student"].drop(columns="seconds").reset_index(drop=True),
                                  both[both["method"] == "student"].drop(columns="seconds").reset_index(drop=True))
    assert "student_refined" in niches.summary(both).index


def test_run_refuses_single_patient(labelled):
    from stdistill.io import subset_sections
    from stdistill.recipes import niches

    one = subset_sections(labelled, ["P0S0"])
    with pytest.raises(StdistillError, match="at least 2 patients"):
        niches.run(one, "X_toy", 3, verbose=False)
    with pytest.raises(StdistillError, match="patch features"):
        niches.run(labelled.copy(), "X_missing", 3, verbose=False)


def test_cli_teacher_distill_predict_evaluate(tmp_path, labelled):
    import anndata as ad

    src = tmp_path / "toy.h5ad"
    labelled.write_h5ad(src)
    r = CliRunner()
    res = r.invoke(app, ["niches", "teacher", str(src), "-o", str(tmp_path / "t.h5ad"), "-k", "3", "--model", str(tmp_path / "teacher")])
    assert res.exit_code == 0, res.output
    assert "NMI(niche, patient)" in res.output and (tmp_path / "teacher" / "config.json").exists()
    res = r.invoke(app, ["niches", "distill", str(tmp_path / "t.h5ad"), "-m", str(tmp_path / "student"), "--features", "X_toy",
                         "--train-patients", "P1,P2", "--max-epochs", "8"])
    assert res.exit_code == 0, res.output
    assert "['P1', 'P2']" in res.output
    res = r.invoke(app, ["niches", "predict", str(src), "-m", str(tmp_path / "student"), "-o", str(tmp_path / "p.h5ad"),
                         "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    out = ad.read_h5ad(tmp_path / "p.h5ad")
    assert out.obsm["niche_pred_probs"].shape == (labelled.n_obs, 3)  # beside the teacher's keys
    n_sec = labelled.obs["section"].nunique()  # --plot draws every section
    assert len(list(tmp_path.glob("p*.png"))) == n_sec and res.output.count(".png") == n_sec
    res = r.invoke(app, ["niches", "evaluate", str(src), "-o", str(tmp_path / "ev"), "--features", "X_toy", "-k", "3",
                         "--max-epochs", "6"])
    assert res.exit_code == 0, res.output
    assert "kmeans_nbr" in res.output and (tmp_path / "ev" / "metrics_K3.csv").exists()


def test_cli_teacher_old_option_name_warns(tmp_path, labelled):
    """``--use-rep`` (the old name of ``--feature-key``) still works for one release, with a warning."""
    src = tmp_path / "toy.h5ad"
    labelled.write_h5ad(src)
    res = CliRunner().invoke(app, ["niches", "teacher", str(src), "-o", str(tmp_path / "t.h5ad"), "-k", "3", "--use-rep",
                                   "X_toy", "--model", str(tmp_path / "teacher")])
    assert res.exit_code == 0, res.output
    assert "warning: --use-rep is now --feature-key" in res.output
    from stdistill.teachers import NicheTeacher

    assert NicheTeacher.load(tmp_path / "teacher").params["feature_key"] == "X_toy"


def test_cli_bad_input_is_one_line(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", "from stdistill.cli import main; main()", "niches", "teacher",
                        str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "o.h5ad")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.her2st
@pytest.mark.slow
def test_teacher_on_her2st_is_not_a_patient_label(her2st_root):
    """On real HER2ST a globally scaled teacher finds patients; per-section standardisation does not."""
    from stdistill.datasets import her2st
    from stdistill.teachers import NicheTeacher

    a = her2st(root=her2st_root, sections=["A1", "B1", "C1", "D1"])
    NicheTeacher(4, batch_correction=None, n_top_genes=300).fit_predict(a, key_added="g")
    NicheTeacher(4, n_top_genes=300).fit_predict(a, key_added="c")
    glob, corr = a.obsm["g_probs"], a.obsm["c_probs"]
    from stdistill.metrics import nmi

    pats = a.obs["patient"].astype(str)
    assert glob.shape == corr.shape == (a.n_obs, 4)
    assert nmi(pats, a.obs["g"]) > 0.5
    assert nmi(pats, a.obs["c"]) < 0.3
