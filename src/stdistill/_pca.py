"""Exact PCA streamed over row blocks: never more than one block of the data in memory.

The niche teacher (standardized log-expression) and the niche student (normalised patch
features) both fit their PCA here. One pass accumulates the mean and the (d, d) scatter matrix
in float64 block by block (Chan et al.'s pairwise update, so a large mean loses no precision);
the top eigenvectors of the covariance are the components, with scikit-learn's sign convention
(``svd_flip(u_based_decision=False)``: each component's largest-magnitude entry is positive).
A second pass projects each block into a preallocated (n, k) float32 array. Memory: the (d, d)
scatter matrix plus one block; time: linear in the number of rows (O(n d^2) + O(d^3) once).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from ._errors import StdistillError
from ._utils import env_bytes

#: Rows per dense block (memory of one block: BLOCK_ROWS x columns).
BLOCK_ROWS = 4096

#: Fits whose float32 input (rows x columns) is at most this many bytes use scikit-learn's PCA in
#: memory (the solver, and so the numbers, of earlier releases; e.g. HER2ST, the simulated data);
#: larger ones (from about 33k spots x 2,000 genes or 52k spots x 1,280 features) the streamed exact
#: PCA. Override with ``$STDISTILL_PCA_IN_MEMORY_MB``.
IN_MEMORY_MB = 256

Blocks = Iterable[tuple[np.ndarray, np.ndarray]]
"""Row blocks: (row indices into the full data (b,), values (b, d)) pairs."""


def scatter(blocks: Blocks) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """``(n, mean (d,), scatter (d, d))`` of the rows of ``blocks``, float64, accumulated block by
    block (Chan et al.'s pairwise update); ``(0, None, None)`` for no rows."""
    n, mean, sc = 0, None, None
    for _, x in blocks:
        if len(x) == 0:
            continue
        xb = np.asarray(x, dtype=np.float64)
        mb = xb.mean(0)
        xb -= mb  # float64 copy of one block, centred on its own mean
        sb = xb.T @ xb
        nb = len(xb)
        if mean is None:
            n, mean, sc = nb, mb, sb
            continue
        delta = mb - mean
        tot = n + nb
        sc += sb
        sc += np.outer(delta, delta) * (n * nb / tot)
        mean += delta * (nb / tot)
        n = tot
    return n, mean, sc


def remove_rows(total: tuple, part: tuple) -> tuple[int, np.ndarray, np.ndarray]:
    """:func:`scatter` statistics of the rows of ``total`` that are not in ``part`` (a subset of
    them): the pairwise update run backwards, so a fit on most rows costs a pass over the others."""
    n, mean, sc = total
    n_p, mean_p, sc_p = part
    if n_p == 0:
        return n, mean, sc
    n_k = n - n_p
    mean_k = (n * mean - n_p * mean_p) / n_k
    delta = mean_p - mean_k
    return n_k, mean_k, sc - sc_p - np.outer(delta, delta) * (n_k * n_p / n)


def components(stats: tuple, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and the first ``n_components`` principal axes (k, d), float32, from
    :func:`scatter` statistics (scikit-learn's sign convention)."""
    n, mean, sc = stats
    if mean is None or n < 2:
        raise StdistillError(f"PCA needs at least 2 rows, got {n}")
    d = len(mean)
    k = int(min(n_components, d))
    # top-k eigenpairs of the covariance, ascending -> descending
    _, vecs = scipy.linalg.eigh(sc / (n - 1), subset_by_index=[d - k, d - 1])
    comps = vecs[:, ::-1].T
    top = np.argmax(np.abs(comps), axis=1)
    comps *= np.sign(comps[np.arange(k), top])[:, None]
    return mean.astype(np.float32), np.ascontiguousarray(comps, dtype=np.float32)


def fit_pca(blocks: Blocks, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and the first ``n_components`` principal axes (k, d), both float32, of the rows
    of ``blocks`` (as scikit-learn's ``PCA.mean_`` / ``components_``, same signs)."""
    return components(scatter(blocks), n_components)


def in_memory(n_rows: int, n_cols: int) -> bool:
    """Whether a float32 (n_rows, n_cols) PCA input fits :data:`IN_MEMORY_MB` (``$STDISTILL_PCA_IN_MEMORY_MB``)."""
    return n_rows * n_cols * 4 <= env_bytes("STDISTILL_PCA_IN_MEMORY_MB", IN_MEMORY_MB, 2**20)


def assemble(blocks: Blocks, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_rows, n_cols) float32 array of the blocks' rows in row order, and (n_rows,) bool of the rows filled."""
    x = np.empty((n_rows, n_cols), dtype=np.float32)
    filled = np.zeros(n_rows, dtype=bool)
    for rows, z in blocks:
        x[rows] = z
        filled[rows] = True
    return x, filled


def fit_pca_auto(make_blocks, n_rows: int, n_cols: int, n_components: int, *, seed: int = 0,
                 svd_solver: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and components (k, d), float32: scikit-learn's ``PCA(svd_solver=, random_state=seed)``
    on the rows of ``make_blocks()`` assembled in row order when they fit in :data:`IN_MEMORY_MB`,
    else the streamed exact :func:`fit_pca` (memory: one block plus d x d). ``make_blocks``: a
    zero-argument callable returning fresh :data:`Blocks` over the (n_rows, n_cols) data (rows no
    block names are left out of the fit)."""
    if not in_memory(n_rows, n_cols):
        return fit_pca(make_blocks(), n_components)
    from sklearn.decomposition import PCA

    x, filled = assemble(make_blocks(), n_rows, n_cols)
    pca = PCA(n_components=n_components, random_state=seed, svd_solver=svd_solver).fit(x if filled.all() else x[filled])
    return pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


def project(blocks: Blocks, mean: np.ndarray, components: np.ndarray, n_rows: int) -> np.ndarray:
    """(n_rows, k) float32: each block's rows ``(x - mean) @ components.T`` at their row indices
    (rows no block names are 0). Blocks are centred in place (pass blocks made for this call)."""
    mean = np.asarray(mean, dtype=np.float32)
    comps_t = np.asarray(components, dtype=np.float32).T
    out = np.zeros((n_rows, comps_t.shape[1]), dtype=np.float32)
    for rows, x in blocks:
        xb = np.asarray(x, dtype=np.float32)
        xb -= mean
        out[rows] = xb @ comps_t
    return out


def row_blocks(rows: np.ndarray, block_rows: int = BLOCK_ROWS):
    """``rows`` in consecutive pieces of at most ``block_rows``."""
    for i in range(0, len(rows), block_rows):
        yield rows[i:i + block_rows]


def standardized_blocks(x: np.ndarray | sp.spmatrix, parts, clip: float = 10.0, block_rows: int = BLOCK_ROWS):
    """Yield (rows, (b, d) float32) blocks of ``clip((x[rows] - mu) / sd, -clip, clip)``;
    ``parts``: (rows, mu (d,), sd (d,)) per group. ``x`` dense or sparse (made dense one block
    at a time); only one block exists at a time and ``x`` is not changed."""
    for rows, mu, sd in parts:
        for r in row_blocks(rows, block_rows):
            z = x[r].toarray() if sp.issparse(x) else x[r]  # a new array: r is an index array
            z = z.astype(np.float32, copy=False)
            z -= mu
            z /= sd
            yield r, np.clip(z, -clip, clip, out=z)


def finite_rows(x: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """(n,) bool: rows of ``x`` (n, d) with only finite values (checked by row blocks)."""
    ok = np.empty(len(x), dtype=bool)
    for i in range(0, len(x), block_rows):
        ok[i:i + block_rows] = np.isfinite(x[i:i + block_rows]).all(1)
    return ok
