"""AMKD survival benchmark, in layers labelled by how real they are.

1. **Semi-synthetic, from real data** (``datasets.her2st_survival``): 360 "patients", each a random
   window of a real HER2ST section with an H&E image; real patch features (effnet-lite0-imagenet,
   an ImageNet encoder, fp32) as the bag, the real pseudo-bulk as the genomic profile, event times
   from a planted hazard of two Hallmark activities of that pseudo-bulk, 35% censoring. Leave one
   source patient out (A, B, C): windows of one patient never straddle a split. Methods: ABMIL,
   SNN, late fusion, AMKD's teacher (gene-guided enhancement), the AMKD student and its ablations;
   epochs chosen per fold on inner source patients (seed 0); 5 seeds; the oracle C-index of the
   true hazard is the ceiling. Diagnostics explain the student-vs-ABMIL result.
   **Fully simulated positive control** (``datasets.simulated_survival``): 5-fold patient CV.
   **AMKD variants** (``--variants``, not in the default run): on the same windows and folds, the
   redundancy loss in its reachable (whitened) form with disagreeing samples weighted up or down,
   and teacher + student with 25% / 50% of each fold's training patients missing RNA (drawn with
   seed 0 inside the training fold; test patients unchanged; epochs chosen anew on inner patients).
2. **Real genomics + survival**: the genomic branch alone (SNN on Hallmark families) on real
   breast-cancer microarray cohorts from PyPI ``SurvSet`` (optional; skipped with a message when
   not installed), 5-fold CV; the clinical head on ``../shared/data/brace-marker-survival``
   (15 events: exercises the code on real numbers, ranks nothing).
3. TCGA-ready: ``stdistill survival evaluate --clinical ... --features ... --rna ...`` (docs/survival.md).

Usage::

    python benchmarks/survival_semisynthetic.py --out results/survival --figures docs/figures
    python benchmarks/survival_semisynthetic.py --smoke --out /tmp/survival_smoke   # small settings
    python benchmarks/survival_semisynthetic.py --variants --skip her2st,simulated,survset,brace --out results/survival_variants

Writes ``<out>/<layer>/results.csv`` (+ selection, test risks), ``<out>/table.md`` and the results
file ``docs/results/survival_semisynthetic[-variants].json`` (``benchmarks/_common.py``); prints the
tables and the run time. Data: ``$STDISTILL_DATA``, else ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common
import stdistill as sd
from stdistill.recipes import (
    Cohort,
    SurvivalConfig,
    amkd_methods,
    cv_table,
    patient_folds,
    survival_cv,
)
from stdistill.recipes._survival import Method

FOLD_NOTE = {"A": "A1/A2 images are 2000 px copies at ~3.2 um/px (blurrier): a resolution shift as well as a patient shift"}


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


# ================================================================================ tables
def md_table(table: pd.DataFrame, notes: dict | None = None) -> str:
    """Markdown: Harrell / Uno C-index and AUC as mean +- sd over seeds, Harrell C per fold."""
    folds = [c[2:] for c in table.columns if c.startswith("C_")]
    head = ["method", "Harrell C", "Uno C", "AUC(t)", *[f"C {f}{' *' if notes and f in notes else ''}" for f in folds], "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    def pm(r: pd.Series, k: str) -> str:
        sd_ = r.get(f"{k}_sd")
        return f"{r[f'{k}_mean']:.3f}" + (f" +- {sd_:.3f}" if pd.notna(sd_) else "")

    for m, r in table.iterrows():
        cells = [str(m), pm(r, "cindex"), pm(r, "cindex_uno"), pm(r, "auc"), *[f"{r[f'C_{f}']:.3f}" for f in folds], str(int(r["n_seeds"]))]
        lines.append("| " + " | ".join(cells) + " |")
    for f, n in (notes or {}).items():
        if f in folds:
            lines.append(f"\n\\* {f}: {n}.")
    return "\n".join(lines)


def frame_md(df: pd.DataFrame) -> str:
    """A numeric DataFrame as a markdown table (3 decimals)."""
    lines = ["| " + " | ".join([df.index.name or "", *map(str, df.columns)]) + " |", "|---" * (df.shape[1] + 1) + "|"]
    lines += ["| " + " | ".join([str(i), *(f"{v:.3f}" for v in r)]) + " |" for i, r in df.iterrows()]
    return "\n".join(lines)


def epochs_frame(res: pd.DataFrame) -> pd.DataFrame:
    """Epochs chosen on the inner patients: one row per method, one column per test fold."""
    ep = res[res["method"] != "oracle"].groupby(["method", "fold"], sort=False)["epochs"].first().unstack("fold")
    return ep.astype(int)


def epochs_table(args, name: str, res: pd.DataFrame) -> str:
    """Record the epochs chosen on the inner patients as table ``name``; the line printed in the report."""
    ep = epochs_frame(res)
    record(args, name, ep.reset_index())
    return "Epochs chosen on inner patients (per fold): " + "; ".join(
        f"{m} {'/'.join(str(int(v)) for v in r)}" for m, r in ep.iterrows())


# ================================================================================ layer 1
def _mean_pooled(c: Cohort) -> np.ndarray:
    return np.vstack([c.bag(p).mean(0) for p in c.patients])


def _ridge_predict(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
    """Ridge (alpha by internal CV) from z-scored features on rows ``tr``, predicted on rows ``te``."""
    from sklearn.linear_model import RidgeCV

    mu, sdv = X[tr].mean(0), X[tr].std(0) + 1e-6
    return RidgeCV(alphas=np.logspace(-1, 5, 13)).fit((X[tr] - mu) / sdv, y[tr]).predict((X[te] - mu) / sdv)


def image_ceiling(c: Cohort, folds) -> dict[str, float]:
    """Privileged diagnostic: ridge from mean-pooled patch features to the *true hidden activity*
    (never available to a real model), C-index of its prediction on each test fold."""
    X, y = _mean_pooled(c), c.table["activity"].to_numpy()
    pos = {p: i for i, p in enumerate(c.patients)}
    out = {}
    for name, tr, te in folds:
        pred = _ridge_predict(X, y, np.array([pos[p] for p in tr]), np.array([pos[p] for p in te]))
        t = c.subset(te)
        out[name] = sd.metrics.cindex(t.time, t.event, pred)
    return out


def image_transfer(c: Cohort) -> pd.DataFrame:
    """Privileged diagnostic of the patient shift: Spearman of a ridge prediction of the hidden
    activity (from mean-pooled patch features) with the truth, trained on the windows of one source
    patient (row) and tested on another's (column). The diagonal holds leave-one-section-out within
    a patient (windows never straddle sections; NaN for a patient with one imaged section)."""
    from scipy.stats import spearmanr

    X, y = _mean_pooled(c), c.table["activity"].to_numpy()
    src, sec = c.table["source_patient"].to_numpy(), c.table["section"].to_numpy()
    pats = sorted(set(src))
    out = pd.DataFrame(np.nan, index=pd.Index(pats, name="train \\ test"), columns=pats)
    for a in pats:
        for b in pats:
            ia, ib = np.flatnonzero(src == a), np.flatnonzero(src == b)
            if a != b:
                out.loc[a, b] = spearmanr(_ridge_predict(X, y, ia, ib), y[ib])[0]
            elif len(set(sec[ia])) > 1:
                pred = np.empty(len(y))
                for s_ in set(sec[ia]):
                    pred[ia[sec[ia] == s_]] = _ridge_predict(X, y, ia[sec[ia] != s_], ia[sec[ia] == s_])
                out.loc[a, b] = spearmanr(pred[ia], y[ia])[0]
    return out


def diagnostics(risks: pd.DataFrame, truth: pd.Series) -> pd.DataFrame:
    """Spearman correlations on test patients (mean over folds and seeds): each H&E model's risk
    with the teacher's risk, with ABMIL's risk and with the true hazard."""
    rows = []
    for (fold, seed), g in risks.groupby(["fold", "seed"]):
        w = g.pivot(index="patient", columns="method", values="risk")
        for m in w.columns:
            rows.append({"method": m, "fold": fold, "seed": seed,
                         "rho_teacher": w[m].corr(w.get("gge_teacher", w[m] * np.nan), method="spearman"),
                         "rho_abmil": w[m].corr(w.get("abmil", w[m] * np.nan), method="spearman"),
                         "rho_truth": w[m].corr(truth.reindex(w.index), method="spearman")})
    d = pd.DataFrame(rows)
    return d.groupby("method", sort=False)[["rho_truth", "rho_teacher", "rho_abmil"]].mean()


def run_cv(c: Cohort, methods, folds, args, t0: float, groups=None, genesets=None, seeds=None):
    """survival_cv with logging; also returns every test risk (for diagnostics and figures)."""
    risks, keep = [], {}

    def on_fit(fold, seed, method, model, test, risk):
        cut = model.risk_cut_  # risk-group cut-off for Kaplan-Meier: the median risk of the *training* patients
        risks.append(pd.DataFrame({"fold": fold, "seed": seed, "method": method, "patient": test.patients, "risk": risk,
                                   "cut": cut}))
        if seed == (seeds or args.seeds)[0] and method in ("amkd", "abmil"):
            keep[(fold, method)] = (model, test)

    res, sel = survival_cv(c, methods, folds, seeds=seeds or args.seeds, groups=groups, genesets=genesets, on_fit=on_fit,
                           log=lambda m: log(m, t0) if args.verbose else None)
    return res, sel, pd.concat(risks, ignore_index=True), keep


def save(out: Path, res: pd.DataFrame, sel: pd.DataFrame, risks: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    res.to_csv(out / "results.csv", index=False)
    if len(sel):
        # the measured C-index curves; the choice smoothed them (the Selection's criterion)
        sel.assign(curve=sel["curve"].map(lambda v: " ".join(f"{x:.3f}" for x in v))).to_csv(out / "selection.csv", index=False)
    risks.to_csv(out / "test_risks.csv", index=False)


def cached_cv(args, layer: str, run) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``run()`` (-> results, selection, test risks, kept models), saved under ``<out>/<layer>/``; with
    ``--report-only`` the saved CSVs instead (no models kept)."""
    out = args.out / layer
    if args.report_only:
        return pd.read_csv(out / "results.csv"), pd.read_csv(out / "test_risks.csv"), {}
    res, sel, risks, keep = run()
    save(out, res, sel, risks)
    return res, risks, keep


def figures(c: Cohort, risks: pd.DataFrame, keep: dict, table: pd.DataFrame, prefix: str, folder: Path | None,
            image_folder: Path | None = None) -> None:
    """C-index bars; Kaplan-Meier of the AMKD student's risk groups (cut at the median risk of each
    fold's training patients, test patients pooled, first seed); the student's attention over the
    largest test window of fold C, drawn on the H&E into ``image_folder`` (default ``folder``; real
    images stay out of the repository's figures)."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    sd.pl.cindex_bars(table, path=folder / f"{prefix}_cindex_bars.png", title=f"{prefix}: C-index (mean +- sd over seeds)")
    r = risks[(risks["method"] == "amkd") & (risks["seed"] == risks["seed"].min())]
    if "cut" in r.columns and r["cut"].notna().all():
        grp = np.where(r["risk"] > r["cut"], "high risk", "low risk")
        t = c.table.loc[r["patient"]]
        sd.pl.km_risk_groups(t["time"], t["event"], r["risk"], groups=grp, path=folder / f"{prefix}_km_amkd.png",
                             title=f"{prefix}: AMKD student, test folds (cut: training median)", time_label="months")
    fold = "C" if ("C", "amkd") in keep else next((f for f, m in keep if m == "amkd"), None)  # none in report-only
    if fold is not None and "spots" in c.meta:
        model, test = keep[(fold, "amkd")]
        p = max(test.patients, key=lambda q: len(test.bag(q)))
        att = model.attention(test.subset([p]))
        s = test.slides_of(p)[0]
        spots = c.meta["spots"]
        sec = str(c.table.loc[p, "section"]) if "section" in c.table else sd.io.sections(spots)[0]
        sd.pl.survival_attention(sd.io.subset_sections(spots, [sec]), pd.Series(att[s], index=test.instance_ids[s]),
                                 path=(image_folder or folder) / f"{prefix}_attention_{p}.png",
                                 title=f"AMKD student attention, window {p} (test fold {fold})")


def her2st_report(c: Cohort, folds, res: pd.DataFrame, risks: pd.DataFrame, out: Path, args) -> list[str]:
    table = cv_table(res)
    record(args, "her2st", display_table(table))
    ceil = image_ceiling(c, folds)
    diag = diagnostics(risks, c.table["hazard_true"])
    diag.to_csv(out / "diagnostics.csv")
    shift = image_transfer(c)
    epochs = epochs_table(args, "her2st_epochs", res)
    record(args, "ceiling", pd.DataFrame([{"ceiling": "privileged ridge C", **ceil, "mean": float(np.mean(list(ceil.values())))}]))
    record(args, "transfer", shift.reset_index())
    record(args, "risk_spearman", diag.reset_index())
    return ["## 1. Semi-synthetic HER2ST windows (real features and pseudo-bulk, planted hazard)", "",
            f"{c}; {1 - c.event.mean():.0%} censored; leave one source patient out; encoder "
            f"{c.meta['encoder']} ({c.meta['precision']}).", "", md_table(table, FOLD_NOTE), "", epochs, "",
            "Privileged image ceiling (ridge from mean-pooled patch features to the *true* hidden activity, "
            "trained on the training folds; not a real model): " + ", ".join(f"{k} {v:.3f}" for k, v in ceil.items())
            + f" (mean {np.mean(list(ceil.values())):.3f}).", "",
            "Does the image -> hidden activity relation transfer between source patients? Spearman of a ridge "
            "prediction with the true activity, trained on one patient's windows (row), tested on another's "
            "(column); diagonal: leave one section out within the patient (privileged, as above):", "",
            frame_md(shift), "",
            "Spearman correlation of test risks (mean over folds and seeds):", "", frame_md(diag)]


_COHORT: dict = {}


def her2st_cohort(args, t0: float) -> Cohort:
    """The semi-synthetic HER2ST cohort (built once per run)."""
    if "her2st" not in _COHORT:
        spots = _common.her2st(args.root, True, images_only=True) if args.smoke else None
        _COHORT["her2st"] = c = sd.datasets.her2st_survival(root=args.root, n_per_patient=args.n_per_patient, spots=spots)
        log(f"her2st_survival: {c}; censored {1 - c.event.mean():.0%}", t0)
    return _COHORT["her2st"]


def missing_table(res: pd.DataFrame, shares: list[float], n_train: dict[str, int]) -> pd.DataFrame:
    """Teacher and student Harrell C per share of training patients without RNA: mean and sd over
    seeds of the fold mean, and over all fold x seed runs."""
    rows = []
    for f in [0.0, *shares]:
        tag = "" if f == 0 else f"_miss{round(100 * f)}"
        row = {"training patients without RNA": f"{f:.0%}",
               "per fold (" + " / ".join(n_train) + ")": " / ".join(str(int(round(f * n))) for n in n_train.values())}
        for m in ("gge_teacher", "amkd"):
            r = res[res["method"] == m + tag]
            per_seed = r.groupby("seed")["cindex"].mean()
            row |= {f"{m} C": per_seed.mean(), f"{m} sd (seeds)": per_seed.std(), f"{m} sd (folds x seeds)": r["cindex"].std()}
        rows.append(row)
    return pd.DataFrame(rows)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A :func:`cv_table` as the columns printed (numbers kept as numbers, for the results file)."""
    folds = [c for c in table.columns if c.startswith("C_")]
    out = pd.DataFrame({"method": table.index, "Harrell C": table["cindex_mean"], "sd": table["cindex_sd"],
                        "Uno C": table["cindex_uno_mean"], "AUC(t)": table["auc_mean"],
                        **{f"C {c[2:]}": table[c] for c in folds}, "seeds": table["n_seeds"].astype(int)})
    return out.reset_index(drop=True)


def record(args, name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Put ``df`` into the run's results file as table ``name`` (floats printed with 3 decimals)."""
    args.record.table(name, df, digits={c: 3 for c in df.columns if df[c].dtype.kind == "f"})
    return df


def plain_md(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a markdown table, floats with ``digits`` decimals (NaN empty)."""
    fmt = (lambda v: "" if isinstance(v, float) and np.isnan(v) else f"{v:.{digits}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|---" * df.shape[1] + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)])


def variants(args, t0: float) -> list[str]:
    """AMKD variants on the semi-synthetic HER2ST windows: the reachable redundancy loss (weighting
    up vs down) and incomplete modalities (training patients without RNA)."""
    c = her2st_cohort(args, t0)
    folds = patient_folds(c, groups="source_patient")
    ms = amkd_methods(SurvivalConfig(max_epochs=args.max_epochs), rr_variants=True, missing_rna=args.missing)
    ms = [m for m in ms if m.name not in ("snn", "late_fusion", "amkd_no_enhancement", "amkd_fixed_weight", "logit_kd")]
    res, _, _ = cached_cv(args, "her2st_variants", lambda: run_cv(c, ms, folds, args, t0, groups="source_patient",
                                                                  seeds=args.variant_seeds))
    log("variants done", t0)
    epochs = epochs_table(args, "variants_epochs", res)
    return ["", "## 1c. AMKD variants on the semi-synthetic HER2ST windows", "",
            f"Same cohort and folds as layer 1; seeds {','.join(map(str, sorted(set(res['seed']))))}. amkd: the "
            "redundancy loss over the batch (64 dimensions, rank <= 15), disagreeing samples weighted up; "
            "amkd_rr_whitened: its reachable form (teacher's leading whitened principal directions, batch + queue "
            "of 64 earlier rows), weighted up; amkd_rr_whitened_down: weighted down; amkd_no_rr: without the term; "
            "all three for amkd's epochs. "
            "*_miss25 / *_miss50: that share of each fold's training patients without RNA (drawn with seed 0 "
            "inside the training fold; test patients unchanged), epochs chosen anew on the inner patients.", "",
            plain_md(record(args, "variants", display_table(cv_table(res)))), "", epochs, "",
            "Incomplete modalities (Harrell C on the test folds; the teacher is tested with RNA, the student "
            "on slides alone):", "",
            plain_md(record(args, "missing_rna", missing_table(res, args.missing, {f: len(tr) for f, tr, _ in folds})))]


def layer1(args, t0: float) -> list[str]:
    """Semi-synthetic HER2ST windows (and the simulated positive control)."""
    parts = []
    base = SurvivalConfig(max_epochs=args.max_epochs)
    if "her2st" not in args.skip:
        c = her2st_cohort(args, t0)
        folds = patient_folds(c, groups="source_patient")
        res, risks, keep = cached_cv(args, "her2st", lambda: run_cv(c, amkd_methods(base), folds, args, t0, groups="source_patient"))
        parts += her2st_report(c, folds, res, risks, args.out / "her2st", args)
        figures(c, risks, keep, cv_table(res), "survival_her2st", args.figures, image_folder=args.out / "her2st")
        log("her2st layer done", t0)
    if "simulated" not in args.skip:
        c = sd.datasets.simulated_survival(n_patients=args.sim_patients)
        log(f"simulated_survival: {c}", t0)
        ms = [m for m in amkd_methods(base) if m.name in ("abmil", "snn", "gge_teacher", "amkd", "amkd_no_rr")]
        res, risks, keep = cached_cv(args, "simulated", lambda: run_cv(c, ms, patient_folds(c, 5), args, t0,
                                                                        genesets=c.meta["genesets"], seeds=args.sim_seeds))
        table = cv_table(res)
        record(args, "simulated", display_table(table))
        epochs = epochs_table(args, "simulated_epochs", res)
        parts += ["", "## 1b. Fully simulated positive control (planted programmes)", "",
                  f"{c}; 5-fold patient CV; gene families = the planted marker programmes.", "", md_table(table), "",
                  epochs]
        figures(c, risks, keep, table, "survival_simulated", args.figures)
        log("simulated layer done", t0)
    return parts


# ================================================================================ layer 2
def survset_cohort(name: str) -> Cohort:
    from SurvSet.data import SurvLoader

    df = SurvLoader().load_dataset(name)["df"]
    genes = [c for c in df.columns if c.startswith("num_HS_")]
    rna = df[genes].astype(float)
    rna.columns = [c[len("num_HS_"):] for c in genes]
    rna = rna.fillna(rna.median())
    ids = [f"{name}_{i}" for i in df["pid"].astype(str)]
    rna.index = ids
    table = pd.DataFrame({"time": df["time"].to_numpy(float), "event": df["event"].to_numpy(int)}, index=ids)
    return Cohort(table, {}, {}, rna=rna, meta={"dataset": f"SurvSet {name}"})


def brace_cohort(path: Path) -> tuple[Cohort, list[str]]:
    df = pd.read_csv(path, index_col=0)
    cols = ["Age at Diagnosis", "Invasive Tumour Size (cm)", "Grade", "NPI", "Lymph Node status", "per_g1", "per_g2",
            "per_g3", "tumor_pixels_per", "inter_WSI_S_density_LL_cooccur", "pcontrast", "stromal_contrast",
            "imitos_70p_score_thresh1_8_thresh2_20_mj"]
    t = df[cols].apply(pd.to_numeric, errors="coerce")
    t["time"] = pd.to_numeric(df["Breast cancer specific survival/ month"], errors="coerce")
    t["event"] = pd.to_numeric(df["Survival Status"], errors="coerce")
    t = t.dropna(subset=["time", "event"])
    t.index = [f"brace{i}" for i in t.index]
    return Cohort(t, {}, {}), cols


def layer2(args, t0: float) -> list[str]:
    parts = ["", "## 2. Real genomics + survival; the clinical head on BRACE", ""]
    if "survset" not in args.skip:
        try:
            import SurvSet  # noqa: F401
        except ImportError:
            parts.append("SurvSet is not installed (pip install 'stdistill[survival-bench]'; GPL-3 data): the real-genomics layer was skipped.")
            log("SurvSet not installed: skipping the real-genomics layer", t0)
        else:
            table_rows = []
            for name in args.survset:
                c = survset_cohort(name)
                ms = [Method("snn", SurvivalConfig(kind="snn", max_epochs=args.max_epochs))]
                res, _, _ = cached_cv(args, f"survset_{name}", lambda: run_cv(c, ms, patient_folds(c, 5), args, t0, seeds=args.sim_seeds))
                tab = cv_table(res)
                record(args, f"survset_{name}", display_table(tab))
                table_rows += [{"cohort": name, "patients": len(c.patients), "events": int(c.event.sum()), "model": m,
                                "Harrell C": r["cindex_mean"], "sd": r["cindex_sd"], "Uno C": r["cindex_uno_mean"]}
                               for m, r in tab.iterrows()]
                log(f"SurvSet {name} done", t0)
            rows = [f"| {r['cohort']} ({r['patients']} patients, {r['events']} events) | {r['model']} | "
                    f"{r['Harrell C']:.3f} +- {r['sd']:.3f} | {r['Uno C']:.3f} |" for r in table_rows]
            record(args, "survset", pd.DataFrame(table_rows))
            parts += ["Genomic branch alone (SNN over Hallmark families), 5-fold patient CV, mean +- sd over seeds:", "",
                      "| cohort | model | Harrell C | Uno C |", "|---|---|---|---|", *rows]
    if "brace" not in args.skip:
        p = args.brace
        if not p.is_file():
            parts.append(f"\n{p} is absent: the BRACE clinical head was skipped.")
        else:
            c, cols = brace_cohort(p)
            cfg = SurvivalConfig(kind="clinical", clinical=tuple(cols), loss="cox", batch_size=64, max_epochs=args.max_epochs, lr=1e-2)
            res, _, _ = cached_cv(args, "brace", lambda: run_cv(c, [Method("clinical", cfg)], patient_folds(c, 5), args, t0,
                                                                seeds=args.sim_seeds))
            r = cv_table(res).loc["clinical"]
            record(args, "brace", display_table(cv_table(res)))
            parts += ["", f"Clinical head (linear Cox on {len(cols)} clinical + slide-level columns) on BRACE cohort B "
                      f"({len(c.patients)} patients, {int(c.event.sum())} events; exercise only): Harrell C "
                      f"{r['cindex_mean']:.3f} +- {r['cindex_sd']:.3f}, Uno C {r['cindex_uno_mean']:.3f} (5-fold CV)."]
            log("BRACE done", t0)
    return parts


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="the her2st folder (default: $STDISTILL_DATA/her2st, else ../shared/data/her2st)")
    ap.add_argument("--brace", type=Path, default=_common.data_root() / "brace-marker-survival" / "features" / "Cohort-B.csv")
    ap.add_argument("--out", type=Path, default=Path("results/survival"))
    ap.add_argument("--figures", type=Path, default=None, help="also write figures here (e.g. docs/figures)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--sim-seeds", default="0,1,2", help="seeds of the simulated control and of layer 2")
    ap.add_argument("--max-epochs", type=int, default=30)
    ap.add_argument("--n-per-patient", type=int, default=120)
    ap.add_argument("--sim-patients", type=int, default=100)
    ap.add_argument("--survset", default="gse4335,gse1992,gse3143")
    ap.add_argument("--skip", default="", help="comma list of layers to skip: her2st,simulated,survset,brace")
    ap.add_argument("--variants", action="store_true",
                    help="also run the AMKD variants (reachable redundancy loss, training patients without RNA)")
    ap.add_argument("--variant-seeds", default="0,1,2", help="seeds of the AMKD variants")
    ap.add_argument("--missing", default="0.25,0.5", help="shares of training patients without RNA (variants)")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rebuild the tables and figures from <out>/*/ CSVs (no training)")
    _common.add_args(ap)
    args = ap.parse_args()
    if _common.smoke(args, seeds="0", sim_seeds="0", variant_seeds="0", max_epochs=2, n_per_patient=6, sim_patients=20,
                     survset="gse4335"):  # every layer and table row, 1 seed, 2 epochs
        if not (args.root or _common.has_dataset("her2st")):
            print("her2st data absent: the smoke run skips the semi-synthetic HER2ST layer")
            args.skip += ",her2st"
    if "her2st" not in set(args.skip.split(",")) or args.variants:
        args.root = str(_common.dataset("her2st", args.root))
    for k in ("seeds", "sim_seeds", "variant_seeds"):
        setattr(args, k, [int(v) for v in getattr(args, k).split(",")])
    args.missing = [float(f) for f in args.missing.split(",") if f]
    args.survset = [s for s in args.survset.split(",") if s]
    args.skip = set(args.skip.split(","))
    return args


def main() -> int:
    args = parse_args()
    seeds = ((args.seeds if "her2st" not in args.skip else []) + (args.variant_seeds if args.variants else [])
             + (args.sim_seeds if {"simulated", "survset", "brace"} - args.skip else []))
    args.record = _common.Results(args, seeds=sorted(set(seeds)), precision="fp32", variant="variants" if args.variants else None)
    t0 = time.time()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # small matrices: BLAS threads only contend (the nets train on one torch thread)
        parts = layer1(args, t0) + (variants(args, t0) if args.variants else []) + layer2(args, t0)
    took = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        line = f"Tables rebuilt from the saved CSVs (--report-only). {(args.out / 'run_time.txt').read_text().strip()}"
    else:
        line = f"Run time: {took / 60:.1f} min on {os.cpu_count()} CPUs (other jobs running), command: {_common.command()}"
        (args.out / "run_time.txt").write_text(line + "\n")
    parts += ["", line]
    text = "\n".join(parts)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0 if args.report_only else args.record.finish()


if __name__ == "__main__":
    sys.exit(main())
