"""Test-time refinement of niche probabilities on a new section: label-free, H&E only.

The unsupervised baselines (neighbourhood k-means) use the test section's own structure; this
gives the student the same. Two steps, usable alone or chained (``"both"``: mixture, then
propagation), each on one section at a time:

- ``"gmm"``: a Gaussian mixture (one diagonal covariance shared by the components) over the
  section's neighbourhood-averaged, section-standardised patch features (PCA), whose per-spot
  prior is the student's posterior at every EM step, with the likelihood tempered per
  dimension (``weight``); a few EM steps (``em_steps``). Component k is the student's niche k.
  (A free mixture merely initialised from the student drifts to the features' own clusters:
  on the quick simulated run its ARI fell from 0.5-0.6 to about 0.1 in 10 EM steps.)
- ``"propagate"``: label spreading on the spatial graph (spots within ``radius_um``):
  ``P <- (1 - alpha) P0 + alpha W P`` with W the row-normalised adjacency; the student's
  probabilities P0 keep weight ``1 - alpha``.
- ``"none"``: the student's probabilities, copied (so "no refinement" can be chosen like the rest).

Which one (and its ``alpha`` / ``weight``) is chosen on the student's validation patient at fit
time (:meth:`NicheStudent.fit`, ``refine_grid``), never on the test patient.

Reads only ``obsm[probs_key]``, ``obsm["spatial"]``, ``obs["section"]``, the sections' um/px and,
for ``"gmm"``, ``obsm[feature_key]``: never the counts in ``X``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .._errors import StdistillError
from .._keys import Key
from .._niches import write_niches
from ..io._section import SECTION_KEY, sections

REFINE_METHODS = ("none", "propagate", "gmm", "both")


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


def gmm_refine(x: np.ndarray, probs: np.ndarray, n_iter: int = 3, weight: float = 1.0, reg: float = 1e-3) -> np.ndarray:
    """Posteriors (n, K) of a mixture on (n, d) ``x`` whose per-spot prior is the student's ``probs``.

    E step: ``r_ik ∝ probs_ik * N(x_i | mu_k, S) ** (weight / d)`` with one diagonal covariance S
    shared by the components (tied); M step: ``mu_k``, ``S`` from ``r``. The student's
    probabilities stay the prior at every step, so the mixture can only re-weight the student's
    niches towards the section's feature structure, not replace them (a free mixture drifts to
    the features' own clusters within a few EM steps). The likelihood is tempered by ``1 / d``
    (log-likelihood per dimension): ``weight`` is the strength of the section's features against
    the student (0: the student unchanged). Components without weight keep the global mean."""
    if weight < 0:
        raise StdistillError(f"refinement weight must be >= 0, got {weight}")
    x = np.asarray(x, dtype=np.float64)
    p0 = np.clip(np.asarray(probs, dtype=np.float64), 1e-9, None)
    p0 /= p0.sum(1, keepdims=True)
    tau = float(weight) / max(x.shape[1], 1)
    r = p0
    for _ in range(int(n_iter)):
        nk = r.sum(0)
        means = np.where(nk[:, None] > 1e-6, (r.T @ x) / np.maximum(nk, 1e-12)[:, None], x.mean(0))
        var = np.einsum("nk,nkd->d", r, (x[:, None, :] - means[None]) ** 2) / len(x) + reg
        logl = -0.5 * (((x[:, None, :] - means[None]) ** 2) / var).sum(-1)
        z = np.log(p0) + tau * logl
        z -= z.max(1, keepdims=True)
        r = np.exp(z)
        r /= r.sum(1, keepdims=True)
    return r


def _section_features(adata: ad.AnnData, feature_key: str, rows: np.ndarray, adj: sp.csr_matrix, n_pcs: int,
                      seed: int = 0) -> np.ndarray:
    """Standardised, neighbourhood-averaged (spot included), PCA-reduced features of ``rows``."""
    from sklearn.decomposition import PCA

    f = np.asarray(adata.obsm[feature_key], dtype=np.float64)[rows]
    sd_ = f.std(0)
    f = (f - f.mean(0)) / np.where(sd_ < 1e-6, 1.0, sd_)
    a = sp.csr_matrix(adj, dtype=np.float64) + sp.identity(len(rows), format="csr")
    a.data[:] = 1.0
    f = sp.diags(1.0 / np.asarray(a.sum(1)).ravel()) @ a @ f
    k = min(n_pcs, f.shape[1], len(rows) - 1)
    return PCA(k, random_state=seed).fit_transform(f) if 0 < k < f.shape[1] else f


def refine_niches(
    adata: ad.AnnData,
    probs_key: str = Key.obsm.niche_probs,
    *,
    method: str = "propagate",
    feature_key: str | None = None,
    radius_um: float | None = None,
    alpha: float = 0.3,
    n_iter: int = 20,
    weight: float = 1.0,
    em_steps: int = 3,
    n_pcs: int = 20,
    feature_radius_um: float | None = None,
    seed: int = 0,
    key_added: str = Key.obs.niche_refined,
    connectivity_key: str = Key.obsp.spatial_connectivities,
    copy: bool = False,
) -> ad.AnnData | None:
    """Refine a student's niche probabilities with each section's own structure (label-free, H&E only).

    Parameters
    ----------
    adata
        Sections with ``obsm[probs_key]`` (n_obs, K; NaN rows: no prediction), ``obsm["spatial"]``
        (pixels) and ``obs["section"]``.
    method
        ``"propagate"``, ``"gmm"``, ``"both"`` (see the module docstring) or ``"none"`` (the
        student's probabilities copied, so a chosen "no refinement" writes the same keys).
    feature_key
        ``obsm`` patch features for ``"gmm"``/``"both"`` (n_obs, F).
    radius_um
        Neighbourhood radius in micrometres; None: the radius holding the 6 nearest spots of the
        median spot (the first ring of a hexagonal array).
    alpha, n_iter
        Propagation: weight of the neighbours against the spot's own (student) probabilities
        (0: no change) and iterations.
    weight, em_steps
        Mixture: strength of the section's features against the student's prior (per-dimension
        tempered likelihood, see :func:`gmm_refine`; 0: no change) and EM steps.
    n_pcs
        Principal components of the averaged features for the mixture.
    feature_radius_um
        Mixture: radius (um) over which each spot's features are averaged; None: ``radius_um``
        (the first ring). A wider one (e.g. the student's own neighbourhood, as neighbourhood
        k-means uses) gives the mixture the section's tissue-scale structure.
    key_added
        Writes ``obs[key_added]`` (categorical argmax), ``obsm[key_added + "_probs"]`` (n_obs, K)
        and ``uns[key_added]["params"]``; ``obsm[probs_key]`` is left as it was.
    connectivity_key
        ``obsp`` spot graph read when its radius is ``radius_um`` (or ``feature_radius_um``), or when
        the user supplied it (used as given); a graph of another radius is never reused. A graph
        built here is stored for the next call (:func:`stdistill.pp.spot_graph`).
    copy
        Work on a copy and return it; else modify ``adata`` and return None.
    """
    from ..pp.neighbors import radius_for_neighbors

    if method not in REFINE_METHODS:
        raise StdistillError(f"refinement method must be one of {REFINE_METHODS}, got {method!r}")
    if probs_key not in adata.obsm:
        raise StdistillError(f'AnnData has no obsm["{probs_key}"] (niche probabilities); run NicheStudent.predict first')
    if method in ("gmm", "both") and (feature_key is None or feature_key not in adata.obsm):
        raise StdistillError(f'refinement {method!r} needs patch features: obsm["{feature_key}"] is absent')
    adata = adata.copy() if copy else adata
    probs = np.asarray(adata.obsm[probs_key], dtype=np.float64)
    ok = np.all(np.isfinite(probs), axis=1)
    if feature_key is not None and method in ("gmm", "both"):
        ok &= np.all(np.isfinite(np.asarray(adata.obsm[feature_key], dtype=np.float64)), axis=1)
    r = float(radius_um) if radius_um else radius_for_neighbors(adata, 6, mask=ok)
    r_feat = float(feature_radius_um) if feature_radius_um else r
    out = _refine_sections(adata, probs, ok, method, r, r_feat, connectivity_key,
                           dict(alpha=alpha, n_iter=n_iter, weight=weight, em_steps=em_steps, n_pcs=n_pcs, seed=seed,
                                feature_key=feature_key))
    write_niches(adata, out.astype(np.float32), key_added)
    adata.uns[key_added] = {"params": {"probs_key": probs_key, "method": method, "feature_key": feature_key or "",
                                       "radius_um": r, "alpha": float(alpha), "n_iter": int(n_iter), "weight": float(weight),
                                       "em_steps": int(em_steps), "n_pcs": int(n_pcs), "feature_radius_um": r_feat,
                                       "seed": int(seed)}}
    return adata if copy else None


def _refine_sections(adata: ad.AnnData, probs: np.ndarray, ok: np.ndarray, method: str, r: float, r_feat: float,
                     connectivity_key: str, kw: dict) -> np.ndarray:
    """(n_obs, K) refined probabilities (NaN outside ``ok``), one section at a time, on the spot
    graphs of radius ``r`` (propagation) and ``r_feat`` (the mixture's feature averaging)."""
    from ..pp.neighbors import spot_graph

    graph = spot_graph(adata, r, connectivity_key=connectivity_key).tocsr()
    gmm = method in ("gmm", "both")
    fgraph = graph if r_feat == r or not gmm else spot_graph(adata, r_feat, connectivity_key=connectivity_key).tocsr()
    out = np.full(probs.shape, np.nan)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    for s in sections(adata):
        rows = np.flatnonzero((sec == s) & ok)
        if len(rows) == 0:
            continue
        adj = graph[rows][:, rows]
        p = probs[rows] / probs[rows].sum(1, keepdims=True)
        if gmm and len(rows) > probs.shape[1]:
            x = _section_features(adata, kw["feature_key"], rows, adj if fgraph is graph else fgraph[rows][:, rows],
                                  kw["n_pcs"], kw["seed"])
            p = gmm_refine(x, p, n_iter=kw["em_steps"], weight=kw["weight"])
        if method in ("propagate", "both"):
            p = propagate_labels(adj, p, alpha=kw["alpha"], n_iter=kw["n_iter"])
        out[rows] = p
    return out


#: Refinements tried on the validation patient by default (the first wins ties: "none").
DEFAULT_REFINE_GRID: tuple[dict, ...] = (
    {"method": "none"},
    {"method": "propagate", "alpha": 0.3},
    {"method": "gmm", "weight": 1.0},
    {"method": "gmm", "weight": 4.0},
    {"method": "both", "weight": 1.0, "alpha": 0.3},
    {"method": "gmm", "weight": 16.0, "feature_radius_um": "student"},
    {"method": "gmm", "weight": 64.0, "feature_radius_um": "student"},
)
#: ``feature_radius_um="student"`` in a grid entry: the student's own neighbourhood radius
#: (``NicheStudent.info_["radius_um"]``), resolved when the refinement is applied.


def resolve_refinement(entry: dict, student_radius_um: float | None) -> dict:
    """``entry`` as :func:`refine_niches` keywords: ``feature_radius_um="student"`` -> ``student_radius_um``."""
    kw = dict(entry)
    if kw.get("feature_radius_um") == "student":
        if student_radius_um is None:
            raise StdistillError('refinement feature_radius_um="student" needs the student\'s radius (a fitted student)')
        kw["feature_radius_um"] = float(student_radius_um)
    return kw


def choose_refinement(
    adata: ad.AnnData,
    probs: np.ndarray,
    teacher: np.ndarray,
    rows: np.ndarray,
    grid: list[dict] | tuple[dict, ...] = DEFAULT_REFINE_GRID,
    *,
    feature_key: str | None = None,
    radius_um: float | None = None,
    student_radius_um: float | None = None,
    seed: int = 0,
    connectivity_key: str = Key.obsp.spatial_connectivities,
):
    """The refinement of ``grid`` whose argmax agrees best (ARI) with the teacher on validation spots,
    chosen by :func:`stdistill.select.select` (one split: the validation spots).

    ``probs`` (n_obs, K): the student's probabilities from a model that did not train on
    ``rows`` (the validation patient or block); ``teacher`` (n_obs,): the teacher's niche ids;
    ``rows`` (n_obs,) bool. Only the validation spots' features, coordinates, sections and spot
    graphs (``obsp``, restricted to them) are read (never counts). ``student_radius_um`` resolves
    entries with ``feature_radius_um="student"`` (:func:`resolve_refinement`). Ties: a later entry
    wins only when better by more than 1e-9. Returns the chosen dict and the
    :class:`~stdistill.select.Selection` (one ``score`` = validation ARI per entry).
    """
    from ..metrics import ari
    from ..select import Criterion, Split, select

    rows = np.asarray(rows, dtype=bool) & np.all(np.isfinite(probs), axis=1)
    if not rows.any():
        raise StdistillError("choosing a refinement needs validation spots with predictions")
    idx = np.flatnonzero(rows)
    obsm = {Key.obsm.spatial: np.asarray(adata.obsm[Key.obsm.spatial])[rows], "student_probs": np.asarray(probs)[rows]}
    if feature_key is not None and feature_key in adata.obsm:
        obsm[feature_key] = np.asarray(adata.obsm[feature_key])[rows]
    va = ad.AnnData(obs=adata.obs.iloc[idx][[SECTION_KEY]].copy(), obsm=obsm, uns=dict(adata.uns),
                    obsp={k: sp.csr_matrix(g)[idx][:, idx] for k, g in adata.obsp.items()})  # a radius graph's restriction
    truth = np.asarray(teacher)[rows]

    def fit_score(entry: dict, split: Split) -> float:
        kw = resolve_refinement(entry, student_radius_um)
        method = kw.pop("method", "none")
        refine_niches(split.val, "student_probs", method=method, feature_key=feature_key, radius_um=radius_um, seed=seed,
                      key_added="cand", connectivity_key=connectivity_key, **kw)
        return float(ari(truth, split.val.obs["cand"].astype(str).to_numpy()))

    sel = select(va, fit_score, grid, splitter=lambda data: [Split("val", data, data)],
                 criterion=Criterion(metric="val_ari", tol=1e-9, ties="running"))
    return dict(grid[sel.choice["candidate"]]), sel
