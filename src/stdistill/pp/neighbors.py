"""Spatial neighbours in micrometres, per section.

Radii are always physical (um), never pixels, so legacy ST (200 um pitch), Visium (100 um)
and cell-level data behave alike. Neighbours never cross sections: two sections of one patient
share pixel frames only by accident.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from .._api import renamed_kwargs
from .._defaults import N_NEIGHBORS  # noqa: F401  (re-exported: pp.neighbors.N_NEIGHBORS)
from .._errors import StdistillError
from .._keys import Key
from ..io._section import SECTION_KEY, SPATIAL_KEY, sections, spatial_um


def _check(adata: ad.AnnData) -> None:
    if SPATIAL_KEY not in adata.obsm:
        raise StdistillError(f'AnnData has no obsm["{SPATIAL_KEY}"] (spot centres in pixels)')
    if SECTION_KEY not in adata.obs:
        raise StdistillError(f'AnnData has no obs["{SECTION_KEY}"]: read it with stdistill.io')


def _check_radius(radius_um: float) -> float:
    if radius_um is None or not np.isfinite(radius_um) or radius_um <= 0:
        raise StdistillError(f"radius_um must be a positive number of micrometres, got {radius_um!r}")
    return float(radius_um)


def radius_graph(adata: ad.AnnData, radius_um: float, include_self: bool = False) -> sp.csr_matrix:
    """(n_obs, n_obs) sparse distances in um between spots of the same section within ``radius_um``.

    Stored entries are distances (um); the self-loop (if ``include_self``) is stored as a tiny
    positive number so that it survives sparse arithmetic.
    """
    _check(adata)
    radius_um = _check_radius(radius_um)
    xy = spatial_um(adata)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    rows, cols, vals = [], [], []
    for s in sections(adata):
        idx = np.flatnonzero(sec == s)
        nn = NearestNeighbors(radius=radius_um).fit(xy[idx])
        g = nn.radius_neighbors_graph(xy[idx], mode="distance", sort_results=False).tocoo()
        keep = g.row != g.col
        rows.append(idx[g.row[keep]])
        cols.append(idx[g.col[keep]])
        vals.append(g.data[keep])
        if include_self:
            rows.append(idx)
            cols.append(idx)
            vals.append(np.full(len(idx), 1e-12))
    n = adata.n_obs
    out = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n), dtype=np.float64
    )
    out.sort_indices()
    return out


def spatial_neighbors(
    adata: ad.AnnData,
    radius_um: float,
    *,
    key_added: str = "spatial",
    copy: bool = False,
) -> ad.AnnData | None:
    """Neighbour graph of spots within ``radius_um`` micrometres, within each section.

    Writes (squidpy/scanpy layout)

    - ``obsp[f"{key_added}_connectivities"]``: (n_obs, n_obs) binary CSR, no self-loops;
    - ``obsp[f"{key_added}_distances"]``: (n_obs, n_obs) CSR of centre distances in **um**;
    - ``uns[f"{key_added}_neighbors"]``: keys of the two and ``params`` (``radius_um``).

    Coordinates are ``obsm["spatial"]`` (pixels) times each section's microns per pixel. The niche
    teacher, student, refinement and baselines read this graph (their ``connectivity_key``) when
    its radius is theirs: see :func:`spot_graph`.
    """
    adata = adata.copy() if copy else adata
    _write_graph(adata, radius_graph(adata, radius_um), float(radius_um), key_added)
    return adata if copy else None


def _write_graph(adata: ad.AnnData, dist: sp.csr_matrix, radius_um: float, key_added: str) -> None:
    """Store a radius graph (distances in um) in squidpy's layout under ``key_added``."""
    conn = dist.copy()
    conn.data = np.ones_like(conn.data, dtype=np.float32)
    adata.obsp[Key.obsp.connectivities(key_added)] = conn.astype(np.float32)
    adata.obsp[Key.obsp.distances(key_added)] = dist
    adata.uns[Key.uns.neighbors(key_added)] = {
        "connectivities_key": Key.obsp.connectivities(key_added),
        "distances_key": Key.obsp.distances(key_added),
        "params": {"radius_um": float(radius_um), "unit": "um", "include_self": False},
    }


def _prefix(connectivity_key: str) -> str:
    """``"spatial"`` of ``"spatial_connectivities"`` (squidpy's ``key_added``)."""
    return connectivity_key.removesuffix("_connectivities")


def _graph_record(adata: ad.AnnData, connectivity_key: str) -> dict | None:
    """The ``uns`` record (squidpy's ``<key_added>_neighbors``) of the graph in ``obsp[connectivity_key]``."""
    rec = adata.uns.get(Key.uns.neighbors(_prefix(connectivity_key)))
    if isinstance(rec, Mapping) and rec.get("connectivities_key", connectivity_key) == connectivity_key:
        return dict(rec)
    return None


def radius_key(connectivity_key: str, radius_um: float) -> str:
    """Where :func:`spot_graph` keeps a graph of ``radius_um`` when ``connectivity_key`` holds one of
    another radius: ``"spatial_265.2um_connectivities"`` (squidpy's layout under that name)."""
    return Key.obsp.connectivities(f"{_prefix(connectivity_key)}_{float(radius_um):.10g}um")


def user_graph(adata: ad.AnnData, connectivity_key: str = Key.obsp.spatial_connectivities) -> sp.csr_matrix | None:
    """``obsp[connectivity_key]`` when the user supplied it (its record gives no radius in um: e.g.
    squidpy's, a Delaunay graph), as distances where its record names them; else None. Used as
    given, with a warning saying so."""
    if connectivity_key not in adata.obsp:
        return None
    rec = _graph_record(adata, connectivity_key) or {}
    if rec.get("params", {}).get("radius_um") is not None:
        return None
    warnings.warn(f'using obsp["{connectivity_key}"] as the spot graph: it records no radius in um (not made by '
                  "stdistill.pp.spatial_neighbors), so its edges are the neighbourhood as given", UserWarning, stacklevel=3)
    return _read_graph(adata, connectivity_key, rec)


def _read_graph(adata: ad.AnnData, key: str, rec: dict) -> sp.csr_matrix:
    dkey = rec.get("distances_key")
    return sp.csr_matrix(adata.obsp[dkey] if dkey in adata.obsp else adata.obsp[key])


def stored_graph(adata: ad.AnnData, radius_um: float | None,
                 connectivity_key: str = Key.obsp.spatial_connectivities) -> sp.csr_matrix | None:
    """The graph :func:`spot_graph` would read, or None when it would build one: a graph the user
    supplied under ``connectivity_key`` (:func:`user_graph`), else the graph of
    :func:`spatial_neighbors` there or under :func:`radius_key` whose recorded radius is
    ``radius_um`` (None: the one under ``connectivity_key``, any radius). Distances in um."""
    g = user_graph(adata, connectivity_key)
    if g is not None:
        return g
    keys = [connectivity_key] + ([radius_key(connectivity_key, radius_um)] if radius_um is not None else [])
    for key in keys:
        rec = _graph_record(adata, key) or {}
        stored = rec.get("params", {}).get("radius_um")
        if key in adata.obsp and stored is not None and (radius_um is None or float(stored) == float(radius_um)):
            return _read_graph(adata, key, rec)
    return None


def spot_graph(adata: ad.AnnData, radius_um: float, *, connectivity_key: str = Key.obsp.spatial_connectivities,
               store: bool = True) -> sp.csr_matrix:
    """The spot graph of ``radius_um`` micrometres (within sections), built at most once per radius.

    Read from ``obsp`` when there (:func:`stored_graph`): the graph of :func:`spatial_neighbors`
    under ``connectivity_key`` when its recorded radius is ``radius_um`` (a graph of another radius
    is never reused), a graph of this radius kept earlier under :func:`radius_key`, or a graph the
    user put under ``connectivity_key`` without a radius in um (used as given, with a warning).
    Otherwise built (:func:`radius_graph`) and, with ``store``, written in squidpy's layout under
    ``connectivity_key`` when that is free, else under :func:`radius_key`, for the next reader
    (subsets of ``adata`` inherit it: a radius graph restricted to some spots is theirs).

    Returns (n_obs, n_obs) CSR distances in um (no self-loops).
    """
    radius_um = _check_radius(radius_um)
    g = stored_graph(adata, radius_um, connectivity_key)
    if g is not None:
        return g
    g = radius_graph(adata, radius_um)
    if store:
        key = connectivity_key if connectivity_key not in adata.obsp else radius_key(connectivity_key, radius_um)
        _write_graph(adata, g, radius_um, _prefix(key))
    return g


class NeighborTokens(NamedTuple):
    """Fixed-size neighbourhoods for token models.

    ``index``: (n_obs, 1 + M) int64 row indices into ``adata``; column 0 is the spot itself,
    then its neighbours by increasing distance; padding is -1.
    ``offset_um``: (n_obs, 1 + M, 2) float32 (dx, dy) of each token from the centre, um (0 at padding).
    ``mask``: (n_obs, 1 + M) bool, True where a token is real.
    """

    index: np.ndarray
    offset_um: np.ndarray
    mask: np.ndarray


def _radius_lists(adata: ad.AnnData, xy: np.ndarray, radius_um: float, valid: np.ndarray) -> list[np.ndarray]:
    """Each spot's valid neighbours within ``radius_um`` (same section, self excluded), nearest first
    (the k-d tree's order among equal distances)."""
    lists: list = [None] * len(xy)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    for s in sections(adata):
        idx = np.flatnonzero(sec == s)
        cand = idx[valid[idx]]
        if len(cand) == 0:
            for i in idx:
                lists[i] = np.empty(0, dtype=np.int64)
            continue
        nn = NearestNeighbors(radius=radius_um).fit(xy[cand])
        _, j = nn.radius_neighbors(xy[idx], sort_results=True)
        for i, ji in zip(idx, j):
            lists[i] = cand[ji][cand[ji] != i]
    return lists


def _graph_lists(graph: sp.spmatrix, xy: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    """Each row's valid neighbours in ``graph`` (self excluded), nearest first (ties: lower row)."""
    g = sp.csr_matrix(graph)
    if g.shape != (len(xy), len(xy)):
        raise StdistillError(f"the spot graph is {g.shape}, the data has {len(xy)} spots")
    lists = []
    for i in range(len(xy)):
        cols = np.sort(g.indices[g.indptr[i]:g.indptr[i + 1]])
        cols = cols[valid[cols] & (cols != i)]
        d = np.linalg.norm(xy[cols] - xy[i], axis=1)
        lists.append(cols[np.argsort(d, kind="stable")])
    return lists


def neighbor_tokens(
    adata: ad.AnnData,
    radius_um: float,
    max_neighbors: int | None = None,
    valid: np.ndarray | None = None,
    graph: sp.spmatrix | None = None,
) -> NeighborTokens:
    """The spot and its neighbours within ``radius_um`` (same section), as fixed-size index arrays.

    Parameters
    ----------
    radius_um
        Neighbourhood radius in micrometres; 0 gives the centre token only.
    max_neighbors
        At most this many neighbours (the nearest); ``None``: the largest count in the data.
    valid
        (n_obs,) bool: only these spots may be neighbours (e.g. spots with image features).
    graph
        (n_obs, n_obs) spot graph whose edges are the neighbourhoods instead of ``radius_um`` (a
        graph the user supplied in ``obsp``); nearest first, equal distances by row.
    """
    _check(adata)
    n = adata.n_obs
    xy = spatial_um(adata)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if graph is not None:
        lists = _graph_lists(graph, xy, valid)
    elif radius_um == 0:
        lists = [np.empty(0, dtype=np.int64)] * n
    else:
        lists = _radius_lists(adata, xy, _check_radius(radius_um), valid)
    m_data = max((len(v) for v in lists), default=0)
    m = m_data if max_neighbors is None else int(max_neighbors)
    if m < 0:
        raise StdistillError(f"max_neighbors must be >= 0, got {max_neighbors}")
    index = np.full((n, 1 + m), -1, dtype=np.int64)
    index[:, 0] = np.arange(n)
    for i, v in enumerate(lists):
        v = v[:m]
        index[i, 1 : 1 + len(v)] = v
    mask = index >= 0
    offset = np.zeros((n, 1 + m, 2), dtype=np.float32)
    safe = np.where(mask, index, 0)
    offset[:] = (xy[safe] - xy[:, None, :]).astype(np.float32)
    offset[~mask] = 0.0
    return NeighborTokens(index=index, offset_um=offset, mask=mask)


def _ring_masks(adj: sp.spmatrix, n_rings: int) -> list[sp.csr_matrix]:
    """Binary (n, n) matrices of spots exactly l hops away (l = 1..n_rings) on graph ``adj``."""
    a = sp.csr_matrix(adj, dtype=np.float64, copy=True)
    a.setdiag(0)
    a.eliminate_zeros()
    a.data[:] = 1.0
    eye = sp.identity(a.shape[0], format="csr")
    reach = eye.copy()  # within l-1 hops
    step = (a + eye).tocsr()
    rings = []
    for _ in range(n_rings):
        nxt = (reach @ step).tocsr()
        nxt.data[:] = 1.0
        ring = (nxt - reach).tocsr()
        ring.eliminate_zeros()
        ring.data[:] = 1.0
        rings.append(ring)
        reach = nxt
    return rings


def aggregate(adj: sp.spmatrix, x: np.ndarray, n_rings: int = 1, mode: str = "concat") -> np.ndarray:
    """Neighbourhood aggregation on arrays: ``adj`` (n, n) graph (any non-zero is an edge),
    ``x`` (n, d) embedding with non-finite rows for missing spots; returns float32 (see
    :func:`aggregate_neighbors` for ``mode``). Missing rows are neither used nor filled."""
    if mode not in ("concat", "mean"):
        raise StdistillError(f'mode must be "concat" or "mean", got {mode!r}')
    if n_rings < 1:
        raise StdistillError(f"n_rings must be >= 1, got {n_rings}")
    x = np.asarray(x, dtype=np.float64)
    ok = np.all(np.isfinite(x), axis=1)
    x0 = np.where(ok[:, None], x, 0.0)
    rings = _ring_masks(adj, n_rings)
    okv = ok.astype(np.float64)
    if mode == "concat":
        parts = [x0]
        for r in rings:
            cnt = r @ okv
            s = r @ x0
            with np.errstate(invalid="ignore", divide="ignore"):
                m = s / cnt[:, None]
            m[cnt == 0] = x0[cnt == 0]
            parts.append(m)
        out = np.hstack(parts)
    else:
        r = sp.identity(len(x), format="csr")
        for ring in rings:
            r = r + ring
        cnt = r @ okv
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (r @ x0) / cnt[:, None]
    out[~ok] = np.nan
    return out.astype(np.float32)


def _graph(adata: ad.AnnData, radius_um: float | None, neighbors_key: str) -> sp.csr_matrix:
    """The graph under ``neighbors_key`` (any radius when ``radius_um`` is None), else
    :func:`spot_graph`'s graph of ``radius_um`` (built here, not stored, when absent)."""
    key = Key.obsp.connectivities(neighbors_key)
    if radius_um is not None:
        return spot_graph(adata, radius_um, connectivity_key=key, store=False)
    g = stored_graph(adata, None, key)
    if g is None:
        raise StdistillError(f'no graph in obsp (uns["{neighbors_key}_neighbors"]); run pp.spatial_neighbors first '
                             "or pass radius_um=")
    return g


@renamed_kwargs(use_rep="feature_key")
def aggregate_neighbors(
    adata: ad.AnnData,
    feature_key: str,
    *,
    radius_um: float | None = None,
    n_rings: int = 1,
    mode: str = "concat",
    neighbors_key: str = "spatial",
    key_added: str | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Neighbourhood-aggregated embeddings (CellCharter-like), within each section.

    The graph defines one hop: the one :func:`spatial_neighbors` stored under
    ``neighbors_key`` (``obsp["spatial_connectivities"]``) when ``radius_um`` is None or equals
    its radius, else a radius graph of ``radius_um`` um built here. Ring ``l`` holds spots
    exactly ``l`` hops away.

    ``mode="concat"``: ``[x, mean(ring 1), ..., mean(ring L)]`` -> (n_obs, d * (1 + n_rings));
    a spot with an empty ring gets its own embedding for that ring.
    ``mode="mean"``: mean of ``x`` over the spot and every spot within ``n_rings`` hops
    -> (n_obs, d) (the "averaged features" baseline). Array core: :func:`aggregate`.

    Writes ``obsm[key_added]`` (default ``f"{feature_key}_agg"``). Rows of ``obsm[feature_key]`` that
    are not finite (e.g. spots without an image) are neither used nor filled (stay NaN). Returns None
    (``copy=True``: a new AnnData). ``feature_key`` was ``use_rep`` (still accepted for one release).
    """
    adata = adata.copy() if copy else adata
    if feature_key not in adata.obsm:
        raise StdistillError(f'AnnData has no obsm["{feature_key}"]; compute the embedding first')
    v = adata.obsm[feature_key]
    x = v.to_numpy() if isinstance(v, pd.DataFrame) else v
    if radius_um is not None:
        _check_radius(radius_um)
    out = aggregate(_graph(adata, radius_um, neighbors_key), x, n_rings, mode)
    adata.obsm[key_added or Key.obsm.aggregated(feature_key)] = out
    return adata if copy else None


def radius_for_neighbors(adata: ad.AnnData, n_neighbors: int, mask: np.ndarray | None = None) -> float:
    """Radius in um within which the median spot has ``n_neighbors`` other spots (same section).

    E.g. 18 neighbours: about 400 um on a legacy ST array (200 um pitch), about 200 um on Visium.
    ``mask`` (n_obs,) bool restricts the spots considered (e.g. those with features).
    """
    _check(adata)
    if n_neighbors < 1:
        raise StdistillError(f"n_neighbors must be >= 1, got {n_neighbors}")
    xy = spatial_um(adata)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    keep = np.ones(adata.n_obs, bool) if mask is None else np.asarray(mask, bool)
    kd = []
    for s in sections(adata):
        pts = xy[(sec == s) & keep]
        k = min(n_neighbors + 1, len(pts))
        if k < 2:
            continue
        d, _ = NearestNeighbors(n_neighbors=k).fit(pts).kneighbors(pts)
        kd.append(d[:, -1])
    if not kd:
        raise StdistillError("every section has a single spot: cannot define spatial neighbourhoods")
    return float(np.median(np.concatenate(kd))) * 1.001
