"""Metrics of the field: clustering agreement (ARI, NMI, niche-ID accuracy), macro-F1,
per-gene Pearson, C-index. Inputs are NumPy arrays; functions return floats or DataFrames."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray, genes=None) -> pd.Series:
    """Pearson r of each column of (n_spots, n_genes) ``y_true`` vs ``y_pred``.

    A gene that is constant in either array gets NaN (undefined), not 0.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"shapes differ or are not 2-D: {y_true.shape} vs {y_pred.shape}")
    a = y_true - y_true.mean(0)
    b = y_pred - y_pred.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1.0), np.nan)
    return pd.Series(r, index=genes if genes is not None else range(y_true.shape[1]), name="pearson")


# --------------------------------------------------------------------------- niches
# Clustering agreement against a teacher's niches. Inputs: 1-D label arrays of equal length.


def ari(labels_true, labels_pred) -> float:
    """Adjusted Rand index (ignores label identities; 1 = same partition, ~0 = chance)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(labels_true), np.asarray(labels_pred)))


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information (arithmetic mean normalisation; ignores label identities)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(labels_true), np.asarray(labels_pred)))


def niche_id_accuracy(teacher, student) -> float:
    """Share of spots whose predicted niche id equals the teacher's (identities matter, unlike ARI/NMI)."""
    t, s = np.asarray(teacher), np.asarray(student)
    if t.shape != s.shape:
        raise ValueError(f"shapes differ: {t.shape} vs {s.shape}")
    return float(np.mean(t.astype(str) == s.astype(str))) if t.size else float("nan")


def seen_niche_share(test_teacher, train_teacher) -> float:
    """Share of test spots whose teacher niche occurs among the training spots' teacher niches."""
    t = np.asarray(test_teacher).astype(str)
    return float(np.isin(t, np.unique(np.asarray(train_teacher).astype(str))).mean()) if t.size else float("nan")


def niche_sizes(niches, groups, categories=None) -> pd.DataFrame:
    """Spots per niche (columns) in each group (rows, e.g. patients): a crosstab of counts."""
    tab = pd.crosstab(pd.Series(np.asarray(groups).astype(str), name="group"),
                      pd.Series(np.asarray(niches).astype(str), name="niche"))
    if categories is not None:
        tab = tab.reindex(columns=[str(c) for c in categories], fill_value=0)
    return tab


def niche_patients(niches, patients, min_share: float = 0.02, categories=None) -> pd.DataFrame:
    """Which patients hold each niche: one row per niche, the spots of each patient in it (one
    column per patient), ``n_patients`` holding it (at least ``min_share`` of that patient's
    spots) and ``patients`` (their ids, comma-separated). A niche no training patient holds
    cannot be learnt from those patients, whatever the student's input."""
    tab = niche_sizes(niches, patients, categories).T  # niches x patients
    held = tab.div(tab.sum(0).replace(0, 1), axis=1) >= min_share
    out = tab.copy()
    out.columns = [str(c) for c in out.columns]
    out["n_patients"] = held.sum(1).astype(int)
    out["patients"] = [",".join(str(p) for p in held.columns[row]) for row in held.to_numpy()]
    out.index.name = "niche"
    return out


def shared_niche_mask(test_niches, train_niches, train_patients, min_share: float = 0.02) -> np.ndarray:
    """(n_test,) bool: test spots whose niche is held (:func:`niche_patients`) by at least one
    training patient."""
    held = niche_patients(train_niches, train_patients, min_share)
    return np.isin(np.asarray(test_niches).astype(str), held.index[held["n_patients"] > 0].astype(str))


def majority_map(source, target) -> dict:
    """``{source label: most frequent target label among its spots}`` (ties: first in sorted order).

    Used to map niches to pathology labels, or baseline clusters to teacher niches, on
    *training* spots only; apply it to test spots with :func:`apply_map`.
    """
    df = pd.DataFrame({"s": np.asarray(source).astype(str), "t": np.asarray(target).astype(str)})
    counts = df.groupby(["s", "t"]).size().reset_index(name="n").sort_values(["s", "n", "t"], ascending=[True, False, True])
    return dict(counts.drop_duplicates("s")[["s", "t"]].itertuples(index=False, name=None))


def apply_map(labels, mapping: dict, default=None) -> np.ndarray:
    """Map each label through ``mapping``; unmapped labels get ``default``."""
    return np.array([mapping.get(str(v), default) for v in np.asarray(labels).astype(str)], dtype=object)


def macro_f1(y_true, y_pred, labels=None) -> float:
    """Macro-averaged F1 over ``labels`` (default: the classes present in ``y_true``)."""
    from sklearn.metrics import f1_score

    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    labels = sorted(set(y_true)) if labels is None else [str(x) for x in labels]
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def trivial_macro_f1(y_true, label=None) -> tuple[str, float]:
    """Macro-F1 of predicting one label everywhere (default: the most frequent in ``y_true``).

    On HER2ST A1 (83% invasive cancer) this is the line any niche -> label map must beat.
    Returns ``(label, macro_f1)``.
    """
    y_true = np.asarray(y_true).astype(str)
    if label is None:
        v, c = np.unique(y_true, return_counts=True)
        label = str(v[np.argmax(c)])
    return label, macro_f1(y_true, np.full(len(y_true), label))


def hungarian_match(reference, labels) -> dict:
    """``{label: reference label}`` maximising overlap (Hungarian assignment on the contingency
    table); labels left over (more clusters than reference labels) map to themselves prefixed "+"."""
    from scipy.optimize import linear_sum_assignment

    r = np.asarray(reference).astype(str)
    lab = np.asarray(labels).astype(str)
    tab = pd.crosstab(lab, r)
    rows, cols = linear_sum_assignment(-tab.to_numpy())
    out = {str(tab.index[i]): str(tab.columns[j]) for i, j in zip(rows, cols)}
    for v in tab.index:
        out.setdefault(str(v), f"+{v}")
    return out


# --------------------------------------------------------------------------- survival
# Risk scores: higher = earlier event. ``time`` (n,) >= 0, ``event`` (n,) 0/1. torchsurv does the
# work (optional extra: pip install 'stdistill[survival]').


def _surv_tensors(time, event, risk):
    import warnings

    try:
        import torch

        with warnings.catch_warnings():  # torchsurv's import calls the deprecated torch.jit.script
            warnings.simplefilter("ignore", FutureWarning)
            import torchsurv  # noqa: F401
    except ImportError:
        from ._errors import StdistillError

        raise StdistillError("survival metrics need torchsurv: pip install 'stdistill[survival]'") from None
    t, e, r = (np.asarray(x, dtype=np.float64).ravel() for x in (time, event, risk))
    if not (len(t) == len(e) == len(r)):
        raise ValueError(f"lengths differ: time {len(t)}, event {len(e)}, risk {len(r)}")
    return torch.from_numpy(t), torch.from_numpy(e).bool(), torch.from_numpy(r)


def cindex(time, event, risk) -> float:
    """Harrell's C-index (torchsurv): share of comparable pairs (the earlier time is an event)
    ordered by the risk, ties in risk counting 1/2. NaN without events or comparable pairs."""
    t, e, r = _surv_tensors(time, event, risk)
    if not bool(e.any()) or len(t) < 2:
        return float("nan")
    from torchsurv.metrics.cindex import ConcordanceIndex

    return float(ConcordanceIndex()(r, e, t))


def _ipcw(e, t, e_ref, t_ref):
    """Inverse probability of censoring weights at ``t``, the censoring distribution estimated by
    Kaplan-Meier on ``(e_ref, t_ref)`` (the training data)."""
    from torchsurv.stats.ipcw import get_ipcw

    return get_ipcw(e_ref, t_ref, t).to(t.dtype)


def cindex_uno(time, event, risk, train_time=None, train_event=None) -> float:
    """Uno's C-index (torchsurv): Harrell's with inverse-probability-of-censoring weights, the
    censoring distribution estimated on ``train_time``/``train_event`` (default: the data itself)
    and evaluated at ``time``. NaN without events."""
    t, e, r = _surv_tensors(time, event, risk)
    if not bool(e.any()) or len(t) < 2:
        return float("nan")
    from torchsurv.metrics.cindex import ConcordanceIndex

    tt, te, _ = _surv_tensors(train_time, train_event, train_time) if train_time is not None else (t, e, None)
    w = _ipcw(e, t, te, tt)
    if not bool((w[e] > 0).any()):
        return float("nan")
    return float(ConcordanceIndex()(r, e, t, weight=w))


def time_auc(time, event, risk, at: float, train_time=None, train_event=None) -> float:
    """Cumulative/dynamic AUC at time ``at`` (torchsurv; IPCW from the training data): how well the
    risk separates patients with an event by ``at`` from those still event-free. NaN when ``at`` is
    outside the follow-up or no patient is on either side."""
    t, e, r = _surv_tensors(time, event, risk)
    if not (bool((e & (t <= at)).any()) and bool((t > at).any())):
        return float("nan")
    import torch
    from torchsurv.metrics.auc import Auc

    tt, te, _ = _surv_tensors(train_time, train_event, train_time) if train_time is not None else (t, e, None)
    w = _ipcw(e, t, te, tt)
    at_t = torch.tensor([float(at)], dtype=t.dtype)
    return float(Auc()(r, e, t, weight=w, new_time=at_t, weight_new_time=_ipcw(e, at_t, te, tt)).reshape(-1)[0])
