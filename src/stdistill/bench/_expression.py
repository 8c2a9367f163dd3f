"""HEST-Benchmark's expression protocol on any AnnData with patch features.

Per fold (patient-level; train and test never share a patient):

1. targets: ``log1p`` of the raw counts of 50 genes, chosen on the **training** sections only
   (:func:`stdistill.pp.hest_genes`) or read from a given list (HEST's ``var_50genes.json``);
2. features -> ``StandardScaler`` -> ``PCA(256, random_state=seed)`` -> ``Ridge(solver="lsqr",
   fit_intercept=False, alpha=100 / (d * n_genes), max_iter=1000)`` with ``d`` the width fed to
   the ridge (256 after PCA);
3. Pearson r of each gene on the concatenated test split; the fold's score is the mean over genes.

The benchmark's score is the mean +- standard deviation (``np.std``, ddof=0, as HEST) of the
fold scores. ``alpha="cv"`` instead chooses alpha by leave-one-patient-out cross-validation on the
fold's training patients (a choice on an edge of the grid is flagged and warned about). Deviations
from HEST, all for small data: PCA's width is capped at ``min(256, n_train, n_features)`` (HEST
would stop with an error), and a gene constant in a test split gets a NaN Pearson r that is left
out of the mean (HEST's mean would be NaN); both are recorded in the per-fold table.
"""


from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ..io._section import PATIENT_KEY, SECTION_KEY, sections as _sections
from ..pp.genes import hest_genes, log1p_targets
from ..pp.splits import Fold
from .._keys import Key
from ..select import Criterion, LeaveOnePatientOut, Selection, Split, select
from ._folds import _resolve_folds
from ._inputs import _candidates, _features, _given_genes, _present_extra_genes, _Setup, _views
from ._probe import DEFAULT_ALPHAS, HestRidge, _fold_scores, choose_alpha_cv, hest_alpha
from ._result import ExpressionBenchResult

__all__ = ["expression"]


def _per_gene_table(per_gene: dict[str, pd.Series]) -> pd.DataFrame:
    """Genes x folds Pearson r with ``mean``/``std`` (ddof=0)/``n_folds`` columns, best mean first."""
    pg = pd.DataFrame(per_gene)
    names = list(per_gene)
    pg["mean"] = pg[names].mean(1)
    pg["std"] = pg[names].std(1, ddof=0)
    pg["n_folds"] = pg[names].notna().sum(1)
    return pg.sort_values("mean", ascending=False)


def _cv_alpha(s: _Setup, fold: str, tr: np.ndarray, Ytr: np.ndarray) -> tuple[float, dict]:
    """``alpha="cv"`` for one fold: (alpha, per-fold columns); warns when alpha is an end of its grid."""
    d = min(s.probe["latent_dim"] or s.F.shape[1], s.F.shape[1])
    grid = sorted(set(s.alphas) | {hest_alpha(d, Ytr.shape[1])})
    a, scores = choose_alpha_cv(s.F[tr], Ytr, s.pat_of[tr], grid, **s.probe, views=s.V[tr] if s.V is not None else None)
    on_edge = a in (grid[0], grid[-1])
    if on_edge:
        end = "smallest" if a == grid[0] else "largest"
        warnings.warn(f"fold {fold}: alpha='cv' chose {a:g}, the {end} value of its grid ({grid[0]:g} .. {grid[-1]:g}); "
                      "the best alpha may lie beyond it (widen `alphas`)", stacklevel=4)
    return a, {"cv_best_inner_pearson": float(scores.max()), "alpha_on_edge": bool(on_edge)}


def _run_fold(adata: ad.AnnData, s: _Setup, f: Fold) -> tuple[dict, pd.Series, pd.DataFrame, pd.DataFrame, list[str]]:
    """One fold: (per-fold row, per-gene r, test predictions, test targets, target genes)."""
    train_secs = [x for x in f.train + f.val if x in s.known]
    test_secs = [x for x in f.test if x in s.known]
    if not train_secs or not test_secs:
        raise StdistillError(f"fold {f.name}: no training or no test sections in the data")
    tr, te = np.isin(s.sec_of, train_secs), np.isin(s.sec_of, test_secs)
    layer = s.layer
    g = s.fixed_genes if s.fixed_genes is not None else hest_genes(
        adata, s.n_genes, sections=train_secs, min_frac=s.min_frac, layer=layer)
    Ytr = log1p_targets(adata[tr], g, layer=layer)
    Yte = log1p_targets(adata[te], g, layer=layer)
    a, cv_cols = _cv_alpha(s, f.name, tr, Ytr) if s.alpha == "cv" else (s.alpha, {})
    Vtr = s.V[tr] if s.V is not None else None  # extra training rows; the test spots use clean features
    probe = HestRidge(alpha=a, **s.probe).fit(s.F[tr], Ytr, genes=g, views=Vtr)
    Pte = probe.predict(s.F[te])
    r, m, n_nan = _fold_scores(Yte, Pte, g)
    obs = adata.obs_names[te]
    P = pd.DataFrame(Pte.astype(np.float32), index=obs, columns=g)
    Y = pd.DataFrame(Yte, index=obs, columns=g)
    row = {"fold": f.name, "test_patients": "+".join(sorted(set(s.pat_of[te]))), "test_sections": "+".join(test_secs),
           "n_train": int(tr.sum()), "n_train_rows": int(tr.sum()) * (1 + (s.V.shape[1] if s.V is not None else 0)),
           "n_test": int(te.sum()), "n_genes": len(g), "pca_dim": probe.n_components_,
           "alpha": probe.alpha_, "pearson_mean": m, "n_genes_undefined": n_nan, **cv_cols}
    extra = [x for x in s.extra if x not in g]
    if extra:  # reported, not scored: a probe on the extra genes alone, same settings as the 50
        Etr = log1p_targets(adata[tr], extra, layer=layer)
        Ete = log1p_targets(adata[te], extra, layer=layer)
        # ridge is separable over targets: the 50-gene alpha on the same PCA gives what the
        # extra genes would get inside the 50-gene fit, without changing the 50 genes' alpha
        pe = HestRidge(alpha=probe.alpha_, **s.probe).fit(s.F[tr], Etr, genes=extra, views=Vtr)
        Pe = pe.predict(s.F[te])
        r = pd.concat([r, _fold_scores(Ete, Pe, extra)[0]])
        P[extra] = Pe.astype(np.float32)
        Y[extra] = Ete
    row.update({f"r_{x}": float(r[x]) for x in s.extra})
    return row, r, P, Y, list(g)


def _candidate_setup(adata: ad.AnnData, s: _Setup, name: str, keys: list[str], views: bool) -> _Setup:
    """``s`` with the features (and views) of one feature candidate; errors name the candidate."""
    try:
        return replace(s, F=_features(adata, keys), V=_views(adata, keys) if views else None)
    except StdistillError as e:
        raise StdistillError(f"feature candidate {name!r}: {e}") from None


def _select(adata: ad.AnnData, setups: dict[str, _Setup], f: Fold) -> Selection:
    """Feature candidates scored by :func:`_run_fold` on the leave-one-patient-out folds inside ``f``'s
    training (+val) patients (genes and alpha chosen on the inner training sections; report-only
    genes left out), chosen by :func:`stdistill.select.select`: the best mean Pearson over the inner
    folds (NaN folds skipped; ties and NaN: the first listed wins). The test sections of ``f`` are
    not read."""
    first = next(iter(setups.values()))
    pats = pd.Series({x: f.patients[x] for x in f.train + f.val if x in first.known}, dtype=object)
    n, need = pats.nunique(), 3 if first.alpha == "cv" else 2  # alpha="cv" nests one more level
    if n < need:
        raise StdistillError(f"fold {f.name}: choosing among feature candidates needs at least {need} training patients "
                             f"(leave-one-patient-out inside them{', alpha=cv inside those' if need == 3 else ''}), "
                             f"got {n}; give one feature_key or more patients")

    def fit_score(c: dict, split: Split) -> float:
        inner = Fold(name=f"{f.name}/{split.name}", train=split.train, test=split.val, patients=pats.to_dict())
        return _run_fold(adata, replace(setups[c["features"]], extra=[]), inner)[0]["pearson_mean"]

    return select(pats, fit_score, [{"features": name} for name in setups], splitter=LeaveOnePatientOut(),
                  criterion=Criterion(metric="inner_pearson", skip_nan=True))


def _run_chosen_fold(adata: ad.AnnData, setups: dict[str, _Setup], f: Fold) -> tuple[tuple, Selection]:
    """One fold with feature candidates: the one chosen inside the training patients (:func:`_select`),
    fitted on all training patients and scored on the test patients. Returns :func:`_run_fold`'s
    tuple (its row with ``chosen`` and ``inner_pearson``) and the Selection."""
    sel = _select(adata, setups, f)
    best = sel.choice["settings"]["features"]
    row, *rest = _run_fold(adata, setups[best], f)
    row.update(chosen=best, inner_pearson=sel.choice["score"])
    return (row, *rest), sel


def _setup(adata: ad.AnnData, genes, extra_genes, alpha, **kw) -> _Setup:
    """What every fold shares (features filled in by :func:`_feature_setups`)."""
    if alpha not in ("hest", "cv") and not isinstance(alpha, (int, float)):
        raise StdistillError(f"alpha must be 'hest', 'cv' or a number, got {alpha!r}")
    return _Setup(F=np.empty((adata.n_obs, 0)), V=None, sec_of=adata.obs[SECTION_KEY].astype(str).to_numpy(),
                  pat_of=adata.obs[PATIENT_KEY].astype(str).to_numpy(), known=set(_sections(adata)),
                  fixed_genes=_given_genes(genes), extra=_present_extra_genes(adata, extra_genes), alpha=alpha, **kw)


def _feature_setups(adata: ad.AnnData, s: _Setup, feature_key, views: bool) -> tuple[dict[str, _Setup] | None, _Setup, object, object]:
    """(candidates' setups or None, the single-key setup, the ``feature_key`` and ``views`` records)."""
    if isinstance(feature_key, Mapping):
        cands = _candidates(feature_key, views)
        setups = {name: _candidate_setup(adata, s, name, k, v) for name, (k, v) in cands.items()}
        return (setups, s, {name: {"key": k, "views": v} for name, (k, v) in cands.items()},
                {name: int(x.V.shape[1]) if x.V is not None else 0 for name, x in setups.items()})
    s = replace(s, F=_features(adata, feature_key), V=_views(adata, feature_key) if views else None)
    return None, s, (feature_key if isinstance(feature_key, str) else list(feature_key)), (int(s.V.shape[1]) if s.V is not None else 0)


def _run_folds(adata: ad.AnnData, s: _Setup, setups: dict[str, _Setup] | None, folds) -> tuple[list, dict]:
    """Every fold: (per-fold rows, {"per_gene", "predictions", "targets", "genes", "selections"} by fold)."""
    rows, out = [], {k: {} for k in ("per_gene", "predictions", "targets", "genes", "selections")}
    for f in _resolve_folds(adata, folds):
        if setups:
            res, out["selections"][f.name] = _run_chosen_fold(adata, setups, f)
        else:
            res = _run_fold(adata, s, f)
        row, out["per_gene"][f.name], out["predictions"][f.name], out["targets"][f.name], out["genes"][f.name] = res
        rows.append(row)
    return rows, out


def _inner_scores(sels: dict[str, Selection]) -> pd.DataFrame:
    """Folds x feature candidates: each candidate's mean inner Pearson (:attr:`ExpressionBenchResult.selection`)."""
    rows = [v.scores().set_index("features")["score"].rename(k).rename_axis(None) for k, v in sels.items()]
    return pd.DataFrame(rows).rename_axis("fold")


def expression(
    adata: ad.AnnData,
    feature_key: str | Sequence[str] | Mapping[str, str | Sequence[str] | Mapping],
    *,
    views: bool = False,
    folds=None,
    genes: Sequence[str] | str | os.PathLike | None = None,
    n_genes: int = 50,
    min_frac: float = 0.10,
    latent_dim: int | None = 256,
    alpha: float | str = "hest",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    seed: int = 1,
    svd_solver: str = "auto",
    clip: bool = False,
    extra_genes: Sequence[str] = (),
    layer: str | None = None,
    key_added: str | None = Key.uns.bench_expression,
) -> ExpressionBenchResult:
    """HEST-Benchmark expression evaluation of the features in ``obsm[feature_key]`` (see the module
    docstring for the protocol).

    Parameters
    ----------
    adata
        Sections (``obs["section"]``, ``obs["patient"]``) with raw counts and (n_spots, D)
        features in ``obsm[feature_key]``.
    feature_key
        An obsm key, or several (patch and context features: concatenated per spot), or feature
        **candidates**, a dict name -> key, list of keys or ``{"key": ..., "views": bool}``: in
        every fold each is scored by this protocol on leave-one-patient-out folds inside the
        training patients (:func:`stdistill.select.select`; test patients not read), the best mean
        Pearson wins (ties: the first listed) and is scored on the test patients. Needs >= 2
        training patients per fold (3 with ``alpha="cv"``); ``per_fold`` gets ``chosen`` and
        ``inner_pearson``, ``selection`` the candidates' inner scores, ``selections`` each fold's
        :class:`~stdistill.select.Selection`.
    views
        Also train on ``obsm[key + "_views"]`` (n_spots, K, D; ``features.extract(views=K)``) as K
        extra rows per training spot; test spots use the clean features. Candidates: their default.
    folds
        ``None``: leave-one-patient-out; an int: k patient folds; a list of
        :class:`~stdistill.pp.Fold` or ``(train_sections, test_sections)``; a HEST ``splits/`` folder.
    genes
        ``None``: ``n_genes`` genes chosen HEST's way on each fold's training sections (detected in
        >= ``min_frac`` of spots); a list of symbols or a gene list file (HEST ``var_50genes.json``).
    latent_dim, seed, svd_solver, clip
        The probe's PCA width (``None``: no PCA), random state, PCA solver and test-feature
        clipping (:class:`HestRidge`).
    alpha
        ``"hest"`` (``100 / (d * n_genes)``), a number, or ``"cv"`` (among ``alphas`` and HEST's
        value, leave-one-patient-out on the training patients; ``per_fold`` gets
        ``cv_best_inner_pearson`` and ``alpha_on_edge``, warned about).
    extra_genes
        Genes also predicted and reported (``per_gene``, ``per_fold["r_<gene>"]``) by a separate
        probe, **not** counted in ``pearson_mean``; absent genes are left out with a warning.
    key_added
        Writes ``adata.uns[key_added]`` (summary, per-fold table, parameters); ``None``: nothing.

    Returns
    -------
    :class:`ExpressionBenchResult` (per-fold table, per-gene table, test predictions).
    """
    s = _setup(adata, genes, extra_genes, alpha, n_genes=n_genes, min_frac=min_frac, layer=layer,
               alphas=alphas, probe={"latent_dim": latent_dim, "seed": seed, "svd_solver": svd_solver, "clip": clip})
    setups, s, fk, n_views = _feature_setups(adata, s, feature_key, views)
    rows, out = _run_folds(adata, s, setups, folds)
    sels = out.pop("selections") or None
    res = ExpressionBenchResult(
        per_fold=pd.DataFrame(rows), per_gene=_per_gene_table(out.pop("per_gene")), **out,
        params={"feature_key": fk, "views": n_views, "latent_dim": latent_dim if latent_dim is not None else "none",
                "alpha": alpha if isinstance(alpha, str) else float(alpha), "seed": seed, "n_genes": n_genes,
                "min_frac": min_frac, "clip": bool(clip), "genes": "given" if s.fixed_genes is not None else "hest_train_folds"},
        selection=_inner_scores(sels) if sels else None, selections=sels)
    if key_added:
        adata.uns[key_added] = res.to_uns()
    return res
