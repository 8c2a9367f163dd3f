"""AMKD with incomplete modalities, the reachable redundancy loss and the stored risk cut."""

import numpy as np
import pytest
import torch
from _survival_helpers import tiny_cohort

from stdistill import StdistillError
from stdistill.recipes import SurvivalConfig, SurvivalModel, amkd, patient_folds, survival_cv
from stdistill.recipes._survival import Method, SurvivalModule, mask_rna, redundancy_reduction, whitened_redundancy
from stdistill.recipes._survival._module import Collate, run_net

FAST = dict(dim=8, max_epochs=2, batch_size=8, min_genes=3)


def test_mask_rna_is_fixed_nested_and_checked():
    c = tiny_cohort(n=20)
    a, b = mask_rna(c, 0.25), mask_rna(c, 0.5)
    gone = lambda x: set(x.rna.index[x.rna.isna().all(axis=1)])  # noqa: E731
    assert len(gone(a)) == 5 and len(gone(b)) == 10 and gone(a) < gone(b)
    assert gone(mask_rna(c, 0.25)) == gone(a) and not c.rna.isna().any().any()  # same draw; the input is untouched
    assert mask_rna(c, 0.0) is c
    with pytest.raises(StdistillError, match="missing_rna"):
        mask_rna(c, 1.0)
    with pytest.raises(StdistillError, match="share missing_rna"):
        survival_cv(c, [Method("t", SurvivalConfig(kind="gge", **FAST), missing_rna=0.5),
                        Method("s", SurvivalConfig(kind="student", **FAST), "t")], patient_folds(c, 2), select=False)


def test_training_with_missing_rna_runs():
    c = mask_rna(tiny_cohort(n=24), 1 / 3)
    has = ~c.rna.isna().all(axis=1).to_numpy()
    teacher, student = amkd(c, teacher=SurvivalConfig(kind="gge", **FAST), student=SurvivalConfig(**FAST))
    assert teacher.n_missing_rna_ == 8 and student.n_missing_rna_ == 8
    rna = c.rna[teacher.genes_].to_numpy()[has]
    np.testing.assert_allclose(teacher.gene_mean_, rna.mean(0))  # genes standardised on the patients with RNA
    assert np.isfinite(student.predict(c.without_rna())).all()
    assert np.isfinite(teacher.predict(c.subset(np.asarray(c.patients)[has]))).all()
    with pytest.raises(StdistillError, match="no \\(complete\\) RNA"):
        teacher.predict(c)  # a genomic model never predicts without genes
    none = mask_rna(c, 0.95)
    with pytest.raises(StdistillError, match=">= 2 training patients with an RNA profile"):
        SurvivalModel(kind="gge", **FAST).fit(none)


def _module_and_batch(c, teacher, cfg):
    student = SurvivalModel(SurvivalConfig(kind="student", **cfg))
    student._fit_inputs(c, None, teacher)
    arrays = student._arrays(c, teacher)
    net = student._build().eval()
    from dataclasses import asdict

    return SurvivalModule(net, asdict(student.config), teacher=teacher.net_), arrays


@pytest.mark.parametrize("form", ["batch", "whitened"])
def test_patients_without_rna_never_enter_the_distillation_terms(form):
    c = mask_rna(tiny_cohort(n=24), 1 / 3)
    teacher = SurvivalModel(kind="gge", **FAST).fit(c)
    cfg = {**FAST, "rr_form": form, "w_logit": 1.0}
    seen = []
    hook = teacher.net_.register_forward_pre_hook(lambda _m, args: seen.append(args[2].clone()))
    module, arrays = _module_and_batch(c, teacher, cfg)
    has = arrays.has_rna.numpy()
    idx = list(range(len(c.patients)))
    batch = Collate(arrays)(idx)
    with torch.no_grad():
        full = module.distill_terms(run_net(module.net, batch), batch)
    assert set(full) == {"feat", "rr", "logit"} and all(torch.isfinite(v) for v in full.values())
    assert len(seen) == 1 and len(seen[0]) == has.sum()  # the teacher saw the patients with RNA only
    # their inputs replaced by garbage (NaN genes, huge bags): the terms do not move
    arrays.genes[~arrays.has_rna] = float("nan")
    for i in np.flatnonzero(~has):
        arrays.bags[i] = arrays.bags[i] * 0 + 1e6
    module2, _ = _module_and_batch(c, teacher, cfg)
    module2.net.load_state_dict(module.net.state_dict())
    garbage = Collate(arrays)(idx)
    with torch.no_grad():
        again = module2.distill_terms(run_net(module2.net, garbage), garbage)
    for k in full:
        assert torch.equal(full[k], again[k]), k
    # a batch without any patient with RNA: no distillation term, a finite loss
    none = Collate(arrays)(list(np.flatnonzero(~has)))
    assert module.distill_terms(run_net(module.net, none), none) == {}
    assert torch.isfinite(module.training_step(none, 0))
    hook.remove()


def test_reachable_redundancy_loss_reaches_zero_where_the_old_form_cannot():
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(16, 64, generator=g) @ torch.randn(64, 64, generator=g)  # 16 rows, 64 correlated dims
    assert whitened_redundancy(zt, zt).item() < 1e-4  # the student equal to its teacher reaches the target
    assert whitened_redundancy(zt * 3 + 1, zt).item() < 1e-4  # up to a shift and scale
    assert redundancy_reduction(zt, zt).item() > 0.05  # the old form: rank <= 15, identity out of reach
    w = torch.rand(16, generator=g) + 0.1
    assert whitened_redundancy(zt, zt, w).item() < 1e-4  # weighted rows too

    def fitted(loss):
        zs = torch.randn(16, 64, generator=g, requires_grad=True)
        opt = torch.optim.Adam([zs], lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            v = loss(zs, zt)
            v.backward()
            opt.step()
        return loss(zs, zt).item()

    assert fitted(whitened_redundancy) < 1e-3
    assert fitted(redundancy_reduction) > 0.05 * (64 - 15) / 64  # >= offdiag x (D - rank) / D for every student


def test_risk_cut_comes_from_the_training_patients(tmp_path):
    c = tiny_cohort(n=30)
    _, tr, te = patient_folds(c, 3)[0]
    m = SurvivalModel(kind="abmil", **FAST).fit(c.subset(tr))
    assert m.risk_cut_ == pytest.approx(float(np.median(m.predict(c.subset(tr)))), abs=1e-12)
    m.save(tmp_path / "m")
    back = SurvivalModel.load(tmp_path / "m")  # the cut travels with the model
    assert back.risk_cut_ == m.risk_cut_ and (back.predict_group(c) == m.predict_group(c)).all()
    groups = m.predict_group(c.subset(te))
    one = m.predict_group(c.subset(te[:1]))
    assert one.iloc[0] == groups.iloc[0]  # a patient's group does not depend on who else is predicted
    shifted = c.subset(te)
    shifted.bags = {s: b + 50.0 for s, b in shifted.bags.items()}
    assert set(m.predict_group(shifted)) <= {"high risk", "low risk"} and len(m.predict_group(shifted)) == len(te)
    r = m.predict(shifted)
    assert (m.predict_group(shifted) == np.where(r > m.risk_cut_, "high risk", "low risk")).all()
    with pytest.raises(StdistillError, match="risk cut"):
        SurvivalModel(kind="abmil").predict_group(c)


def test_cv_with_missing_rna_masks_training_patients_only():
    c = tiny_cohort(n=24)
    got = {}
    methods = [Method("t", SurvivalConfig(kind="gge", **FAST), missing_rna=0.5),
               Method("s", SurvivalConfig(kind="student", rr_form="whitened", rr_weight="adaptive_down", **FAST), "t",
                      missing_rna=0.5)]
    res, _ = survival_cv(c, methods, patient_folds(c, 2), select=False,
                         on_fit=lambda fold, seed, name, model, test, risk: got.setdefault((fold, name), (model, test)))
    for (fold, name), (model, test) in got.items():
        assert model.n_missing_rna_ == 6 and not test.rna.isna().any().any()  # 12 training patients, half masked
    assert res.query("method == 't'")["cindex"].notna().all()  # the teacher is scored on test patients with RNA
    with pytest.raises(StdistillError, match="rr_form"):
        SurvivalConfig(rr_form="queue")


def test_cli_fit_with_an_rna_table_missing_patients(tmp_path):
    import pandas as pd
    from _survival_helpers import write_tcga_like
    from typer.testing import CliRunner

    from stdistill.cli import app

    f = write_tcga_like(tmp_path, tiny_cohort(n=20))
    rna = pd.read_csv(f["rna"], sep="\t", index_col=0)
    rna.iloc[:, :6].to_csv(tmp_path / "rna_few.tsv", sep="\t")  # 6 of 20 patients have RNA
    r = CliRunner().invoke(app, ["survival", "fit", "-o", str(tmp_path / "m"), "--clinical", str(f["clinical"]),
                                 "--features", str(f["features"]), "--time-col", "OS_MONTHS", "--event-col", "OS_STATUS",
                                 "--rna", str(tmp_path / "rna_few.tsv"), "--method", "amkd", "--epochs", "2", "--dim", "8"])
    assert r.exit_code == 0, r.output
    assert "20 patients" in r.output and "14 without RNA" in r.output
    assert (tmp_path / "m" / "teacher" / "config.json").is_file()
