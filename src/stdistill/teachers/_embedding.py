"""The niche teacher's expression embedding: log-CP10k, per-group standardisation, gene choice."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._pca import row_blocks


def _log_norm(adata: ad.AnnData, genes: pd.Index | None = None) -> sp.csr_matrix:
    """Sparse (n, len(genes)) float32 log1p(CP10k) of raw counts (library size over all genes);
    genes missing from ``adata`` are 0. ``genes=None``: all genes. One copy of the (selected)
    counts is made and scaled in place."""
    X = adata.X
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    lib = np.asarray(X.sum(1)).ravel().astype(np.float64)
    lib[lib == 0] = 1.0
    if genes is None:
        out = X.astype(np.float32)  # a copy (astype copies by default)
    else:
        pos = adata.var_names.get_indexer(genes)
        have = np.flatnonzero(pos >= 0)
        sub = X[:, pos[have]]  # a new csr matrix, columns in the order of ``genes``
        # the present genes' columns moved to their positions among ``genes`` (an increasing map)
        out = sp.csr_matrix((sub.data.astype(np.float32, copy=False), have[sub.indices], sub.indptr),
                            shape=(adata.n_obs, len(genes)))
    out.data *= np.repeat((1e4 / lib).astype(np.float32), np.diff(out.indptr))
    np.log1p(out.data, out=out.data)
    return out


def _standardize_by(x: np.ndarray | sp.spmatrix, groups: np.ndarray, clip: float = 10.0) -> np.ndarray:
    """(n, d) float32: each column z-scored within each group (constant columns -> 0), clipped to
    +-clip. A sparse ``x`` is made dense one group at a time (no dense copy of the whole input)."""
    out = np.empty(x.shape, dtype=np.float32)
    for g in pd.unique(groups):
        m = groups == g
        xm = x[m].toarray() if sp.issparse(x) else x[m]  # a copy of the group's rows either way
        mu = xm.mean(0)
        sd = xm.std(0)
        sd[sd < 1e-8] = np.inf
        if xm.dtype == np.float32:  # in place: the same float32 numbers, no temporaries
            xm -= mu
            xm /= sd
            out[m] = np.clip(xm, -clip, clip, out=xm)
        else:
            out[m] = np.clip((xm - mu) / sd, -clip, clip)
    return out


def _group_rows(groups: np.ndarray) -> list[np.ndarray]:
    """Row indices of each group, groups in order of first appearance."""
    return [np.flatnonzero(groups == g) for g in pd.unique(groups)]


def _sparse_moments(x: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd (ddof 0) of each column of ``x[rows]`` as float32, computed in float64 from the
    sparse form (two passes over row blocks, never dense); sds below 1e-8 are inf (z-score 0)."""
    d = x.shape[1]
    total = np.zeros(d)
    for r in row_blocks(rows):
        b = x[r]
        total += np.bincount(b.indices, weights=b.data, minlength=d)
    mu = total / max(len(rows), 1)
    ss = np.zeros(d)
    nnz = np.zeros(d)
    for r in row_blocks(rows):
        b = x[r]
        ss += np.bincount(b.indices, weights=(b.data - mu[b.indices]) ** 2, minlength=d)
        nnz += np.bincount(b.indices, minlength=d)
    ss += (len(rows) - nnz) * mu**2  # the implicit zeros
    sd = np.sqrt(ss / max(len(rows), 1)).astype(np.float32)
    sd[sd < 1e-8] = np.inf
    return mu.astype(np.float32), sd


def _select_genes(logx: sp.csr_matrix, genes: pd.Index, groups: np.ndarray, n_top: int, min_frac: float) -> pd.Index:
    """Genes detected in >= ``min_frac`` of spots of every group, ranked by the *median* over
    groups of their within-group variance of log-expression: genes that vary inside every
    section (shared biology) rank above genes that vary in one patient only, and patient-level
    shifts never choose genes. Returns the top ``n_top`` in their original order."""
    ug = pd.unique(groups)
    ok = np.ones(len(genes), dtype=bool)
    var = np.zeros((len(ug), len(genes)))
    for i, g in enumerate(ug):
        m = groups == g
        sub = logx[m]
        n = sub.shape[0]
        det = np.asarray((sub > 0).sum(0)).ravel() / n
        ok &= det >= min_frac
        mu = np.asarray(sub.mean(0)).ravel()
        ex2 = np.asarray(sub.multiply(sub).mean(0)).ravel()
        var[i] = ex2 - mu**2
    score = np.median(var, axis=0)
    if ok.sum() < 10:  # tiny or very sparse data: fall back to genes detected anywhere
        ok = np.asarray((logx > 0).sum(0)).ravel() > 0
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-score[idx], kind="stable")[:n_top]]
    return genes[np.sort(idx)]
