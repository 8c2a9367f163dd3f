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

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ..bundle import Bundled, bundle_record, check_shapes
from .._json import jsonable
from ..features._matrix import feature_keys as _feature_keys
from ..features._matrix import feature_matrix as _features
from ..io._section import PATIENT_KEY, SECTION_KEY, sections as _sections
from ..metrics import pearson_per_gene
from ..pp.genes import hest_genes, log1p_targets, read_gene_list
from ..pp.splits import Fold, check_split, folds as _make_folds
from .._keys import Key

__all__ = ["HestRidge", "ExpressionBenchResult", "expression", "hest_alpha", "choose_alpha_cv", "read_hest_splits", "with_views",
           "DEFAULT_ALPHAS"]

#: alpha grid searched by ``alpha="cv"``, one value per decade (HEST's own alpha is added for
#: every fold). It reaches 1e7 because on HER2ST the inner CV chose 1e4, the old top, in every fold.
DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7)
_FORMAT = "stdistill.HestRidge/2"


def with_views(X: np.ndarray, Y: np.ndarray, views: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Training rows with augmented views: ``X`` (n, D) then ``views[:, 0]``, ..., ``views[:, K-1]``.

    ``views``: (n, K, D) features of K augmented views of the same n spots (None: ``X``, ``Y``
    unchanged). Returns ((n * (K + 1), D) features, (n * (K + 1), G) targets: ``Y`` repeated).
    """
    if views is None:
        return X, Y
    V = np.asarray(views, dtype=np.float64)
    if V.ndim != 3 or len(V) != len(X) or V.shape[2] != X.shape[1]:
        raise StdistillError(f"views must be (n_spots, K, D) = ({len(X)}, K, {X.shape[1]}) like the features, got {V.shape}")
    if not np.isfinite(V).all():
        raise StdistillError("views contain NaN or infinite values")
    rows = [X] + [V[:, k] for k in range(V.shape[1])]
    return np.concatenate(rows), np.concatenate([Y] * len(rows))


def hest_alpha(d: int, n_genes: int) -> float:
    """HEST's ridge penalty: ``100 / (d * n_genes)``, ``d`` the feature width fed to the ridge."""
    return 100.0 / (d * n_genes)


class HestRidge(Bundled):
    """HEST's linear probe as a scikit-learn style estimator: StandardScaler -> PCA -> Ridge.

    Parameters
    ----------
    latent_dim
        PCA width (HEST: 256); ``None`` skips PCA (HEST's ``dimreduce=None``). Capped at
        ``min(n_train, n_features)``.
    alpha
        ``"hest"`` (``100 / (d * n_genes)``) or a number.
    seed
        PCA and ridge ``random_state`` (HEST's default seed is 1).
    svd_solver
        PCA solver: ``"auto"`` as HEST (randomized SVD for large inputs); ``"covariance_eigh"`` or
        ``"full"`` are exact and faster for a few thousand spots (used for validation inside PEKA).
    clip
        Clip every feature of new spots to its range on the training spots before scaling (not
        in HEST; off by default). A feature (nearly) constant on the training spots gets a tiny
        scale, so one new spot where it is not constant can get a huge standardised value and a
        wild prediction that wrecks that gene's Pearson r.
    """

    def __init__(self, latent_dim: int | None = 256, alpha: float | str = "hest", seed: int = 1, max_iter: int = 1000,
                 svd_solver: str = "auto", clip: bool = False):
        self.latent_dim, self.alpha, self.seed, self.max_iter = latent_dim, alpha, seed, max_iter
        self.svd_solver, self.clip = svd_solver, clip

    def _reduce_fit(self, X: np.ndarray) -> np.ndarray:
        """Fit scaler and PCA on the training features; return those features reduced, as HEST does.

        The training features are ``PCA.fit_transform`` (HEST's ``Pipeline.fit_transform``), not
        ``fit().transform()``: with the randomized solver (``"auto"`` on wide inputs) the first is
        U * S of the approximate SVD and the two differ. New data goes through :meth:`reduce`.
        """
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        self.scaler_ = StandardScaler().fit(X)
        self.lo_, self.hi_ = X.min(0), X.max(0)
        Z = self.scaler_.transform(X)
        self.pca_ = None
        if self.latent_dim is not None:
            k = int(min(self.latent_dim, X.shape[0], X.shape[1]))
            self.pca_ = PCA(n_components=k, random_state=self.seed, svd_solver=self.svd_solver)
            Z = self.pca_.fit_transform(Z)
        return Z

    def reduce(self, X: np.ndarray) -> np.ndarray:
        """Features after the fitted scaler and PCA, (n, d) (clipped to the training range first with ``clip``)."""
        X = np.asarray(X, dtype=np.float64)
        Z = self.scaler_.transform(np.clip(X, self.lo_, self.hi_) if self.clip else X)
        return self.pca_.transform(Z) if self.pca_ is not None else Z

    def fit(self, X: np.ndarray, Y: np.ndarray, genes: Sequence[str] | None = None,
            views: np.ndarray | None = None, features: Mapping | None = None) -> HestRidge:
        """Fit on (n, n_features) features and (n, n_genes) log1p targets.

        ``features``: the ``uns["features"][key]`` record of ``X`` (encoder, patch, precision, stain
        normalisation), kept in the saved bundle so that new features are made the same way.
        ``views``: (n, K, n_features) features of K augmented views of the same spots, used as
        K x n extra training rows with the same targets (scaler, PCA, clip range and ridge all see
        them); :meth:`predict` is unchanged (new spots: clean features).
        """
        from sklearn.linear_model import Ridge

        X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
            raise StdistillError(f"features {X.shape} and targets {Y.shape} must be 2-D with the same rows")
        if not np.isfinite(X).all():
            raise StdistillError("features contain NaN or infinite values")
        X, Y = with_views(X, Y, views)
        Z = self._reduce_fit(X)
        d = Z.shape[1]
        self.alpha_ = hest_alpha(d, Y.shape[1]) if self.alpha == "hest" else float(self.alpha)
        self.ridge_ = Ridge(solver="lsqr", alpha=self.alpha_, fit_intercept=False,
                            random_state=self.seed, max_iter=self.max_iter).fit(Z, Y)
        self.n_components_ = d
        self.genes_ = list(genes) if genes is not None else [str(i) for i in range(Y.shape[1])]
        self.features_ = jsonable(dict(features)) if features else None
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n, n_genes) predicted log1p expression."""
        if not hasattr(self, "ridge_"):
            raise StdistillError("HestRidge is not fitted; call fit() first")
        X = np.asarray(X, dtype=np.float64)
        if X.shape[1] != self.scaler_.n_features_in_:
            raise StdistillError(f"features have {X.shape[1]} columns, the probe was fitted on {self.scaler_.n_features_in_}")
        return np.asarray(self.ridge_.predict(self.reduce(X))).reshape(len(X), -1)

    # -- persistence: a bundle folder (see stdistill.bundle; save/load from Bundled)
    _bundle_format = _FORMAT

    def _bundle_parts(self) -> tuple[dict, dict, dict]:
        arrays = {"scaler_mean": self.scaler_.mean_, "scaler_scale": self.scaler_.scale_, "coef": self.ridge_.coef_,
                  "lo": self.lo_, "hi": self.hi_}
        if self.pca_ is not None:
            arrays.update(pca_mean=self.pca_.mean_, pca_components=self.pca_.components_)
        cfg = {"latent_dim": self.latent_dim, "alpha": self.alpha_, "seed": self.seed, "genes": self.genes_,
               "clip": bool(self.clip)}
        rec = bundle_record("probe", features=getattr(self, "features_", None), feature_norm="StandardScaler + PCA",
                            outputs={"genes": self.genes_}, training={"alpha": self.alpha_, "n_components": self.n_components_})
        return cfg, arrays, rec

    @classmethod
    def _from_bundle(cls, meta, z, record, path, **_) -> HestRidge:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        check_shapes(z, {"scaler_mean": ("D",), "scaler_scale": ("D",), "lo": ("D",), "hi": ("D",), "pca_mean?": ("D",),
                         "pca_components?": ("d", "D"), "coef": (len(meta["genes"]), "d")}, path, "HestRidge")
        z = {k: v.numpy() for k, v in z.items()}
        self = cls(latent_dim=meta["latent_dim"], alpha=meta["alpha"], seed=meta["seed"], clip=meta["clip"])
        self.lo_, self.hi_, self.features_ = z["lo"], z["hi"], record.get("features")
        self.scaler_ = StandardScaler()
        self.scaler_.mean_, self.scaler_.scale_, self.scaler_.var_ = z["scaler_mean"], z["scaler_scale"], z["scaler_scale"] ** 2
        self.scaler_.n_features_in_ = len(self.scaler_.mean_)
        self.pca_ = None
        if "pca_components" in z:
            self.pca_ = PCA(n_components=z["pca_components"].shape[0])
            self.pca_.mean_, self.pca_.components_, self.pca_.whiten = z["pca_mean"], z["pca_components"], False
            self.pca_.n_features_in_ = self.pca_.components_.shape[1]
        self.ridge_ = Ridge(fit_intercept=False)
        self.ridge_.coef_, self.ridge_.intercept_, self.ridge_.n_features_in_ = z["coef"], 0.0, z["coef"].shape[1]
        self.alpha_, self.genes_, self.n_components_ = float(meta["alpha"]), list(meta["genes"]), z["coef"].shape[1]
        return self


@dataclass
class ExpressionBenchResult:
    """What :func:`expression` returns.

    ``per_fold``: one row per fold (test patients, spots, genes, alpha, PCA width, Pearson mean).
    ``per_gene``: genes x folds Pearson r (NaN where a gene was not a target of that fold), with
    ``mean``/``std`` columns over folds. ``predictions``: fold -> DataFrame (test spots x genes)
    of predicted log1p expression; ``targets``: the same measured. ``selection`` (feature
    candidates only): folds x candidates, each candidate's mean Pearson over the leave-one-patient-out
    folds inside that fold's training patients (the fold's choice is ``per_fold["chosen"]``).
    """

    per_fold: pd.DataFrame
    per_gene: pd.DataFrame
    predictions: dict[str, pd.DataFrame] = field(repr=False)
    targets: dict[str, pd.DataFrame] = field(repr=False)
    genes: dict[str, list[str]] = field(repr=False)
    params: dict = field(default_factory=dict)
    selection: pd.DataFrame | None = None

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_fold["pearson_mean"]))

    @property
    def std(self) -> float:
        return float(np.std(self.per_fold["pearson_mean"]))  # ddof=0, as HEST

    def gene(self, name: str) -> pd.Series:
        """Per-fold Pearson r of one gene (NaN where it was not a target)."""
        if name not in self.per_gene.index:
            raise StdistillError(f"gene {name!r} was not a target in any fold")
        return self.per_gene.loc[name].drop(["mean", "std", "n_folds"], errors="ignore")

    def summary(self) -> str:
        return f"Pearson {self.mean:.4f} +- {self.std:.4f} over {len(self.per_fold)} folds"

    def to_uns(self) -> dict:
        """A plain (h5ad-writable) dict: per-fold table, summary, parameters (and, with feature
        candidates, ``selection``: ``folds`` and each candidate's inner scores under ``inner_pearson``)."""
        pf = self.per_fold
        out = {
            "pearson_mean": self.mean,
            "pearson_std": self.std,
            "per_fold": {c: pf[c].astype(str).to_numpy() if pf[c].dtype == object else pf[c].to_numpy()
                         for c in pf.columns},
            "params": {k: (v if isinstance(v, (int, float, str)) else json.dumps(v)) for k, v in self.params.items()},
        }
        if self.selection is not None:
            sel = self.selection
            out["selection"] = {"folds": sel.index.astype(str).to_numpy(),
                                "inner_pearson": {str(c): sel[c].to_numpy() for c in sel.columns}}
        return out


def read_hest_splits(path: str | os.PathLike, adata: ad.AnnData, sample_column: str = "sample_id") -> list[Fold]:
    """HEST split CSVs (``splits/train_{i}.csv`` / ``test_{i}.csv``, column ``sample_id``) as folds.

    ``sample_id`` values must be section ids of ``adata``; patients come from ``obs["patient"]``,
    and a split whose train and test share a patient is refused.
    """
    d = Path(path)
    if not d.is_dir():
        raise StdistillError("HEST splits folder does not exist", d)
    pats = _patients(adata)
    out = []
    i = 0
    while (d / f"train_{i}.csv").is_file() and (d / f"test_{i}.csv").is_file():
        parts = {}
        for part in ("train", "test"):
            f = d / f"{part}_{i}.csv"
            df = pd.read_csv(f)
            if sample_column not in df.columns:
                raise StdistillError(f"no {sample_column!r} column (columns: {list(df.columns)})", f)
            ids = df[sample_column].astype(str).tolist()
            unknown = [s for s in ids if s not in pats]
            if unknown:
                raise StdistillError(f"samples {unknown[:3]} are not sections of the data (obs['section'])", f)
            parts[part] = tuple(ids)
        try:
            out.append(Fold(name=f"split{i}", train=parts["train"], test=parts["test"], patients=pats))
        except StdistillError as e:
            raise StdistillError(f"split {i}: {e}", d) from None
        i += 1
    if not out:
        raise StdistillError("no train_0.csv / test_0.csv pair (HEST layout: splits/train_{i}.csv, test_{i}.csv)", d)
    return out


def _patients(adata: ad.AnnData) -> dict[str, str]:
    for k in (SECTION_KEY, PATIENT_KEY):
        if k not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{k}"]; patient-level folds need it')
    g = adata.obs[[SECTION_KEY, PATIENT_KEY]].astype(str).drop_duplicates()
    if g[SECTION_KEY].duplicated().any():
        raise StdistillError("a section is assigned to two patients")
    return dict(zip(g[SECTION_KEY], g[PATIENT_KEY]))


def _resolve_folds(adata: ad.AnnData, folds) -> list[Fold]:
    pats = _patients(adata)
    if folds is None:
        return _make_folds(pd.Series(pats))
    if isinstance(folds, int):
        return _make_folds(pd.Series(pats), n_splits=folds)
    if isinstance(folds, (str, os.PathLike)):
        return read_hest_splits(folds, adata)
    out = []
    for i, f in enumerate(folds):
        if isinstance(f, Fold):
            check_split(f.train + f.val, f.test, pats)
            out.append(f)
        else:  # (train_sections, test_sections)
            tr, te = f
            out.append(Fold(name=f"fold{i}", train=tuple(tr), test=tuple(te), patients=pats))
    if not out:
        raise StdistillError("folds is empty")
    return out


def _fold_scores(Y_true: np.ndarray, Y_pred: np.ndarray, genes: Sequence[str]) -> tuple[pd.Series, float, int]:
    r = pearson_per_gene(Y_true, Y_pred, genes=list(genes))
    n_nan = int(r.isna().sum())
    return r, float(np.nanmean(r.to_numpy())) if n_nan < len(r) else float("nan"), n_nan


def choose_alpha_cv(
    X: np.ndarray, Y: np.ndarray, groups: np.ndarray, alphas: Sequence[float], latent_dim: int | None = 256, seed: int = 1,
    clip: bool = False, svd_solver: str = "auto", views: np.ndarray | None = None,
) -> tuple[float, pd.Series]:
    """Alpha with the best mean Pearson over leave-one-group-out splits of (X, Y) (groups = patients).

    Scaler and PCA (``latent_dim``, ``seed``, ``svd_solver``, ``clip`` as in :class:`HestRidge`)
    are refitted inside every inner split. ``views`` (n, K, D): extra training rows of the inner
    training spots (:func:`with_views`); the inner validation spots use ``X`` only. Returns
    (alpha, score per alpha); a tie goes to the first of ``alphas``.
    """
    from sklearn.linear_model import Ridge

    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise StdistillError(
            f"alpha='cv' needs at least 2 training patients for inner cross-validation, got {len(uniq)}"
        )
    scores = {a: [] for a in alphas}
    for g in uniq:
        tr, va = groups != g, groups == g
        probe = HestRidge(latent_dim=latent_dim, seed=seed, svd_solver=svd_solver, clip=clip)
        Xtr, Ytr = with_views(X[tr], Y[tr], views[tr] if views is not None else None)
        Ztr = probe._reduce_fit(Xtr)
        Zva = probe.reduce(X[va])
        for a in alphas:
            reg = Ridge(solver="lsqr", alpha=a, fit_intercept=False, random_state=seed, max_iter=1000).fit(Ztr, Ytr)
            scores[a].append(_fold_scores(Y[va], reg.predict(Zva), range(Y.shape[1]))[1])
    s = pd.Series({a: float(np.nanmean(v)) for a, v in scores.items()}, name="inner_pearson")
    return float(s.idxmax()), s


@dataclass
class _Setup:
    """What every fold of :func:`expression` shares."""

    F: np.ndarray  # (n_spots, D) features
    V: np.ndarray | None  # (n_spots, K, D) augmented views (extra training rows), or None
    sec_of: np.ndarray  # section of each spot
    pat_of: np.ndarray  # patient of each spot
    known: set  # sections present in the data
    fixed_genes: list[str] | None  # None: chosen on each fold's training sections
    extra: list[str]  # report-only genes present in the data
    n_genes: int  # genes chosen per fold when fixed_genes is None
    min_frac: float
    layer: str | None  # raw counts: a layer or X
    alpha: float | str
    alphas: Sequence[float]
    probe: dict  # latent_dim, seed, svd_solver, clip of every probe


def _views(adata: ad.AnnData, feature_key: str | Sequence[str]) -> np.ndarray:
    """Augmented views of the features of :func:`_features`, (n_spots, K, D).

    Each key's views are ``obsm[key + "_views"]`` (n_spots, K, D_key), written by
    ``features.extract(views=K)``; a key without them (e.g. a context key) repeats its clean
    features in every view. At least one key must have views, and all the same K.
    """
    keys = _feature_keys(feature_key)
    have = {k: adata.obsm[k + "_views"] for k in keys if k + "_views" in adata.obsm}
    if not have:
        raise StdistillError(f"views=True but there is no obsm[{keys[0] + '_views'!r}]; extract augmented views first "
                             "(stdistill.features.extract(..., views=K))")
    shapes = {k: np.shape(v) for k, v in have.items()}
    if len({sh[1] if len(sh) == 3 else -1 for sh in shapes.values()}) > 1:
        raise StdistillError(f"views of the feature keys differ in number: {shapes}")
    out = []
    for k in keys:
        F = _features(adata, k)
        if k not in have:
            out.append(np.broadcast_to(F[:, None], (len(F), next(iter(shapes.values()))[1], F.shape[1])))
            continue
        V = np.asarray(have[k], dtype=np.float64)
        if V.ndim != 3 or V.shape[0] != adata.n_obs or V.shape[2] != F.shape[1]:
            raise StdistillError(f"obsm[{k + '_views'!r}] must be (n_spots, K, {F.shape[1]}), got {V.shape}")
        if not np.isfinite(V).all():
            raise StdistillError(f"obsm[{k + '_views'!r}] has NaN/inf values; subset to sections with features")
        out.append(V)
    return np.concatenate(out, axis=2)


def _candidates(feature_key: Mapping, views: bool) -> dict[str, tuple[list[str], bool]]:
    """Feature candidates of :func:`expression` as name -> (obsm keys, views), or a one-line error.

    A candidate is a key, a list of keys, or ``{"key": key or list of keys, "views": bool}``
    (``views`` defaults to ``expression``'s ``views``).
    """
    if not feature_key:
        raise StdistillError("feature_key is an empty dict; give at least one candidate, name -> obsm key(s)")
    out = {}
    for name, c in feature_key.items():
        if not isinstance(name, str):
            raise StdistillError(f"feature candidate names must be strings, got {name!r}")
        v = views
        if isinstance(c, Mapping):
            unknown = set(c) - {"key", "views"}
            if "key" not in c or unknown:
                raise StdistillError(f"feature candidate {name!r} must be a key, a list of keys or "
                                     f"{{'key': ..., 'views': bool}}, got {dict(c)!r}")
            c, v = c["key"], bool(c.get("views", views))
        try:
            out[name] = (_feature_keys(c), v)
        except StdistillError as e:
            raise StdistillError(f"feature candidate {name!r}: {e}") from None
    return out


def _present_extra_genes(adata: ad.AnnData, extra_genes: Sequence[str]) -> list[str]:
    """``extra_genes`` that are in the data; the others are left out with a warning (they are report-only)."""
    missing = [x for x in extra_genes if x not in adata.var_names]
    if missing:
        warnings.warn(f"extra_genes not in the data, left out of the report: {missing}", stacklevel=3)
    return [x for x in extra_genes if x in adata.var_names]


def _given_genes(genes: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """``genes=`` of :func:`expression` as a list (read from a file for a path); None stays None."""
    if isinstance(genes, (str, os.PathLike)):
        return read_gene_list(genes)
    return list(genes) if genes is not None else None


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


def _choose(adata: ad.AnnData, setups: dict[str, _Setup], f: Fold) -> pd.Series:
    """Each candidate's mean Pearson over the leave-one-patient-out folds inside ``f``'s training
    (+val) patients, as :func:`_run_fold` scores them (genes and alpha chosen on the inner training
    sections). The test sections of ``f`` are not read."""
    first = next(iter(setups.values()))
    pats = {x: f.patients[x] for x in f.train + f.val if x in first.known}
    n, need = len(set(pats.values())), 3 if first.alpha == "cv" else 2  # alpha="cv" nests one more level
    if n < need:
        raise StdistillError(f"fold {f.name}: choosing among feature candidates needs at least {need} training patients "
                             f"(leave-one-patient-out inside them{', alpha=cv inside those' if need == 3 else ''}), "
                             f"got {n}; give one feature_key or more patients")
    inner = _make_folds(pd.Series(pats, dtype=object), prefix=f"{f.name}/")
    scores = {}
    for name, s in setups.items():
        s_in = replace(s, extra=[])  # report-only genes do not enter the score
        scores[name] = float(pd.Series([_run_fold(adata, s_in, g)[0]["pearson_mean"] for g in inner]).mean())
    return pd.Series(scores, name=f.name, dtype=float)


def _run_chosen_fold(adata: ad.AnnData, setups: dict[str, _Setup], f: Fold) -> tuple[tuple, pd.Series]:
    """One fold with feature candidates: the best inside the training patients (:func:`_choose`;
    ties and NaN: the first listed wins), fitted on all training patients and scored on the test
    patients. Returns :func:`_run_fold`'s tuple, its row with ``chosen`` and ``inner_pearson``, and
    the candidates' inner scores."""
    scores = _choose(adata, setups, f)
    best = str(scores.index[int(np.argmax(scores.fillna(-np.inf).to_numpy()))])
    row, *rest = _run_fold(adata, setups[best], f)
    row.update(chosen=best, inner_pearson=float(scores[best]))
    return (row, *rest), scores


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
    """HEST-Benchmark expression evaluation of the features in ``obsm[feature_key]``.

    Parameters
    ----------
    adata
        Sections (``obs["section"]``, ``obs["patient"]``) with raw counts and (n_spots, D)
        features in ``obsm[feature_key]``.
    feature_key
        An obsm key, or several (e.g. ``["X_enc", "X_enc_ctx"]``: patch and context features),
        concatenated per spot before the probe's scaling and PCA. Or feature **candidates**, a
        dict name -> key, list of keys or ``{"key": ..., "views": bool}`` (e.g. ``{"plain": "X_a",
        "context": ["X_a", "X_a_ctx"]}``): in every fold each candidate is scored by the same
        protocol on leave-one-patient-out folds inside the fold's training patients (genes and
        alpha chosen on the inner training sections; the test patients are not read), the best
        mean Pearson wins (ties: the first listed), and it is fitted on all training patients and
        scored on the test patients. Needs >= 2 training patients per fold (3 with
        ``alpha="cv"``). ``per_fold`` gets ``chosen`` and ``inner_pearson``;
        :attr:`ExpressionBenchResult.selection` holds every candidate's inner score (folds x
        candidates).
    views
        Also train on augmented views: ``obsm[key + "_views"]`` (n_spots, K, D) of each feature
        key (``features.extract(views=K)``) as K extra training rows per training spot (a key
        without views, e.g. a context key, repeats its clean features there). Test spots always
        use the clean features. ``per_fold["n_train_rows"]`` counts the rows. With candidates: the
        default of those that do not say ``"views"``.
    folds
        ``None``: leave-one-patient-out; an int: k patient-level folds; a list of
        :class:`~stdistill.pp.Fold` or of ``(train_sections, test_sections)``; or the path of a
        HEST ``splits/`` folder. Splits that share a patient are refused.
    genes
        ``None``: ``n_genes`` genes chosen HEST's way on each fold's training sections; a list of
        symbols; or the path of a gene list (HEST ``var_50genes.json``).
    latent_dim
        PCA width (256; ``None`` for no PCA).
    alpha
        ``"hest"`` (``100 / (d * n_genes)``), a number, or ``"cv"`` (chosen among ``alphas`` and
        HEST's value by leave-one-patient-out CV on the fold's training patients, with the same
        PCA settings; ``per_fold`` gets ``cv_best_inner_pearson`` and ``alpha_on_edge``, and a
        choice at either end of the grid is also warned about).
    seed
        ``random_state`` of PCA and ridge (HEST's default: 1).
    svd_solver
        PCA solver (``"auto"``: as HEST).
    clip
        Clip test features to their training range before scaling (:class:`HestRidge`; not in
        HEST, off by default): guards the score against a few spots with wild predictions.
    extra_genes
        Genes also predicted and reported in ``per_gene`` (e.g. ``["ERBB2"]`` when it is not one
        of the 50 chosen) by a separate probe with the same settings, but **not** counted in the
        fold's ``pearson_mean`` (the protocol's score). Their per-fold r is in ``per_fold``
        (``r_<gene>``). Genes absent from the data are left out with a warning.
    key_added
        Writes ``adata.uns[key_added]`` (summary, per-fold table, parameters); ``None``: nothing.

    Returns
    -------
    :class:`ExpressionBenchResult` (per-fold table, per-gene table, test predictions).
    """
    if alpha not in ("hest", "cv") and not isinstance(alpha, (int, float)):
        raise StdistillError(f"alpha must be 'hest', 'cv' or a number, got {alpha!r}")
    cands = _candidates(feature_key, views) if isinstance(feature_key, Mapping) else None
    fixed_genes = _given_genes(genes)
    s = _Setup(F=np.empty((adata.n_obs, 0)), V=None, sec_of=adata.obs[SECTION_KEY].astype(str).to_numpy(),
               pat_of=adata.obs[PATIENT_KEY].astype(str).to_numpy(), known=set(_sections(adata)), fixed_genes=fixed_genes,
               extra=_present_extra_genes(adata, extra_genes), n_genes=n_genes, min_frac=min_frac, layer=layer, alpha=alpha,
               alphas=alphas, probe={"latent_dim": latent_dim, "seed": seed, "svd_solver": svd_solver, "clip": clip})
    if cands:
        setups = {name: _candidate_setup(adata, s, name, k, v) for name, (k, v) in cands.items()}
        fk = {name: {"key": k, "views": v} for name, (k, v) in cands.items()}
        n_views = {name: int(x.V.shape[1]) if x.V is not None else 0 for name, x in setups.items()}
    else:
        setups = None
        s = replace(s, F=_features(adata, feature_key), V=_views(adata, feature_key) if views else None)
        fk = feature_key if isinstance(feature_key, str) else list(feature_key)
        n_views = int(s.V.shape[1]) if s.V is not None else 0
    rows, per_gene, preds, targets, chosen, sel = [], {}, {}, {}, {}, []
    for f in _resolve_folds(adata, folds):
        if setups:
            out, scores = _run_chosen_fold(adata, setups, f)
            sel.append(scores)
        else:
            out = _run_fold(adata, s, f)
        row, per_gene[f.name], preds[f.name], targets[f.name], chosen[f.name] = out
        rows.append(row)
    res = ExpressionBenchResult(
        per_fold=pd.DataFrame(rows), per_gene=_per_gene_table(per_gene), predictions=preds, targets=targets, genes=chosen,
        params={"feature_key": fk, "views": n_views, "latent_dim": latent_dim if latent_dim is not None else "none",
                "alpha": alpha if isinstance(alpha, str) else float(alpha), "seed": seed, "n_genes": n_genes,
                "min_frac": min_frac, "clip": bool(clip), "genes": "given" if fixed_genes is not None else "hest_train_folds"},
        selection=pd.DataFrame(sel).rename_axis("fold") if cands else None,
    )
    if key_added:
        adata.uns[key_added] = res.to_uns()
    return res
