"""AMKD survival recipe: NLL by hand, training-fold bins, C-index vs torchsurv/lifelines, an H&E-only
student that never reads genes, save/load, the distillation terms, CV and the command line."""

import math

import numpy as np
import pytest
import torch
from _survival_helpers import tiny_cohort, write_tcga_like

import stdistill as sd
from stdistill import StdistillError
from stdistill.recipes import (
    SurvivalConfig,
    SurvivalModel,
    amkd,
    patient_folds,
    survival_cv,
)
from stdistill.recipes._survival import (
    Method,
    discrepancy_weights,
    fit_time_bins,
    nll_loss,
    redundancy_reduction,
    select_survival,
    time_to_bin,
)

FAST = dict(dim=8, max_epochs=2, batch_size=8, min_genes=3)


def test_nll_equals_hand_computation():
    logits = torch.tensor([[0.0, 1.0, -1.0], [0.5, -0.5, 2.0]])
    y, event = torch.tensor([1, 2]), torch.tensor([1.0, 0.0])
    h = [[1 / (1 + math.exp(-v)) for v in row] for row in logits.tolist()]
    # patient 0: event in bin 1 -> -(log S_0 + log h_1); patient 1: censored in bin 2 -> -log S_2
    l0 = -(math.log(1 - h[0][0]) + math.log(h[0][1]))
    l1 = -math.log((1 - h[1][0]) * (1 - h[1][1]) * (1 - h[1][2]))
    assert nll_loss(logits, y, event).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert nll_loss(logits, y, event, alpha=0.5, reduction="sum").item() == pytest.approx(l0 + 0.5 * l1, rel=1e-6)
    # event in the first bin: S_{-1} = 1, so only -log h_0
    assert nll_loss(logits[:1], torch.tensor([0]), torch.tensor([1.0])).item() == pytest.approx(-math.log(h[0][0]), rel=1e-6)


def test_time_bins_use_event_times_and_clip():
    edges = fit_time_bins(np.array([1.0, 2, 3, 4, 100]), np.array([1, 1, 1, 1, 0]), n_bins=4)
    np.testing.assert_allclose(edges[1:-1], np.quantile([1.0, 2, 3, 4], [0.25, 0.5, 0.75]))  # the censored 100 is ignored
    assert list(time_to_bin(np.array([0.0, 1.75, 2.5, 3.25, 1e9]), edges)) == [0, 1, 2, 3, 3]
    with pytest.raises(StdistillError, match="no event"):
        fit_time_bins(np.ones(3), np.zeros(3))


def test_bins_come_from_the_training_fold_only():
    c = tiny_cohort(n=24)
    folds = patient_folds(c, 3)
    name, tr, te = folds[0]

    def bins_of(cohort):
        got = {}
        cfg = SurvivalConfig(kind="abmil", **{**FAST, "max_epochs": 0})  # bins are fitted before any training
        survival_cv(cohort, [Method("abmil", cfg)], [folds[0]], select=False,
                    on_fit=lambda fold, seed, m, model, *_: got.setdefault(fold, model.bins_))
        return got[name]

    moved = c.subset(c.patients)
    moved.table.loc[te, "time"] *= 100.0  # test patients' times change ...
    np.testing.assert_array_equal(bins_of(c), bins_of(moved))  # ... the bins do not
    np.testing.assert_array_equal(bins_of(c), fit_time_bins(c.subset(tr).time, c.subset(tr).event))
    moved.table.loc[tr, "time"] *= 100.0  # training times do move them (the check can fail)
    assert not np.array_equal(bins_of(c), bins_of(moved))


def test_cindex_equals_torchsurv_and_lifelines():
    from lifelines.utils import concordance_index
    from torchsurv.metrics.cindex import ConcordanceIndex
    from torchsurv.stats.ipcw import get_ipcw

    rng = np.random.default_rng(1)
    t = rng.permutation(np.arange(1, 41)).astype(float)  # no tied times
    e = rng.random(40) < 0.6
    r = rng.normal(size=40) - 0.05 * t
    ours = sd.metrics.cindex(t, e, r)
    assert ours == pytest.approx(concordance_index(t, -r, e), abs=1e-7)
    T, E, R = torch.tensor(t), torch.tensor(e), torch.tensor(r)
    assert ours == pytest.approx(float(ConcordanceIndex()(R, E, T)), abs=1e-7)
    tt, te = rng.uniform(1, 40, 60), rng.random(60) < 0.5
    uno = float(ConcordanceIndex()(R, E, T, weight=get_ipcw(torch.tensor(te), torch.tensor(tt), T).double()))
    assert sd.metrics.cindex_uno(t, e, r, tt, te) == pytest.approx(uno, abs=1e-7)
    assert sd.metrics.cindex([1.0, 2.0, 3.0], [1, 1, 0], [3.0, 2.0, 1.0]) == 1.0
    assert math.isnan(sd.metrics.cindex([1.0, 2.0], [0, 0], [1.0, 2.0]))
    assert 0.0 <= sd.metrics.time_auc(t, e, r, at=20.0, train_time=tt, train_event=te) <= 1.0


def test_redundancy_reduction_and_adaptive_weights():
    q, _ = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))
    z = (q - q.mean(0)) / q.std(0, unbiased=False)
    z = torch.linalg.qr(z)[0] * math.sqrt(32)  # centred, orthogonal columns: cross-correlation = identity
    assert redundancy_reduction(z, z).item() == pytest.approx(0.0, abs=1e-4)
    assert redundancy_reduction(z, -z).item() == pytest.approx(4.0, rel=1e-3)  # (1 - (-1))^2 per dim / D
    w = discrepancy_weights(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0, -3.0]))
    assert w.mean().item() == pytest.approx(1.0) and int(w.argmax()) == 3 and not w.requires_grad


def test_student_needs_no_genes_and_ignores_them():
    c = tiny_cohort(n=24)
    teacher, student = amkd(c, teacher=SurvivalConfig(kind="gge", **FAST), student=SurvivalConfig(**FAST))
    with_genes = student.predict(c)
    no_genes = student.predict(c.without_rna())
    scrambled = c.subset(c.patients)
    scrambled.rna[:] = np.nan
    np.testing.assert_array_equal(with_genes.to_numpy(), no_genes.to_numpy())
    np.testing.assert_array_equal(with_genes.to_numpy(), student.predict(scrambled).to_numpy())
    assert student.genes_ == [] and np.isfinite(no_genes).all()
    with pytest.raises(StdistillError, match="needs the RNA table"):
        teacher.predict(c.without_rna())
    att = student.attention(c)
    assert set(att) == set(c.bags) and all(abs(v.sum() - 1) < 1e-5 for v in att.values())


def test_save_load_round_trip(tmp_path):
    c = tiny_cohort(n=20)
    for cfg in (SurvivalConfig(kind="gge", **FAST), SurvivalConfig(kind="abmil", loss="cox", **FAST),
                SurvivalConfig(kind="clinical", clinical=("age",), **FAST)):
        m = SurvivalModel(cfg).fit(c)
        m.save(tmp_path / cfg.kind)
        assert sorted(p.name for p in (tmp_path / cfg.kind).iterdir()) == ["config.json", "model.safetensors"]
        back = SurvivalModel.load(tmp_path / cfg.kind)
        np.testing.assert_array_equal(back.predict(c).to_numpy(), m.predict(c).to_numpy())
        np.testing.assert_array_equal(back.bins_, m.bins_)
        assert back.config == m.config and back.genes_ == m.genes_
    (tmp_path / "gge" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(StdistillError, match="model.safetensors is unreadable"):
        SurvivalModel.load(tmp_path / "gge")


def test_configs_and_inputs_are_checked():
    c = tiny_cohort(n=12)
    with pytest.raises(StdistillError, match="kind must be"):
        SurvivalConfig(kind="transformer")
    with pytest.raises(StdistillError, match="needs a fitted teacher"):
        SurvivalModel(kind="student", **FAST).fit(c)
    with pytest.raises(StdistillError, match="gene family"):
        SurvivalModel(kind="snn", **{**FAST, "min_genes": 50}).fit(c)
    with pytest.raises(StdistillError, match="not fitted"):
        SurvivalModel().predict(c)


def test_selection_and_cv_with_a_student():
    c = tiny_cohort(n=24, signal=1.5)
    sel = select_survival(c, SurvivalConfig(kind="abmil", **FAST), [{"lr": 1e-3}, {"lr": 3e-3}], inner_k=2)
    cfg, table = sel.config(), sel.table
    assert 0 <= cfg.max_epochs <= 2 and cfg.lr in (1e-3, 3e-3)
    assert len(table) == 4 and all(len(v) == 3 for v in table["curve"])  # 2 candidates x 2 splits, epochs 0..2
    assert (sel.criterion.metric, sel.criterion.smooth) == ("val_cindex", 3)  # measured curves, smoothed to choose
    base = SurvivalConfig(**FAST)
    methods = [Method("gge_teacher", SurvivalConfig(kind="gge", **FAST)), Method("amkd", SurvivalConfig(kind="student", **FAST), "gge_teacher")]
    res, sel = survival_cv(c, methods, patient_folds(c, 2), seeds=(0, 1), inner_k=2)
    assert set(res["method"]) == {"gge_teacher", "amkd", "oracle"} and len(res) == 2 * 2 * 3
    assert res["cindex"].between(0, 1).all() and set(sel["method"]) == {"gge_teacher", "amkd"}
    table = sd.recipes.cv_table(res)
    assert {"cindex_mean", "cindex_sd", "C_fold0", "C_fold1"} <= set(table.columns) and base.kind == "abmil"


def test_cli_fit_predict_evaluate(tmp_path):
    from typer.testing import CliRunner

    from stdistill.cli import app

    f = write_tcga_like(tmp_path, tiny_cohort(n=20))
    files = ["--clinical", str(f["clinical"]), "--features", str(f["features"]), "--time-col", "OS_MONTHS",
             "--event-col", "OS_STATUS"]
    r = CliRunner().invoke(app, ["survival", "fit", "-o", str(tmp_path / "m"), *files, "--rna", str(f["rna"]),
                                 "--method", "amkd", "--epochs", "2", "--dim", "8"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "teacher" / "config.json").is_file()
    r = CliRunner().invoke(app, ["survival", "predict", str(tmp_path / "m"), "--features", str(f["features"]),
                                 "-o", str(tmp_path / "risk.csv"), "--plot", str(tmp_path / "fig"), "--n-maps", "1"])
    assert r.exit_code == 0, r.output  # no clinical table, no RNA: the student reads slides only
    assert (tmp_path / "risk.csv").read_text().count("\n") == 21 and len(list((tmp_path / "fig").glob("attention_*.png"))) == 1
    # groups come from the cut stored at training, the same for a cohort of one patient as for all
    import pandas as pd

    from stdistill.recipes._survival import SurvivalModel

    cut = SurvivalModel.load(tmp_path / "m").risk_cut_
    df = pd.read_csv(tmp_path / "risk.csv", index_col=0)
    assert cut is not None and (df["group"] == np.where(df["risk"] > cut, "high risk", "low risk")).all()
    r = CliRunner().invoke(app, ["survival", "predict", str(tmp_path / "m"), *files, "-o", str(tmp_path / "risk_c.csv"),
                                 "--plot", str(tmp_path / "fig_c"), "--n-maps", "0"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fig_c" / "km_risk_groups.png").is_file() or "Kaplan-Meier skipped" in r.output
    r = CliRunner().invoke(app, ["survival", "evaluate", "-o", str(tmp_path / "ev"), *files, "--methods", "abmil,clinical",
                                 "--clinical-cols", "age", "--folds", "2", "--epochs", "2", "--dim", "8", "--no-select"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ev" / "table.csv").is_file() and (tmp_path / "ev" / "cindex_bars.png").is_file()
    r = CliRunner().invoke(app, ["survival", "evaluate", *files, "--methods", "nope"])
    assert r.exit_code != 0 and "unknown methods" in str(r.exception or r.output)


def test_draw_times_censoring_share():
    from stdistill.datasets.her2st_survival import draw_times

    lh = np.random.default_rng(0).normal(size=4000)
    t, e = draw_times(lh, 0.35, 1 / 36, np.random.default_rng(1))
    assert abs((1 - e.mean()) - 0.35) < 0.03 and (t > 0).all()
    assert sd.metrics.cindex(t[:400], e[:400], lh[:400]) > 0.6  # the hazard orders the times


@pytest.mark.usefixtures("tiny_encoders")
def test_semisynthetic_and_simulated_cohorts(tmp_path):
    from conftest import TINY_EFF

    from stdistill.datasets.her2st_survival import her2st_survival, simulated_survival

    kw = dict(encoder=TINY_EFF, size_um=32, px=32, cache_dir=tmp_path)
    spots = sd.datasets.simulated(n_sections=2, n_patients=2, spots_per_section=30)
    _, sets = __import__("_survival_helpers").hallmark_genes(n_sets=2, per_set=40)
    symbols = list(dict.fromkeys(g for v in sets.values() for g in v))
    spots.var_names = symbols + [f"X{i}" for i in range(spots.n_vars - len(symbols))]  # real symbols for two sets
    c = her2st_survival(spots=spots, n_per_patient=6, radius_um=(300, 500), min_spots=5,
                        risk_pathways={k: 1.0 for k in sets}, **kw)
    assert len(c.patients) == 12 and set(c.table["source_patient"]) == {"s"}  # "simP0"/"simP1" -> first letter
    assert c.table["hazard_true"].std() > 0 and np.isfinite(c.rna.to_numpy()).all()
    assert all(len(c.bag(p)) >= 5 and c.bag(p).shape[1] == 1280 for p in c.patients)
    np.testing.assert_allclose(c.rna.groupby(c.table["section"]).mean().to_numpy(), 0, atol=1e-9)  # centred per section
    s = simulated_survival(n_patients=4, spots_per_section=10, **kw)  # sections of ~10 spots
    assert len(s.patients) == 4 and {"tumour_B", "lymphocyte"} <= set(s.table.columns)
    assert set(s.meta["genesets"]["source"]) >= {"tumour_A", "T_cell"}


def test_inference_batches_respect_a_padding_budget():
    from stdistill.recipes._survival._module import _length_batches

    b = _length_batches([5, 100, 3, 40000, 7], batch_size=2, max_cells=1000)
    assert sorted(i for g in b for i in g) == [0, 1, 2, 3, 4] and [3] in b and all(len(g) <= 2 for g in b)
