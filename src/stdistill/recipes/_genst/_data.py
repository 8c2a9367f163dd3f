"""GenST's inputs and outputs as arrays: counts, expression inputs, scaling, code probabilities, codebook usage."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..._errors import StdistillError

__all__ = ["codebook_stats"]


def _counts(adata: ad.AnnData, genes: Sequence[str], layer: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(n, G) float32 raw counts of ``genes`` and (n,) library sizes (all genes; at least 1)."""
    X = adata.layers[layer] if layer else adata.X
    X = X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))
    pos = adata.var_names.get_indexer(list(genes))
    if (pos < 0).any():
        missing = [g for g, p in zip(genes, pos) if p < 0]
        raise StdistillError(f"{len(missing)} genes of the model are not in the data (e.g. {missing[:5]})")
    lib = np.maximum(np.asarray(X.sum(1)).ravel(), 1.0)
    return X[:, pos].toarray().astype(np.float32), lib.astype(np.float32)


def _expr_inputs(C: np.ndarray, lib: np.ndarray) -> np.ndarray:
    """(n, G + 1): log1p counts per 10,000 of the library, then log library size."""
    return np.hstack([np.log1p(C / lib[:, None] * 1e4), np.log(lib)[:, None]]).astype(np.float32)


def _zscore_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and SDs with a floor (a column constant on the training spots keeps a usable scale)."""
    mu, sd = X.mean(0), X.std(0)
    floor = 1e-3 * float(np.median(sd[sd > 0])) if (sd > 0).any() else 1.0
    return mu.astype(np.float32), np.maximum(sd, floor).astype(np.float32)


def codebook_stats(idx: np.ndarray, codebook_size: int, collapse_share: float = 0.1) -> dict:
    """Usage of a codebook from (n,) code indices: codes used, perplexity (exp entropy of the code
    frequencies; K = every code equally used), share of the most used code, and ``collapsed``
    (perplexity below ``collapse_share`` x K or at most 2)."""
    counts = np.bincount(np.asarray(idx, dtype=np.int64), minlength=codebook_size)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    perp = float(np.exp(-(nz * np.log(nz)).sum())) if nz.size else 0.0
    return {"codebook_size": int(codebook_size), "used": int((counts > 0).sum()), "perplexity": perp,
            "top_share": float(p.max()) if p.size else float("nan"),
            "collapsed": bool(perp < max(2.0, collapse_share * codebook_size))}


def _tempered(logits: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """(n, K) code probabilities: softmax(logits / temperature), only the ``top_k`` largest kept."""
    z = logits / temperature
    if top_k is not None and top_k < z.shape[1]:
        kth = np.partition(z, -top_k, axis=1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def _frame(values: np.ndarray, adata: ad.AnnData, genes: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(values.astype(np.float32), index=adata.obs_names.copy(), columns=list(genes))
