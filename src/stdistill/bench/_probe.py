"""HEST's linear probe (:class:`HestRidge`: StandardScaler -> PCA -> Ridge), its penalty, augmented
views as extra training rows, per-gene scores and the leave-one-patient-out choice of alpha."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .._errors import StdistillError
from ..bundle import Bundled, bundle_record, check_shapes
from .._json import jsonable
from ..metrics import pearson_per_gene

__all__ = ["DEFAULT_ALPHAS", "HestRidge", "choose_alpha_cv", "hest_alpha", "with_views"]

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
