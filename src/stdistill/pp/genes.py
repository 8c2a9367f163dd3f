"""Target genes for expression prediction, chosen HEST-Benchmark's way, and their log1p targets.

HEST (``get_k_genes(criteria="var")``): keep genes detected in at least 10% of the spots of
**every** sample, stack the samples' raw counts, ``log1p`` (no library-size normalisation),
``scanpy.pp.highly_variable_genes(n_top_genes=k)`` (seurat flavour), and return the selected genes
in the (alphabetical) order of the common-gene intersection. Choose genes on training sections
only: choosing them on all data leaks test information.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .._errors import StdistillError, require_file
from .._utils import torch_threads_kept
from ..io._section import SECTION_KEY, sections as _sections

__all__ = ["hest_genes", "read_gene_list", "log1p_targets"]


def _csr(adata: ad.AnnData, layer: str | None):
    X = adata.layers[layer] if layer else adata.X
    return X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def hest_genes(
    adata: ad.AnnData,
    n_genes: int = 50,
    *,
    sections: Sequence[str] | None = None,
    min_frac: float = 0.10,
    layer: str | None = None,
    exclude: Sequence[str] = ("BLANK", "Control"),
) -> list[str]:
    """The ``n_genes`` highly variable genes of ``sections``, picked as HEST-Benchmark does.

    Parameters
    ----------
    adata
        Sections with raw counts in ``X`` (or ``layer``) and ``obs["section"]``.
    n_genes
        Number of genes (HEST: 50).
    sections
        Sections to choose on: **the training sections of a fold**. ``None``: all sections.
    min_frac
        A gene must be detected (count > 0) in at least ``ceil(min_frac * n_spots)`` spots of
        every section (HEST: 0.10).
    exclude
        Genes whose name contains one of these substrings are dropped (HEST drops Xenium
        ``BLANK``/``Control`` probes).

    Returns
    -------
    Gene symbols in the alphabetical order of the common genes (HEST's order), not by rank.
    """
    import pandas as pd
    import scanpy as sc

    secs = list(sections) if sections is not None else _sections(adata)
    if not secs:
        raise StdistillError("no sections to choose genes on")
    sec_of = adata.obs[SECTION_KEY].astype(str).to_numpy()
    X = _csr(adata, layer)
    if X.data.size and (X.data.min() < 0 or not np.all(np.mod(X.data, 1) == 0)):
        raise StdistillError("gene selection needs raw integer counts (HEST stacks raw counts, then log1p)")
    keep = np.ones(adata.n_vars, dtype=bool)
    rows = []
    for s in secs:
        m = sec_of == s
        if not m.any():
            raise StdistillError(f"section {s!r} has no spots in this AnnData")
        sub = X[np.flatnonzero(m)]
        detected = np.asarray((sub > 0).sum(0)).ravel()
        keep &= detected >= np.ceil(min_frac * m.sum())
        rows.append(np.flatnonzero(m))
    names = adata.var_names.to_numpy().astype(str)
    common = np.sort(names[keep])  # HEST intersects with np.intersect1d, which sorts
    common = np.array([g for g in common if not any(e in g for e in exclude)], dtype=object)
    if len(common) < n_genes:
        raise StdistillError(
            f"only {len(common)} genes are detected in >= {min_frac:.0%} of the spots of every section "
            f"of {secs}; ask for fewer genes (n_genes={n_genes}) or pass a gene list"
        )
    idx = adata.var_names.get_indexer(common)
    stacked = X[np.concatenate(rows)][:, idx].astype(np.float32)
    st = ad.AnnData(X=stacked, var=pd.DataFrame(index=pd.Index(common.astype(str))))
    sc.pp.log1p(st)
    with torch_threads_kept():
        sc.pp.highly_variable_genes(st, n_top_genes=n_genes, flavor="seurat")
    return st.var_names[st.var["highly_variable"].to_numpy()][:n_genes].tolist()


def read_gene_list(path: str | os.PathLike) -> list[str]:
    """Genes from HEST's ``var_50genes.json`` (``{"genes": [...]}``), a JSON list, or a text file (one per line)."""
    p = Path(path)
    require_file(p, "gene list file")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise StdistillError(f"not valid JSON ({e.msg} at line {e.lineno})", p) from None
        genes = obj.get("genes") if isinstance(obj, dict) else obj
        if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes):
            raise StdistillError('expected {"genes": ["GENE", ...]} (HEST var_50genes.json) or a JSON list of symbols', p)
    else:
        genes = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not genes:
        raise StdistillError("gene list is empty", p)
    if len(set(genes)) != len(genes):
        raise StdistillError("gene list has duplicates", p)
    return list(genes)


def log1p_targets(adata: ad.AnnData, genes: Sequence[str], layer: str | None = None) -> np.ndarray:
    """(n_spots, len(genes)) float32 ``log1p`` of raw counts (HEST's targets; no normalisation).

    Raises if a gene is absent from ``adata`` (a gene list from another dataset).
    """
    pos = adata.var_names.get_indexer(list(genes))
    if (pos < 0).any():
        missing = [g for g, p in zip(genes, pos) if p < 0]
        raise StdistillError(f"{len(missing)} target genes are not in the data (e.g. {missing[:5]}); check the gene list")
    X = _csr(adata, layer)[:, pos]
    return np.log1p(X.toarray().astype(np.float32))
