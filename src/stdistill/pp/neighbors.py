"""Spatial neighbours in micrometres, per section.

Radii are always physical (um), never pixels, so legacy ST (200 um pitch), Visium (100 um)
and cell-level data behave alike. Neighbours never cross sections: two sections of one patient
share pixel frames only by accident.
"""

from __future__ import annotations

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

    Coordinates are ``obsm["spatial"]`` (pixels) times each section's microns per pixel.
    """
    adata = adata.copy() if copy else adata
    dist = radius_graph(adata, radius_um)
    conn = dist.copy()
    conn.data = np.ones_like(conn.data, dtype=np.float32)
    conn = conn.astype(np.float32)
    adata.obsp[Key.obsp.connectivities(key_added)] = conn
    adata.obsp[Key.obsp.distances(key_added)] = dist
    adata.uns[Key.uns.neighbors(key_added)] = {
        "connectivities_key": Key.obsp.connectivities(key_added),
        "distances_key": Key.obsp.distances(key_added),
        "params": {"radius_um": float(radius_um), "unit": "um", "include_self": False},
    }
    return adata if copy else None


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


def neighbor_tokens(
    adata: ad.AnnData,
    radius_um: float,
    max_neighbors: int | None = None,
    valid: np.ndarray | None = None,
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
    """
    _check(adata)
    n = adata.n_obs
    xy = spatial_um(adata)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if radius_um == 0:
        lists = [np.empty(0, dtype=np.int64)] * n
        dists = [np.empty(0)] * n
    else:
        radius_um = _check_radius(radius_um)
        lists, dists = [None] * n, [None] * n
        sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
        for s in sections(adata):
            idx = np.flatnonzero(sec == s)
            cand = idx[valid[idx]]
            if len(cand) == 0:
                for i in idx:
                    lists[i], dists[i] = np.empty(0, dtype=np.int64), np.empty(0)
                continue
            nn = NearestNeighbors(radius=radius_um).fit(xy[cand])
            d, j = nn.radius_neighbors(xy[idx], sort_results=True)
            for i, di, ji in zip(idx, d, j):
                keep = cand[ji] != i
                lists[i], dists[i] = cand[ji][keep], di[keep]
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
    """The graph stored by :func:`spatial_neighbors` under ``neighbors_key`` when its radius
    matches (or ``radius_um`` is None); otherwise a new radius graph."""
    info = adata.uns.get(Key.uns.neighbors(neighbors_key))
    if info is not None:
        stored = info.get("params", {}).get("radius_um")
        key = info.get("connectivities_key", Key.obsp.connectivities(neighbors_key))
        if key in adata.obsp and (radius_um is None or (stored is not None and float(stored) == float(radius_um))):
            return adata.obsp[key]
    if radius_um is None:
        raise StdistillError(f'no graph in obsp (uns["{neighbors_key}_neighbors"]); run pp.spatial_neighbors first '
                             "or pass radius_um=")
    return radius_graph(adata, radius_um)


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
