"""Niche labels on AnnData, shared by teachers, students, recipes and slide outputs: niches
written from soft probabilities, read back as integer ids, and named by marker genes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from ._errors import StdistillError
from ._keys import Key


def write_niches(adata: ad.AnnData, probs: np.ndarray, key_added: str = Key.obs.niche) -> None:
    """``obsm[f"{key_added}_probs"]`` = probs (n_obs, K); ``obs[key_added]`` = categorical argmax "0".."K-1".

    Rows of ``probs`` that are not finite give a missing niche (NaN category)."""
    probs = np.asarray(probs, dtype=np.float32)
    ok = np.all(np.isfinite(probs), axis=1)
    codes = np.where(ok, np.nan_to_num(probs, nan=-1).argmax(1), -1)
    adata.obsm[Key.obsm.probs(key_added)] = probs
    adata.obs[key_added] = pd.Categorical.from_codes(codes, categories=[str(i) for i in range(probs.shape[1])])


def niche_codes(adata: ad.AnnData, key: str) -> np.ndarray:
    """Integer niche ids (n_obs,) of ``obs[key]`` written by :func:`write_niches` (-1 = missing)."""
    if key not in adata.obs:
        raise StdistillError(f'AnnData has no obs["{key}"] (niches)')
    c = adata.obs[key]
    if isinstance(c.dtype, pd.CategoricalDtype):
        cats = np.asarray(c.cat.categories).astype(int)
        codes = c.cat.codes.to_numpy()
        return np.where(codes >= 0, cats[np.maximum(codes, 0)], -1)
    return pd.to_numeric(c, errors="coerce").fillna(-1).astype(int).to_numpy()


def niche_names(adata: ad.AnnData, key: str = Key.obs.niche, n_genes: int = 3) -> list[str] | None:
    """Niche labels ``"<id>: GENE1/GENE2/GENE3"`` from the teacher's spots: the genes whose mean
    log1p(counts per 10k) in the niche exceeds the other spots' the most. ``None`` without genes
    or without ``obs[key]``. The niche number is kept first so maps and tables stay comparable."""
    import scipy.sparse as sp

    if key not in adata.obs or adata.n_vars == 0:
        return None
    lab = adata.obs[key]
    cats = [str(c) for c in (lab.cat.categories if hasattr(lab, "cat") else sorted(lab.dropna().unique()))]
    X = adata.X.tocsr() if sp.issparse(adata.X) else sp.csr_matrix(np.asarray(adata.X))
    tot = np.asarray(X.sum(1)).ravel()
    tot[tot == 0] = 1
    L = sp.diags(1e4 / tot) @ X
    L.data = np.log1p(L.data)
    lab = lab.astype(str).to_numpy()
    names = []
    for c in cats:
        m = lab == c
        if not m.any() or m.all():
            names.append(c)
            continue
        diff = np.asarray(L[m].mean(0)).ravel() - np.asarray(L[~m].mean(0)).ravel()
        top = np.argsort(-diff, kind="stable")[:n_genes]
        names.append(f"{c}: " + "/".join(str(adata.var_names[i]) for i in top))
    return names
