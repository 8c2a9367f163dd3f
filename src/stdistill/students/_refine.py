"""Test-time refinement of niche probabilities on a new section: label-free, H&E only.

The unsupervised baselines (neighbourhood k-means) use the test section's own structure; this
gives the student the same. Two steps, usable alone or chained (``"both"``: mixture, then
propagation), each on one section at a time:

- ``"gmm"``: a diagonal Gaussian mixture over the section's neighbourhood-averaged,
  section-standardised patch features (PCA), initialised from the student's posteriors
  (weights, means and variances weighted by them) and run for a few EM steps; its posteriors
  replace the student's. Component k starts as the student's niche k, so identities are kept.
- ``"propagate"``: label spreading on the spatial graph (spots within ``radius_um``):
  ``P <- (1 - alpha) P0 + alpha W P`` with W the row-normalised adjacency.

Reads only ``obsm[probs_key]``, ``obsm["spatial"]``, ``obs["section"]``, the sections' um/px and,
for ``"gmm"``, ``obsm[feature_key]``: never the counts in ``X``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .._errors import StdistillError
from ..io._section import SECTION_KEY, sections

REFINE_METHODS = ("propagate", "gmm", "both")


def propagate_labels(adj: sp.spmatrix, probs: np.ndarray, alpha: float = 0.5, n_iter: int = 20) -> np.ndarray:
    """Label spreading of (n, K) probabilities over an (n, n) adjacency; rows sum to 1.

    Spots without neighbours keep their probabilities."""
    if not 0 <= alpha < 1:
        raise StdistillError(f"alpha must be in [0, 1), got {alpha}")
    a = sp.csr_matrix(adj, dtype=np.float64)
    a.data[:] = 1.0
    deg = np.asarray(a.sum(1)).ravel()
    w = sp.diags(np.where(deg > 0, 1.0 / np.maximum(deg, 1), 0.0)) @ a
    p0 = np.asarray(probs, dtype=np.float64)
    p = p0.copy()
    alone = deg == 0
    for _ in range(int(n_iter)):
        p = (1 - alpha) * p0 + alpha * (w @ p)
        p[alone] = p0[alone]
    return p / p.sum(1, keepdims=True)


def gmm_refine(x: np.ndarray, probs: np.ndarray, n_iter: int = 10, reg: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Posteriors (n, K) of a diagonal Gaussian mixture on (n, d) ``x``, initialised from ``probs``.

    Components with (near) no weight in ``probs`` keep a tiny weight and the global mean."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, dtype=np.float64)
    r = np.asarray(probs, dtype=np.float64) + 1e-6
    nk = r.sum(0)
    means = (r.T @ x) / nk[:, None]
    var = (r.T @ x**2) / nk[:, None] - means**2 + reg
    gm = GaussianMixture(probs.shape[1], covariance_type="diag", weights_init=nk / nk.sum(), means_init=means,
                         precisions_init=1.0 / np.maximum(var, reg), max_iter=int(n_iter), reg_covar=reg,
                         random_state=seed, tol=1e-4)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a few EM steps on purpose
        gm.fit(x)
    return gm.predict_proba(x)


def _section_features(adata: ad.AnnData, feature_key: str, rows: np.ndarray, adj: sp.csr_matrix, n_pcs: int) -> np.ndarray:
    """Standardised, neighbourhood-averaged (spot included), PCA-reduced features of ``rows``."""
    from sklearn.decomposition import PCA

    f = np.asarray(adata.obsm[feature_key], dtype=np.float64)[rows]
    sd_ = f.std(0)
    f = (f - f.mean(0)) / np.where(sd_ < 1e-6, 1.0, sd_)
    a = sp.csr_matrix(adj, dtype=np.float64) + sp.identity(len(rows), format="csr")
    a.data[:] = 1.0
    f = sp.diags(1.0 / np.asarray(a.sum(1)).ravel()) @ a @ f
    k = min(n_pcs, f.shape[1], len(rows) - 1)
    return PCA(k, random_state=0).fit_transform(f) if 0 < k < f.shape[1] else f


def refine_niches(
    adata: ad.AnnData,
    probs_key: str = "niche_probs",
    *,
    method: str = "propagate",
    feature_key: str | None = None,
    radius_um: float | None = None,
    alpha: float = 0.5,
    n_iter: int = 20,
    n_pcs: int = 20,
    seed: int = 0,
    key_added: str = "niche_refined",
    copy: bool = False,
) -> ad.AnnData | None:
    """Refine a student's niche probabilities with each section's own structure (label-free, H&E only).

    Parameters
    ----------
    adata
        Sections with ``obsm[probs_key]`` (n_obs, K; NaN rows: no prediction), ``obsm["spatial"]``
        (pixels) and ``obs["section"]``.
    method
        ``"propagate"``, ``"gmm"`` or ``"both"`` (see the module docstring).
    feature_key
        ``obsm`` patch features for ``"gmm"``/``"both"`` (n_obs, F).
    radius_um
        Neighbourhood radius in micrometres; None: the radius holding the 6 nearest spots of the
        median spot (the first ring of a hexagonal array).
    alpha, n_iter
        Propagation strength (0: no change) and iterations (EM steps for ``"gmm"``: ``n_iter // 2``).
    n_pcs
        Principal components of the averaged features for the mixture.
    key_added
        Writes ``obs[key_added]`` (categorical argmax), ``obsm[key_added + "_probs"]`` (n_obs, K)
        and ``uns[key_added]["params"]``; ``obsm[probs_key]`` is left as it was.
    copy
        Work on a copy and return it; else modify ``adata`` and return None.
    """
    from ..pp.neighbors import radius_for_neighbors, radius_graph
    from ..teachers.niche import write_niches

    if method not in REFINE_METHODS:
        raise StdistillError(f"refinement method must be one of {REFINE_METHODS}, got {method!r}")
    if probs_key not in adata.obsm:
        raise StdistillError(f'AnnData has no obsm["{probs_key}"] (niche probabilities); run NicheStudent.predict first')
    if method != "propagate" and (feature_key is None or feature_key not in adata.obsm):
        raise StdistillError(f'refinement {method!r} needs patch features: obsm["{feature_key}"] is absent')
    adata = adata.copy() if copy else adata
    probs = np.asarray(adata.obsm[probs_key], dtype=np.float64)
    ok = np.all(np.isfinite(probs), axis=1)
    if feature_key is not None and method != "propagate":
        ok &= np.all(np.isfinite(np.asarray(adata.obsm[feature_key], dtype=np.float64)), axis=1)
    r = float(radius_um) if radius_um else radius_for_neighbors(adata, 6, mask=ok)
    graph = radius_graph(adata, r).tocsr()
    out = np.full(probs.shape, np.nan)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    for s in sections(adata):
        rows = np.flatnonzero((sec == s) & ok)
        if len(rows) == 0:
            continue
        adj = graph[rows][:, rows]
        p = probs[rows] / probs[rows].sum(1, keepdims=True)
        if method in ("gmm", "both") and len(rows) > probs.shape[1]:
            p = gmm_refine(_section_features(adata, feature_key, rows, adj, n_pcs), p, n_iter=max(1, n_iter // 2), seed=seed)
        if method in ("propagate", "both"):
            p = propagate_labels(adj, p, alpha=alpha, n_iter=n_iter)
        out[rows] = p
    write_niches(adata, out.astype(np.float32), key_added)
    adata.uns[key_added] = {"params": {"probs_key": probs_key, "method": method, "feature_key": feature_key or "",
                                       "radius_um": r, "alpha": float(alpha), "n_iter": int(n_iter), "n_pcs": int(n_pcs),
                                       "seed": int(seed)}}
    return adata if copy else None
