"""The selection engine: splitters, criteria, the Selection record, the old call forms."""

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from _io_helpers import colour_sections

from stdistill import StdistillError
from stdistill.select import (
    Criterion,
    LeaveOnePatientOut,
    PatientFolds,
    Selection,
    ValidationPatients,
    ValidationRows,
    choose,
    inner_splits,
    select,
    smooth_curve,
)


@dataclass
class Cfg:
    lr: float = 1.0
    max_epochs: int = 3
    patience: int = 1
    val_metric: str = "score"

    @property
    def maximize(self) -> bool:
        return self.val_metric != "mse"


def _h(x):
    return [float.fromhex(v) for v in x] if isinstance(x, list) else float.fromhex(x)


def _table(rows, kind="curve"):
    """A Selection table from (candidate, split, value) rows."""
    return pd.DataFrame([{"candidate": c, "split": s, kind: v} for c, s, v in rows])


# ----------------------------------------------------------------------------- select + splitters
def test_select_runs_every_candidate_on_every_inner_patient_and_picks_best_mean():
    a = colour_sections(4, 3, ["G0"], 0)  # patients P0..P3
    train = a[a.obs["patient"] != "P3"].copy()  # a fold's training patients: P3 is its test patient
    seen = []

    def fit(cfg, split):
        vp = set(split.val.obs["patient"])
        assert not vp & set(split.train.obs["patient"])  # never trains on its validation patient
        assert "P3" not in vp | set(split.train.obs["patient"])  # the test patient never reaches the engine
        seen.append((cfg.lr, cfg.patience, split.parts["vp"], split.train.n_obs))
        peak = 2 if cfg.lr == 0.1 else 1
        return [0.0] + [1.0 - abs(e - peak) * 0.5 + (0.01 if cfg.lr == 0.1 else 0) for e in range(1, cfg.max_epochs + 1)]

    sel = select(train, fit, [{"lr": 1.0}, {"lr": 0.1}], base=Cfg(), parts=lambda s: {"vp": s.name}, full_curves=True)
    assert isinstance(sel, Selection) and len(sel.table) == 6 and list(sel.table["split"].unique()) == ["P0", "P1", "P2"]
    assert list(sel.table.columns) == ["candidate", "lr", "split", "curve", "seconds"]
    assert all(p == 4 for _, p, _, _ in seen)  # no early stopping while recording curves
    assert [s[2] for s in seen] == ["P0", "P1", "P2"] * 2  # candidate-major
    assert sel.choice == {"candidate": 1, "settings": {"lr": 0.1}, "epoch": 2, "score": 1.01}
    best = sel.config()
    assert (best.lr, best.max_epochs, best.patience) == (0.1, 2, 1)  # the base's own patience comes back
    s = sel.summary()
    assert list(s.columns) == ["candidate", "lr", "P0", "P1", "P2", "score", "epoch", "chosen"]
    assert list(s["chosen"]) == ["", "*"] and s["P0"].tolist() == [1.0, 1.01]
    text = str(sel)
    assert "max score (mean curve over splits" in text and "chosen: lr=0.1, epochs=2" in text


def test_select_with_scalar_scores_split_major_order_and_where():
    order = []

    def fit(settings, split):
        order.append((settings["k"], split.name))
        return {"a": 1.0, "b": 3.0}[split.name] * settings["k"]

    cands = [{"k": 1}, {"k": 2}, {"k": 0.5}]
    rows = pd.Series({"s1": "a", "s2": "b"})  # section -> patient mapping
    sel = select(rows, fit, cands, order="splits", criterion=Criterion(maximize=False), where=lambda c: c["k"] >= 1)
    assert order == [(1, "a"), (2, "a"), (0.5, "a"), (1, "b"), (2, "b"), (0.5, "b")]
    assert list(sel.table["candidate"]) == [0, 0, 1, 1, 2, 2] and "score" in sel.table
    assert sel.choice["candidate"] == 0 and sel.choice["epoch"] is None and sel.choice["score"] == 2.0
    assert sel.rechoose().choice["candidate"] == 2  # without `where`, the smallest mean wins
    assert sel.config() == {"k": 1}


def test_splitters_hold_out_whole_patients_of_the_data_given():
    a = colour_sections(3, 3, ["G0"], 0)
    small = a[~((a.obs["patient"] == "P1").to_numpy() & (np.arange(a.n_obs) % 3 == 0))].copy()  # P1 has fewest rows
    lopo = LeaveOnePatientOut()(small)
    assert [s.name for s in lopo] == ["P0", "P1", "P2"]
    for s in lopo:
        assert set(s.val.obs["patient"]) == {s.name} and s.name not in set(s.train.obs["patient"])
        assert (s.train_rows | s.val_rows).all() and not (s.train_rows & s.val_rows).any()
    each = LeaveOnePatientOut(first="smallest").masks(small)
    assert [n for n, _, _ in each] == ["P1", "P0", "P2"]  # the niche student's 'each': smallest first
    rows = np.ones(small.n_obs, dtype=bool)
    rows[-4:] = False  # unusable rows (no features) are neither trained nor validated nor counted
    (name, tr, va), = ValidationPatients("smallest").masks(small, rows)
    assert name == "P2" and not (tr | va)[-4:].any() and set(small.obs["patient"][va]) == {"P2"}
    assert ValidationPatients(["P2"])(small)[0].val.obs["patient"].unique().tolist() == ["P2"]
    with pytest.raises(StdistillError, match="not in the training data"):
        ValidationPatients(["P9"])(small)
    with pytest.raises(StdistillError, match="at least 2"):
        LeaveOnePatientOut()(a[a.obs["patient"] == "P0"].copy())
    block = np.arange(a.n_obs) < 4
    (b,) = ValidationRows(block)(a)
    assert b.name == "block" and b.val.n_obs == 4 and b.train.n_obs == a.n_obs - 4
    with pytest.raises(StdistillError, match="rows"):
        ValidationRows(block[:3])(a)


def _cohort(n=24, seed=0):
    from stdistill.io._cohort import Cohort

    rng = np.random.default_rng(seed)
    pats = [f"P{i:02d}" for i in range(n)]
    table = pd.DataFrame({"time": rng.exponential(1.0, n) + 0.01, "event": (np.arange(n) % 3 == 0).astype(int)}, index=pats)
    return Cohort(table, {f"{p}-S1": rng.normal(size=(3, 2)).astype(np.float32) for p in pats}, {f"{p}-S1": p for p in pats})


def test_survival_splitter_by_group_or_stratified_folds():
    c = _cohort()
    folds = PatientFolds(3, seed=0).folds(c)
    assert len(folds) == 3 and sorted(p for _, _, te in folds for p in te) == sorted(c.patients)
    for _, tr, te in folds:
        assert not set(tr) & set(te) and c.subset(te).event.sum() >= 1  # stratified: events in every fold
    c.table["site"] = ["A"] * 8 + ["B"] * 8 + ["C"] * 8
    by = PatientFolds(groups="site")(c)
    assert [s.name for s in by] == ["A", "B", "C"]
    assert set(by[0].val.patients) == set(c.patients[:8]) and not set(by[0].train.patients) & set(by[0].val.patients)
    none = c.subset(list(c.patients))
    none.table["event"] = 0
    with pytest.raises(StdistillError, match="no inner validation split has an event"):
        PatientFolds(2, require_event=True)(none)
    with pytest.raises(StdistillError, match="no column"):
        PatientFolds(groups="nothing").folds(c)


# ----------------------------------------------------------------------------- criteria
def test_mean_curve_and_best_per_split_disagree_as_defined():
    t = _table([(0, "A", [0.0, 0.9, 0.1]), (0, "B", [0.0, 0.1, 0.9]),  # mean curve peaks at 0.5
                (1, "A", [0.0, 0.6, 0.6]), (1, "B", [0.0, 0.6, 0.6])])  # 0.6 everywhere after epoch 0
    cands = [{"x": 0}, {"x": 1}]
    mean_curve = Selection.from_table(t, cands, Criterion())
    assert mean_curve.choice == {"candidate": 1, "settings": {"x": 1}, "epoch": 1, "score": 0.6}
    per_split = Selection.from_table(t, cands, Criterion(aggregate="best_per_split", first_epoch=1))
    assert per_split.choice["candidate"] == 0 and per_split.choice["score"] == 0.9
    assert per_split.choice["epoch"] == 2  # the splits' best epochs, counted from 1: 2 and 3, mean 2.5, rounded to even
    assert list(per_split.summary()[["A", "B"]].iloc[0]) == [0.9, 0.9]
    # smoothing over 3 epochs before averaging
    assert smooth_curve([0.0, 0.9, 0.1], 3) == pytest.approx([0.45, 1 / 3, 0.5])
    sm = Selection.from_table(t, cands, Criterion(smooth=3))  # smoothed means: [0.45, 1/3, 0.5] and [0.3, 0.4, 0.6]
    assert (sm.choice["candidate"], sm.choice["epoch"]) == (1, 2)


def test_ties_first_within_tol_or_running_and_nan_last():
    t = _table([(0, "A", 0.5), (1, "A", 0.5 + 6e-10), (2, "A", 0.5 + 1.2e-9), (3, "A", np.nan)], "score")
    cands = [{"i": i} for i in range(4)]
    assert Selection.from_table(t, cands, Criterion()).choice["candidate"] == 2  # exact best
    assert Selection.from_table(t, cands, Criterion(tol=1e-9)).choice["candidate"] == 1  # first within tol of the best
    assert Selection.from_table(t, cands, Criterion(tol=1e-9, ties="running")).choice["candidate"] == 2  # 2 beats 0 by > tol
    assert Selection.from_table(t, cands, Criterion(maximize=False)).choice["candidate"] == 0  # NaN ranks last
    exact = _table([(0, "A", 0.3), (1, "A", 0.3)], "score")
    assert Selection.from_table(exact, [{}, {}], Criterion()).choice["candidate"] == 0
    two = _table([(0, "A", np.nan), (0, "B", 0.2), (1, "A", 0.1), (1, "B", 0.1)], "score")
    assert Selection.from_table(two, [{}, {}], Criterion()).choice["candidate"] == 1  # NaN makes the mean NaN
    skip = Selection.from_table(two, [{}, {}], Criterion(skip_nan=True))
    assert skip.choice == {"candidate": 0, "settings": {}, "epoch": None, "score": 0.2}


def test_choose_minimises_mse_and_can_choose_epoch_zero():
    grid = [{"lr": 1.0}]
    t = pd.DataFrame({"candidate": [0, 0], "val_patient": ["A", "B"], "curve": [[0.5, 0.4, 0.6], [0.5, 0.3, 0.7]]})
    assert choose(t, grid, Cfg(max_epochs=2, val_metric="mse")).max_epochs == 1
    assert choose(t, grid, Cfg(max_epochs=2)).max_epochs == 2
    flat = t.assign(curve=[[0.5, 0.4, 0.3], [0.5, 0.4, 0.3]])
    assert choose(flat, grid, Cfg(max_epochs=2)).max_epochs == 0  # training never beat epoch 0
    with pytest.raises(StdistillError, match="no candidate"):
        choose(t, grid, Cfg(), where=lambda g: False)


# ----------------------------------------------------------------------------- the record
def test_to_dict_from_dict_round_trip_through_json():
    t = _table([(0, "A", [0.1, 0.4]), (0, "B", [0.2, np.nan]), (1, "A", [0.3, 0.3]), (1, "B", [0.2, 0.25])])
    t.insert(1, "lr", [1e-3, 1e-3, 1e-2, 1e-2])
    t["seconds"] = [1.5, 2.0, 1.0, 0.5]
    sel = Selection.from_table(t, [{"lr": 1e-3}, {"lr": 1e-2}], Criterion(metric="val_r", skip_nan=True, smooth=1))
    d = json.loads(json.dumps(sel.to_dict(), allow_nan=False))
    back = Selection.from_dict(d)
    assert back.to_dict() == d and back.choice == sel.choice and back.criterion == sel.criterion
    assert back.config({"lr": 0.0, "max_epochs": 9}) == {"lr": 1e-3, "max_epochs": 1}  # the NaN split left out
    pd.testing.assert_frame_equal(back.summary(), sel.summary())
    with pytest.raises(StdistillError, match="not a Selection record"):
        Selection.from_dict({"table": {}})


def test_old_call_forms_still_work_with_a_deprecation_warning():
    a = colour_sections(2, 3, ["G0"], 0)

    def fit_curve(cfg, tr, va, parts):
        return [0.0, 1.0 if cfg.lr == 0.1 else 0.5, 0.2, 0.1]

    with pytest.deprecated_call():
        best, table = select(a, fit_curve, [{"lr": 1.0}, {"lr": 0.1}], Cfg(), parts=lambda tr, vp, m: {"n": int(m.sum())})
    assert (best.lr, best.max_epochs) == (0.1, 1) and list(table.columns[:3]) == ["candidate", "lr", "val_patient"]
    splits = inner_splits(a, lambda tr, vp, m: {"n": int(m.sum())})
    assert [(vp, p["n"]) for vp, _, _, p in splits] == [("P0", 9), ("P1", 9)]
    sel = select(a, lambda cfg, s: fit_curve(cfg, s.train, s.val, s.parts), [{"lr": 0.1}], base=Cfg(), full_curves=True)
    with pytest.deprecated_call():
        cfg, t = sel  # a recipe selector's old (config, table) return
    assert cfg.max_epochs == 1 and "val_patient" in t
    with pytest.raises(StdistillError, match="max_epochs"):
        select(a, lambda *x: [0.0], [{}], base=Cfg(max_epochs=0), full_curves=True)


# ----------------------------------------------------------------------------- numbers recorded before the engine
def test_recorded_choices_are_made_identically():
    """Curves and scores recorded by benchmarks/checks/select_parity.py on the code before the engine
    (PEKA's and survival's curve tables, the niche student's per-split scores with 'each'); the engine
    must make the same choice with the same score, to the last bit."""
    peka = [(0, "P0", ["0x1.c593454593259p-2", "0x1.b93e069f8bdd0p-2", "0x1.b359e2dd6e619p-2"]),
            (0, "P1", ["0x1.971ce98a83b59p-2", "0x1.994f7d5ca743bp-2", "0x1.9b45309cf977dp-2"]),
            (1, "P0", ["0x1.c593454593259p-2", "0x1.8dfc7f9744663p-2", "0x1.351a5a56ba2e1p-2"]),
            (1, "P1", ["0x1.971ce98a83b59p-2", "0x1.6931ea0061835p-2", "0x1.2ca9562d6eff7p-2"])]
    sel = Selection.from_table(_table([(c, s, _h(v)) for c, s, v in peka]), [{"lr": 1e-3}, {"lr": 1e-2}], Criterion())
    assert (sel.choice["candidate"], sel.choice["epoch"]) == (0, 0)
    raw = [["0x1.4000000000000p-1", "0x1.4000000000000p-1", "0x1.e000000000000p-2", "0x1.e000000000000p-2", "0x1.c000000000000p-2"],
           ["0x1.1111111111111p-1", "0x1.1111111111111p-1", "0x1.1c71c71c71c72p-1", "0x1.1c71c71c71c72p-1", "0x1.05b05b05b05b0p-1"],
           ["0x1.4000000000000p-1", "0x1.5000000000000p-1", "0x1.e000000000000p-2", "0x1.4000000000000p-2", "0x1.2000000000000p-2"],
           ["0x1.1111111111111p-1", "0x1.f49f49f49f49fp-2", "0x1.f49f49f49f49fp-2", "0x1.b05b05b05b05bp-2", "0x1.999999999999ap-2"]]
    smoothed_before = ["0x1.4000000000000p-1", "0x1.2555555555555p-1", "0x1.0aaaaaaaaaaabp-1", "0x1.d555555555555p-2",
                       "0x1.d000000000000p-2"]
    assert smooth_curve(_h(raw[0]), 3) == _h(smoothed_before)
    t = _table([(c, s, _h(v)) for (c, s), v in zip([(0, "fold0"), (0, "fold1"), (1, "fold0"), (1, "fold1")], raw)])
    surv = Selection.from_table(t, [{"lr": 1e-3}, {"lr": 3e-3}], Criterion(smooth=3))
    assert (surv.choice["candidate"], surv.choice["epoch"]) == (0, 0)
    # the niche student, val_patients='each': per split the best validation loss, mean over splits, ties within 1e-9
    each = [["-0x1.e2ab47aa183c7p-2", "-0x1.74bc57ac46ba2p-2"], ["-0x1.80e0158beafe0p-1", "-0x1.54ffad6735cf5p-1"]]
    t = _table([(c, s, _h(v[i])) for c, v in enumerate(each) for i, s in enumerate(["P1", "P2"])], "score")
    niche = Selection.from_table(t, [{"radius_um": 0.0}, {"radius_um": 450.0}],
                                 Criterion(maximize=False, aggregate="best_per_split", first_epoch=1, tol=1e-9))
    assert niche.choice["candidate"] == 1 and niche.choice["score"] == _h("-0x1.6aefe1799066ap-1")
    assert niche.scores()["score"].iloc[0] == _h("-0x1.abb3cfab2f7b4p-2")


def test_the_niche_students_loop_and_refinement_expressed_exactly():
    """NicheStudent's candidate loop (validation patient(s) by row masks, every candidate on one
    split then the next, score = best validation loss over epochs, mean over splits, ties within 1e-9:
    the first listed, epoch = the splits' best epochs averaged and rounded) and its refinement choice
    (ARI on the validation rows, a later entry wins only when better by more than 1e-9), against the
    formulas of their own loops."""
    a = colour_sections(3, 3, ["G0"], 0)
    has = np.ones(a.n_obs, dtype=bool)
    has[0] = False  # a spot without features
    rng = np.random.default_rng(3)
    hist = {(c, q): list(rng.uniform(0.5, 1.0, size=rng.integers(3, 7))) for c in range(3) for q in ("P0", "P1", "P2")}
    hist[(2, "P0")] = list(hist[(0, "P0")])  # candidate 2 ties candidate 0 on one split ...
    calls = []

    def fit_score(params, split, ci):
        assert split.train is a and not (split.train_rows & split.val_rows).any() and not split.val_rows[0]
        calls.append((ci, split.name))
        return hist[(ci, split.name)]

    cands = [{"radius_um": 0.0}, {"radius_um": 450.0}, {"radius_um": 650.0}]
    crit = Criterion(metric="val_loss", maximize=False, aggregate="best_per_split", first_epoch=1, tol=1e-9)
    sel = select(a, fit_score, cands, base={"radius_um": 0.0, "lr": 1e-3}, criterion=crit, order="splits",
                 with_candidate=True, splitter=LeaveOnePatientOut(first="smallest", rows=has, subset=False))
    order = ["P0", "P1", "P2"]  # P0 has the fewest usable spots
    assert calls == [(c, q) for q in order for c in range(3)]
    scores = [[min(hist[(c, q)]) for c in range(3)] for q in order]  # the student's formulas
    epochs = [[int(np.argmin(hist[(c, q)])) + 1 for c in range(3)] for q in order]
    mean = np.mean(scores, axis=0)
    win = int(np.flatnonzero(mean <= mean.min() + 1e-9)[0])
    assert sel.choice["candidate"] == win and sel.choice["score"] == mean[win]
    assert sel.choice["epoch"] == int(round(float(np.mean([e[win] for e in epochs]))))
    assert sel.scores()["score"].tolist() == mean.tolist()
    assert sel.config() == {"radius_um": cands[win]["radius_um"], "lr": 1e-3, "max_epochs": sel.choice["epoch"]}
    # the refinement: one split (the validation rows), one ARI per grid entry
    ari = {0: 0.7517, 1: 0.7517 + 8e-10, 2: 0.7517 + 1.6e-9, 3: 0.70}
    grid = [{"method": "none"}, {"method": "propagate"}, {"method": "gmm"}, {"method": "both"}]
    ref = Selection.from_table(_table([(i, "val", ari[i]) for i in range(4)], "score"), grid,
                               Criterion(metric="val_ari", tol=1e-9, ties="running"))
    best = None
    for i in range(4):  # choose_refinement's loop
        if best is None or ari[i] > best[0] + 1e-9:
            best = (ari[i], i)
    assert ref.choice["candidate"] == best[1] == 2
    rows = np.zeros(a.n_obs, dtype=bool)
    rows[-5:] = True
    (v,) = ValidationRows(rows, "val", subset=False)(a)
    assert v.val is a and v.val_rows.sum() == 5
