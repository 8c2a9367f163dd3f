"""Every choice made on inner patients, on tiny simulated data: PEKA, STAMP, GenST, survival (one
method and a student's CV), bench.expression's feature candidates and the niche student's
candidates (one validation patient and 'each'). Prints one JSON document (floats as hex, so two
runs compare to the last bit): run it before and after a change to the selection code and diff.

    python benchmarks/checks/select_parity.py > before.json   # (and after.json), then: diff before.json after.json

The results file holds one row per recipe with the SHA-1 of its part of the document.

Uses the tests' tiny encoders and simulated sections (tests/ must be importable); CPU, seeds fixed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common  # noqa: E402


def _hex(x):
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_hex(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x).hex()
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def _unpack(res):
    """(config, table) from a selector: the old tuple or a Selection."""
    if isinstance(res, tuple):
        return res
    return res.config(), res.table


def _table(table, smooth: int = 1) -> list[dict]:
    """Rows of a selection table. Survival tables once held the smoothed curve in ``curve`` and the
    measured one in ``raw_curve``; now ``curve`` is measured and the criterion smooths: both kept."""
    split = next(c for c in ("split", "val_patient", "val_patients") if c in table.columns)
    keep = [c for c in table.columns if c not in ("seconds", split, "raw_curve", "curve")]
    out = []
    for _, r in table.iterrows():
        row = {"split": str(r[split]), **{c: _hex(r[c]) for c in keep}}
        if "curve" in table.columns:
            raw = r["raw_curve"] if "raw_curve" in table.columns else r["curve"]
            row["curve"] = _hex(list(raw))
            if smooth > 1:
                row["smoothed"] = _hex(list(r["curve"]) if "raw_curve" in table.columns else _smoothed(raw, smooth))
        out.append(row)
    return out


def _smoothed(curve, k):
    from stdistill.select import smooth_curve

    return smooth_curve(curve, k)


def peka(tmp):
    from _io_helpers import colour_sections
    from conftest import TINY_VIT

    from stdistill.recipes import PekaConfig, select_peka

    a = colour_sections(2, 5, [f"G{i}" for i in range(12)], 2)
    genes = list(a.var_names[:6])
    T = np.random.default_rng(2).normal(size=(a.n_obs, 4)).astype(np.float32)
    base = PekaConfig(adapter="lora", rank=4, max_epochs=2, batch_size=10, n_clusters=2, size_um=32, px=32, val_metric="head")
    cfg, table = _unpack(select_peka(a, T, genes, [{"lr": 1e-3}, {"lr": 1e-2}], base=base, encoder=TINY_VIT, cache_dir=tmp))
    return {"chosen": {"lr": _hex(cfg.lr), "max_epochs": cfg.max_epochs}, "table": _table(table)}


def stamp(tmp):
    import pandas as pd
    from _io_helpers import colour_sections
    from conftest import TINY_VIT

    from stdistill.recipes import StampConfig, select_stamp

    a = colour_sections(2, 5, None, 4, feature_key="colour")
    col = np.asarray(a.obsm.pop("colour"))[:, :3]
    act = col @ np.random.default_rng(4).normal(size=(3, 4)) + 0.05 * np.random.default_rng(5).normal(size=(a.n_obs, 4))
    a.obsm["pathway_scores"] = pd.DataFrame(act, index=a.obs_names, columns=[f"PW{i}" for i in range(4)])
    base = StampConfig(adapter="lora", rank=4, lr=1e-2, max_epochs=2, batch_size=10, size_um=32, px=32, proj_dim=8,
                       val_metric="head")
    cfg, table = _unpack(select_stamp(a, [{"w_con": 0.0}, {"w_con": 1.0}], base=base, encoder=TINY_VIT, cache_dir=tmp))
    return {"chosen": {"w_con": _hex(cfg.w_con), "max_epochs": cfg.max_epochs}, "table": _table(table)}


def genst():
    import stdistill as sd
    from stdistill.recipes import GenstConfig, select_genst

    a = sd.datasets.simulated(n_sections=2, n_patients=2, spots_per_section=120, n_genes=500, seed=0)
    P = a.obsm["celltype_props"].to_numpy()
    rng = np.random.default_rng(0)
    a.obsm["X_fake"] = (P @ rng.normal(size=(P.shape[1], 24)) + 0.3 * rng.normal(size=(a.n_obs, 24))).astype(np.float32)
    base = GenstConfig(codebook_size=16, hist_codebook_size=16, expr_epochs=10, max_epochs=3, batch_size=64)
    grid = [{"w_con": 0.0}, {"w_con": 0.5, "head_input": "continuous"}]
    cfg, table = _unpack(select_genst(a, grid, base=base, feature_key="X_fake", n_genes=15))
    return {"chosen": {"w_con": _hex(cfg.w_con), "head_input": cfg.head_input, "max_epochs": cfg.max_epochs},
            "table": _table(table)}


def survival():
    from _survival_helpers import tiny_cohort

    from stdistill.recipes import SurvivalConfig, patient_folds, survival_cv
    from stdistill.recipes._survival import Method, select_survival

    c = tiny_cohort(n=24, signal=1.5)
    fast = dict(dim=8, max_epochs=4, batch_size=8, min_genes=3)
    cfg, table = _unpack(select_survival(c, SurvivalConfig(kind="abmil", **fast), [{"lr": 1e-3}, {"lr": 3e-3}], inner_k=2))
    one = {"chosen": {"lr": _hex(cfg.lr), "max_epochs": cfg.max_epochs}, "table": _table(table, smooth=3)}
    methods = [Method("gge_teacher", SurvivalConfig(kind="gge", **fast)),
               Method("amkd", SurvivalConfig(kind="student", **fast), "gge_teacher")]
    res, sel = survival_cv(c, methods, patient_folds(c, 2), seeds=(0,), inner_k=2)
    cv = {"epochs": [[r.fold, r.method, int(r.epochs)] for r in res.itertuples()],
          "cindex": [_hex(x) for x in res["cindex"]], "selection": _table(sel, smooth=3)}
    return {"select_survival": one, "survival_cv": cv}


def bench():
    from test_expression_probe_inputs import _cohort

    import stdistill as sd

    a, genes = _cohort()
    a.obsm["X_noise"] = np.random.default_rng(7).normal(size=(a.n_obs, 4))
    cands = {"noise": "X_noise", "signal": "X_f", "signal+views": {"key": "X_f", "views": True}}
    res = sd.bench.expression(a, cands, genes=genes)
    out = {"chosen": list(res.per_fold["chosen"]), "inner_pearson": _hex(list(res.per_fold["inner_pearson"])),
           "pearson_mean": _hex(list(res.per_fold["pearson_mean"])),
           "selection": {c: _hex(list(res.selection[c])) for c in res.selection.columns},
           "selection_folds": list(map(str, res.selection.index))}
    un = sd.bench.expression(a, cands, genes=None, n_genes=4, min_frac=0.0)  # genes chosen inside every inner fold
    out["hest_genes"] = {"chosen": list(un.per_fold["chosen"]),
                         "selection": {c: _hex(list(un.selection[c])) for c in un.selection.columns}}
    return out


def niche():
    from test_niches import _split, toy

    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = toy()
    NicheTeacher(3).fit_predict(a)
    a, _ = _split(a)
    cands = [{"radius_um": 0.0}, {"radius_um": 450.0}]
    out = {}
    for vp in ("smallest", "each"):
        s = NicheStudent(feature_key="X_toy", max_epochs=5, patience=3, val_patients=vp, seed=0,
                         refine_grid=[{"method": "none"}, {"method": "propagate", "alpha": 0.3, "n_iter": 5}]).fit(a, candidates=cands)
        out[vp] = {"chosen": s.info_["chosen"], "best_epoch": s.info_["best_epoch"], "best_val": _hex(s.info_["best_val"]),
                   "selection": _hex(s.selection_.table.to_numpy().tolist()),
                   "refine": s.info_["refine"], "refine_selection": s.info_["refine_selection"]}
    return out


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_args(ap)
    args = ap.parse_args()
    _common.smoke(args)  # the inputs are tiny already: the smoke run is the full run
    results = _common.Results(args, seeds=[0], precision="fp32")

    from conftest import register_tiny_encoders

    torch.set_num_threads(1)
    register_tiny_encoders()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        out = {"peka": peka(Path(tmp) / "p"), "stamp": stamp(Path(tmp) / "s"), "genst": genst(), "survival": survival(),
               "bench_expression": bench(), "niche": niche()}
    print(json.dumps(out, indent=1, sort_keys=True, default=_hex))
    rows = [[k, hashlib.sha1(json.dumps(v, sort_keys=True, default=_hex).encode()).hexdigest()[:16]] for k, v in sorted(out.items())]
    results.table("digests", rows, ["choice", "sha1"])
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
