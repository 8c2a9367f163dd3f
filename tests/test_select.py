"""Shared model selection: inner leave-one-patient-out splits, curves, best (candidate, epoch)."""

from dataclasses import dataclass

import pandas as pd
import pytest
from _io_helpers import colour_sections

from stdistill import StdistillError
from stdistill.select import choose, inner_splits, select


@dataclass
class Cfg:
    lr: float = 1.0
    max_epochs: int = 3
    patience: int = 1
    val_metric: str = "score"

    @property
    def maximize(self) -> bool:
        return self.val_metric != "mse"


def test_select_runs_every_candidate_on_every_inner_patient_and_picks_best_mean():
    a = colour_sections(3, 3, ["G0"], 0)  # patients P0, P1, P2
    seen = []

    def fit_curve(cfg, tr, va, parts):
        vp = set(va.obs["patient"])
        assert not vp & set(tr.obs["patient"])  # never trains on its validation patient
        seen.append((cfg.lr, cfg.patience, parts["vp"], tr.n_obs))
        peak = 2 if cfg.lr == 0.1 else 1
        return [0.0] + [1.0 - abs(e - peak) * 0.5 + (0.01 if cfg.lr == 0.1 else 0) for e in range(1, cfg.max_epochs + 1)]

    best, table = select(a, fit_curve, [{"lr": 1.0}, {"lr": 0.1}], Cfg(), parts=lambda tr, vp, m: {"vp": vp})
    assert len(table) == 6 and sorted(set(table["val_patient"])) == ["P0", "P1", "P2"]
    assert all(p == 4 for _, p, _, _ in seen)  # no early stopping while recording curves
    assert (best.lr, best.max_epochs) == (0.1, 2)
    assert list(table.columns[:3]) == ["candidate", "lr", "val_patient"]


def test_choose_minimises_mse_and_can_choose_epoch_zero():
    grid = [{"lr": 1.0}]
    t = pd.DataFrame({"candidate": [0, 0], "val_patient": ["A", "B"], "curve": [[0.5, 0.4, 0.6], [0.5, 0.3, 0.7]]})
    assert choose(t, grid, Cfg(max_epochs=2, val_metric="mse")).max_epochs == 1
    assert choose(t, grid, Cfg(max_epochs=2)).max_epochs == 2
    flat = t.assign(curve=[[0.5, 0.4, 0.3], [0.5, 0.4, 0.3]])
    assert choose(flat, grid, Cfg(max_epochs=2)).max_epochs == 0  # training never beat epoch 0
    with pytest.raises(StdistillError, match="no candidate"):
        choose(t, grid, Cfg(), where=lambda g: False)


def test_inner_splits_need_two_patients():
    a = colour_sections(2, 3, ["G0"], 0)
    splits = inner_splits(a, lambda tr, vp, m: {"n": int(m.sum())})
    assert [(vp, p["n"]) for vp, _, _, p in splits] == [("P0", 9), ("P1", 9)]
    one = a[a.obs["patient"] == "P0"].copy()
    with pytest.raises(StdistillError, match="at least 2"):
        inner_splits(one)
    with pytest.raises(StdistillError, match="max_epochs"):
        select(a, lambda *x: [0.0], [{}], Cfg(max_epochs=0))
