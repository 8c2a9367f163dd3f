"""Patient-level cross-validation of survival models, with settings chosen on inner patients
(:func:`select_survival`: the shared :func:`stdistill.select.select` over a cohort's inner patient
folds, :class:`stdistill.select.PatientFolds`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ..._errors import StdistillError
from ...io._cohort import Cohort
from ...select import Criterion, PatientFolds, Selection, select
from ._model import SurvivalConfig, SurvivalModel

Fold = tuple[str, list[str], list[str]]  # (name, training patients, test patients)


@dataclass
class Method:
    """A named model of a comparison; a student names the method that is its teacher; ``epochs_like``
    names an earlier method whose chosen epochs this one reuses (ablations: saves their selection);
    ``missing_rna``: the share of each fold's training patients whose RNA is removed before
    anything is chosen or trained (:func:`mask_rna`; test patients keep theirs). A student and its
    teacher must share it."""

    name: str
    config: SurvivalConfig
    teacher: str | None = None
    epochs_like: str | None = None  # train for the epochs chosen for this (earlier) method instead of choosing
    missing_rna: float = 0.0


def amkd_methods(base: SurvivalConfig | None = None, ablations: bool = True, rr_variants: bool = False,
                 missing_rna: Sequence[float] = ()) -> list[Method]:
    """Baselines (ABMIL, SNN, late fusion), AMKD's teacher (``gge``) and student, and the ablations:
    no enhancement module (student of the late-fusion model), no redundancy reduction, fixed
    instead of adaptive weights, plain logit KD; the ablations train for the epochs chosen for
    AMKD. Teachers come before their students.

    ``rr_variants``: also the student with the reachable redundancy loss (``rr_form="whitened"``),
    disagreeing samples weighted up (``amkd_rr_whitened``) and down (``amkd_rr_whitened_down``),
    for AMKD's epochs. ``missing_rna``: per share f, a teacher and a student trained with f of the
    training patients' RNA removed (``gge_teacher_miss<100f>``, ``amkd_miss<100f>``), their epochs
    chosen anew on the inner patients (which lose their RNA in the same way)."""
    b = base or SurvivalConfig()
    s = replace(b, kind="student")
    out = [Method("abmil", replace(b, kind="abmil")), Method("snn", replace(b, kind="snn")),
           Method("late_fusion", replace(b, kind="late_fusion")), Method("gge_teacher", replace(b, kind="gge")),
           Method("amkd", s, "gge_teacher")]
    if ablations:
        out += [Method("amkd_no_enhancement", s, "late_fusion", "amkd"),
                Method("amkd_no_rr", replace(s, w_rr=0.0), "gge_teacher", "amkd"),
                Method("amkd_fixed_weight", replace(s, rr_weight="fixed"), "gge_teacher", "amkd"),
                Method("logit_kd", replace(s, w_feat=0.0, w_rr=0.0, w_logit=1.0), "gge_teacher", "amkd")]
    if rr_variants:
        out += [Method("amkd_rr_whitened", replace(s, rr_form="whitened"), "gge_teacher", "amkd"),
                Method("amkd_rr_whitened_down", replace(s, rr_form="whitened", rr_weight="adaptive_down"),
                       "gge_teacher", "amkd")]
    for f in missing_rna:
        tag = f"miss{round(100 * f)}"
        out += [Method(f"gge_teacher_{tag}", replace(b, kind="gge"), missing_rna=f),
                Method(f"amkd_{tag}", s, f"gge_teacher_{tag}", missing_rna=f)]
    return out


def mask_rna(cohort: Cohort, fraction: float, seed: int = 0) -> Cohort:
    """``cohort`` with the RNA of ``round(fraction x n)`` patients removed (all-missing rows): the
    first patients of a permutation of the sorted patient ids drawn with ``seed``, so a larger
    fraction removes a superset. Pass training patients only."""
    if not 0.0 <= fraction < 1.0:
        raise StdistillError(f"missing_rna must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return cohort
    if cohort.rna is None:
        raise StdistillError("mask_rna needs a cohort with an RNA table")
    n = int(round(fraction * len(cohort.patients)))
    order = np.random.default_rng(seed).permutation(sorted(cohort.patients))
    rna = cohort.rna.copy()
    rna.loc[list(order[:n])] = np.nan
    return replace(cohort, rna=rna)


def patient_folds(cohort: Cohort, k: int = 5, *, groups: str | None = None, seed: int = 0) -> list[Fold]:
    """Patient-level folds: leave one ``table[groups]`` value out (e.g. the source patient of the
    semi-synthetic cohort), else ``k`` folds stratified by event (shuffled with ``seed``)
    (:class:`stdistill.select.PatientFolds`)."""
    return PatientFolds(k, groups=groups, seed=seed).folds(cohort)


def select_survival(cohort: Cohort, config: SurvivalConfig, grid: Sequence[dict] | None = None, *,
                    teacher_fn: Callable[[str, Cohort], SurvivalModel] | None = None, groups: str | None = None,
                    inner_k: int = 3, smooth: int = 3, genesets=None) -> Selection:
    """Choose grid fields and the number of epochs on inner validation patients of ``cohort`` (a
    fold's **training** patients) with :func:`stdistill.select.select`: every candidate trains on
    each inner split for ``config.max_epochs`` epochs, Harrell's C-index on the inner validation
    patients is recorded after every epoch, and the best point of the mean curve wins.

    ``teacher_fn(split name, inner training cohort)`` gives a student its teacher, fitted on the
    same inner training patients. Inner splits (:class:`stdistill.select.PatientFolds`): leave one
    ``groups`` value out when it has >= 2 values, else ``inner_k`` stratified folds; splits without
    an event are skipped. A C-index on a few dozen validation patients is noisy from epoch to
    epoch, so the criterion smooths each curve with a centred moving average over ``smooth`` epochs
    before averaging (the table keeps the raw curves).

    Returns a :class:`~stdistill.select.Selection` (``.config()``: the chosen config, ``max_epochs``
    = the chosen epoch; unpacking it as ``(config, table)`` is deprecated).
    """
    use_groups = groups if groups is not None and cohort.table[groups].nunique() >= 2 else None

    def fit_score(cfg: SurvivalConfig, s) -> list[float]:
        teacher = teacher_fn(s.name, s.train) if teacher_fn is not None else None
        m = SurvivalModel(cfg).fit(s.train, teacher=teacher, val=s.val, genesets=genesets)
        return [h["val_cindex"] for h in m.history_]

    return select(cohort, fit_score, list(grid or [{}]), base=config, splitter=PatientFolds(inner_k, groups=use_groups),
                  criterion=Criterion(metric="val_cindex", maximize=config.maximize, smooth=smooth))


def _scores(method: str, fold: str, seed: int, risk: np.ndarray, test: Cohort, train: Cohort) -> dict:
    from ...metrics import cindex, cindex_uno, time_auc

    at = float(np.median(train.time[train.event == 1]))
    return {"fold": fold, "seed": seed, "method": method, "cindex": cindex(test.time, test.event, risk),
            "cindex_uno": cindex_uno(test.time, test.event, risk, train.time, train.event),
            "auc": time_auc(test.time, test.event, risk, at, train.time, train.event),
            "n_test": len(test.patients), "n_events": int(test.event.sum())}


def _view(cohort: Cohort, cfg: SurvivalConfig) -> Cohort:
    """What a model may see at test time: H&E-only models get the cohort without RNA."""
    return cohort.without_rna() if cfg.kind in ("abmil", "student") else cohort


def _choose_all(ctr: Cohort, methods: Sequence[Method], grid: dict | None, groups, inner_k, genesets, fold: str):
    """Per method, the config chosen on inner patients of ``ctr``; and the concatenated curve tables."""
    chosen, tables, inner = {}, [], {}
    for m in methods:
        if m.epochs_like is not None:
            chosen[m.name] = replace(m.config, max_epochs=chosen[m.epochs_like].max_epochs)
            continue
        tf = None
        if m.teacher is not None:
            def tf(split: str, c: Cohort, _t: str = m.teacher) -> SurvivalModel:
                if (_t, split) not in inner:
                    inner[(_t, split)] = SurvivalModel(chosen[_t]).fit(c, genesets=genesets)
                return inner[(_t, split)]
        sel = select_survival(mask_rna(ctr, m.missing_rna), m.config, (grid or {}).get(m.name), teacher_fn=tf, groups=groups,
                              inner_k=inner_k, genesets=genesets)
        chosen[m.name] = sel.config()
        tables.append(sel.table.assign(method=m.name, fold=fold))
    return chosen, tables


def survival_cv(cohort: Cohort, methods: Sequence[Method], folds: Sequence[Fold], *, seeds: Sequence[int] = (0,),
                select: bool = True, grid: dict[str, list[dict]] | None = None, groups: str | None = None,
                inner_k: int = 3, genesets=None, truth: str | None = "hazard_true",
                on_fit: Callable[..., None] | None = None, log: Callable[[str], None] | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cross-validate ``methods`` over patient ``folds`` (see :func:`patient_folds`).

    Per fold, on the training patients only: time bins, gene standardisation and (``select``)
    each method's epochs and ``grid[method]`` fields, chosen by :func:`select_survival` with seed 0
    (students get a teacher trained on the same inner patients); a method's ``missing_rna`` share of
    the training patients loses its RNA first (:func:`mask_rna`, seed 0). Then, per seed, every method is
    trained on all training patients (a student from its teacher of the same seed) and scored on
    the test patients: Harrell and Uno C-index (IPCW from the training fold) and the cumulative AUC
    at the training median event time. H&E-only models are given the test cohort without RNA.
    ``truth``: a table column with the true risk; scored as method ``"oracle"`` when present.
    ``on_fit(fold, seed, method, model, test_cohort, risk)`` is called after every fit.

    Returns ``(results, selection)``: one row per fold x seed x method (``cindex``,
    ``cindex_uno``, ``auc``, ``n_test``, ``n_events``, ``epochs``, ``seconds``), and the curves.
    """
    names = [m.name for m in methods]
    for m in methods:
        for ref in (m.teacher, m.epochs_like):
            if ref is not None and (ref not in names or names.index(ref) > names.index(m.name)):
                raise StdistillError(f"method {m.name!r}: {ref!r} (its teacher or epochs_like) must be listed before it")
        if m.teacher is not None and methods[names.index(m.teacher)].missing_rna != m.missing_rna:
            raise StdistillError(f"method {m.name!r} and its teacher {m.teacher!r} must share missing_rna")
    rows, tables = [], []
    for fold, tr, te in folds:
        if set(tr) & set(te):
            raise StdistillError(f"fold {fold}: patients in both training and test: {sorted(set(tr) & set(te))[:3]}")
        ctr, cte = cohort.subset(tr), cohort.subset(te)
        if select:
            chosen, t = _choose_all(ctr, methods, grid, groups, inner_k, genesets, fold)
            tables += t
        else:
            chosen = {m.name: m.config for m in methods}
        for seed in seeds:
            fitted: dict[str, SurvivalModel] = {}
            for m in methods:
                cfg = replace(chosen[m.name], seed=seed)
                model = SurvivalModel(cfg).fit(mask_rna(ctr, m.missing_rna), teacher=fitted.get(m.teacher), genesets=genesets)
                fitted[m.name] = model
                risk = model.predict(_view(cte, cfg)).to_numpy()
                rows.append({**_scores(m.name, fold, seed, risk, cte, ctr), "epochs": cfg.max_epochs,
                             "seconds": model.fit_seconds_})
                if on_fit is not None:
                    on_fit(fold, seed, m.name, model, cte, risk)
                if log is not None:
                    log(f"fold {fold} seed {seed} {m.name}: C={rows[-1]['cindex']:.3f} ({cfg.max_epochs} epochs)")
            if truth is not None and truth in cohort.table.columns:
                rows.append({**_scores("oracle", fold, seed, cte.table[truth].to_numpy(np.float64), cte, ctr),
                             "epochs": 0, "seconds": 0.0})
    return pd.DataFrame(rows), (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame())


def cv_table(results: pd.DataFrame, metrics: Sequence[str] = ("cindex", "cindex_uno", "auc")) -> pd.DataFrame:
    """One row per method: for each metric, the mean over folds per seed, then mean and sd over
    seeds (``<metric>_mean``, ``<metric>_sd``); plus Harrell's C per fold (mean over seeds)."""
    order = list(dict.fromkeys(results["method"]))
    per_seed = results.groupby(["method", "seed"])[list(metrics)].mean()
    agg = per_seed.groupby("method").agg(["mean", "std"])
    agg.columns = [f"{m}_{s.replace('std', 'sd')}" for m, s in agg.columns]
    folds = results.groupby(["method", "fold"])["cindex"].mean().unstack("fold").add_prefix("C_")
    out = agg.join(folds).reindex(order)
    out["n_seeds"] = results.groupby("method")["seed"].nunique().reindex(order)
    return out


def amkd(cohort: Cohort, *, teacher: SurvivalConfig | None = None, student: SurvivalConfig | None = None,
         genesets=None) -> tuple[SurvivalModel, SurvivalModel]:
    """Fit AMKD on ``cohort`` (training patients): the multimodal teacher with the gene-guided
    enhancement module (``kind="gge"``), then the H&E-only student distilled from it. Returns
    ``(teacher, student)``; the student predicts from slide features alone."""
    tcfg = replace(teacher or SurvivalConfig(), kind=(teacher.kind if teacher else "gge"))
    scfg = replace(student or SurvivalConfig(dim=tcfg.dim, loss=tcfg.loss), kind="student")
    t = SurvivalModel(tcfg).fit(cohort, genesets=genesets)
    return t, SurvivalModel(scfg).fit(cohort, teacher=t, genesets=genesets)
