"""Pathway activities per spot: gene sets shipped with the package, a strict GMT reader, scoring.

Shipped gene sets (``src/stdistill/data/genesets``, see its ``SOURCE.md``):

- ``"hallmark"``: the 50 MSigDB Hallmark sets, v7.0 (CC BY 4.0; cite Liberzon et al. 2015 and
  Subramanian et al. 2005). Symbols of 2019: about 1 % of the memberships use symbols renamed since
  (``H2AFX`` -> ``H2AX``, ...), which data on a recent reference lacks.
- ``"progeny"``: PROGENy human model, top 100 signed weights for each of 14 pathways (Apache-2.0;
  cite Schubert et al. 2018).

Gene symbols are matched to ``adata.var_names`` **case-sensitively** (``Tp53`` is not ``TP53``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import StdistillError, require_file
from .._keys import Key

__all__ = ["read_gmt", "genesets", "pathway_scores", "SHIPPED_GENESETS", "PATHWAY_METHODS"]

SHIPPED_GENESETS = {"hallmark": "h.all.v7.0.symbols.gmt", "progeny": "progeny_human_top100.csv"}
PATHWAY_METHODS = ("ulm", "mlm", "aucell", "mean_z")
_DECOUPLER_METHODS = ("ulm", "mlm", "aucell")
_INSTALL_HINT = "pip install 'stdistill[pathways]' (decoupler 2.x, Python >= 3.11)"
_DENSE_BLOCK = 2**24  # values per block when decoupler densifies sparse rows (128 MiB of float64)


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Gene sets of a GMT file: ``{set name: [gene, ...]}`` in file order.

    Each line is ``NAME<TAB>DESCRIPTION<TAB>GENE<TAB>GENE...``. Fields are split on tabs only, so a
    description with spaces (``"Genes up in X"``) never becomes genes (``decoupler.pp.read_gmt``
    splits on any whitespace and does). Empty lines, CRLF line ends, a UTF-8 BOM, trailing tabs and
    spaces around fields are tolerated; a gene listed twice in a set is kept once (first place).

    Raises
    ------
    StdistillError
        One line naming the file (and the line number): missing file, a line with fewer than
        3 fields (name, description, at least one gene), an empty name, or a set name twice.
    """
    p = Path(path)
    require_file(p, "GMT file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise StdistillError(f"GMT file is not UTF-8 text ({e.reason} at byte {e.start})", p) from None
    sets: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        while fields and not fields[-1]:
            fields.pop()
        if len(fields) < 3:
            raise StdistillError(
                f"line {lineno}: expected NAME<TAB>DESCRIPTION<TAB>GENE..., found {len(fields)} "
                f"tab-separated field(s) ({line[:60]!r})", p)
        name = fields[0]
        if not name:
            raise StdistillError(f"line {lineno}: the gene set name (first field) is empty", p)
        if name in sets:
            raise StdistillError(f"line {lineno}: gene set {name!r} already defined at line {first_line[name]}", p)
        sets[name] = list(dict.fromkeys(g for g in fields[2:] if g))
        first_line[name] = lineno
    if not sets:
        raise StdistillError("GMT file has no gene sets", p)
    return sets


def _shipped(filename: str):
    return resources.files("stdistill") / "data" / "genesets" / filename


def _gmt_net(sets: Mapping[str, list[str]]) -> pd.DataFrame:
    rows = [(name, g) for name, genes in sets.items() for g in genes]
    net = pd.DataFrame(rows, columns=["source", "target"])
    net["weight"] = 1.0
    return net


def _read_table(p: Path) -> pd.DataFrame:
    sep = "\t" if p.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    try:
        return pd.read_csv(p, sep=sep, dtype={"source": str, "target": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise StdistillError(f"cannot read the gene-set table ({str(e).splitlines()[0]})", p) from None


def _check_net(net: pd.DataFrame, origin) -> pd.DataFrame:
    """``source``/``target``/``weight`` (float, 1.0 when absent), no missing values, no duplicates."""
    missing = {"source", "target"} - set(net.columns)
    if missing:
        raise StdistillError(f"gene-set table needs columns source, target[, weight]; missing {sorted(missing)} "
                             f"(found {list(net.columns)[:6]})", origin)
    out = net[["source", "target"]].astype(str).copy()
    if net[["source", "target"]].isna().to_numpy().any():
        raise StdistillError("gene-set table has empty source or target cells", origin)
    w = pd.to_numeric(net["weight"], errors="coerce") if "weight" in net.columns else pd.Series(1.0, index=net.index)
    if not np.isfinite(w.to_numpy(dtype=float)).all():
        raise StdistillError("gene-set table has missing or non-numeric weights", origin)
    out["weight"] = w.to_numpy(dtype=float)
    dup = out.duplicated(["source", "target"])
    if dup.any():
        s, t = out.loc[dup, ["source", "target"]].iloc[0]
        raise StdistillError(f"gene-set table has {int(dup.sum())} duplicated (source, target) rows, "
                             f"e.g. ({s!r}, {t!r})", origin)
    if out.empty:
        raise StdistillError("gene-set table is empty", origin)
    return out.reset_index(drop=True)


def genesets(name: str | os.PathLike | pd.DataFrame = "hallmark") -> pd.DataFrame:
    """Gene sets as a long table, the ``net`` layout decoupler uses.

    Parameters
    ----------
    name
        ``"hallmark"`` (50 MSigDB Hallmark sets v7.0, weight 1.0), ``"progeny"`` (14 PROGENy
        pathways x 100 genes, signed weights), a ``.gmt`` path (weight 1.0), a CSV/TSV path
        (``.tsv``/``.tab``/``.txt`` are tab-separated) with columns ``source``, ``target`` and
        optionally ``weight``, or such a DataFrame.

    Returns
    -------
    DataFrame with columns ``source`` (set/pathway name, str), ``target`` (gene symbol, str) and
    ``weight`` (float64), one row per membership, sets in file order.
    """
    return _net(name)


def _net(name) -> pd.DataFrame:
    if isinstance(name, pd.DataFrame):
        return _check_net(name, "gene-set DataFrame")
    if isinstance(name, str) and name in SHIPPED_GENESETS:
        with resources.as_file(_shipped(SHIPPED_GENESETS[name])) as p:
            return _net(p)
    p = Path(name)
    if not p.is_file():
        raise StdistillError(f"not a shipped gene-set collection ({', '.join(SHIPPED_GENESETS)}) "
                             "nor an existing .gmt/.csv/.tsv file", p)
    if p.suffix.lower() == ".gmt":
        return _check_net(_gmt_net(read_gmt(p)), p)
    return _check_net(_read_table(p), p)


def _expression(adata: ad.AnnData, layer: str | None, normalize: bool):
    """The (spots x genes) matrix to score, float64, sparse kept sparse; never the user's object."""
    import scanpy as sc

    if layer is not None and layer not in adata.layers:
        raise StdistillError(f"layer {layer!r} is not in adata.layers ({list(adata.layers)})")
    X = adata.layers[layer] if layer is not None else adata.X
    X = X.tocsr() if sp.issparse(X) else np.asarray(X)
    if not normalize:
        return X
    vals = X.data if sp.issparse(X) else X
    if vals.size and (not np.isfinite(vals).all() or vals.min() < 0):
        raise StdistillError("normalize=True needs raw counts, but the matrix has negative or non-finite values; "
                             "pass normalize=False for values already normalised")
    if vals.size and not np.all(np.mod(vals, 1) == 0):
        warnings.warn("normalize=True expects raw counts but the matrix has non-integer values; "
                      "pass normalize=False if it is already normalised", UserWarning, stacklevel=3)
    tmp = ad.AnnData(X=X.astype(np.float64))  # astype copies: the user's matrix is untouched
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return tmp.X


def _match(net: pd.DataFrame, var_names: pd.Index, X, min_genes: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep memberships of genes in the data and detected (non-zero somewhere); drop small sets."""
    if not var_names.is_unique:
        raise StdistillError("adata.var_names are not unique; run adata.var_names_make_unique() first")
    pos = var_names.get_indexer(net["target"])
    genes = np.unique(pos[pos >= 0])
    detected = np.zeros(len(var_names), dtype=bool)
    if genes.size:
        sub = X[:, genes]
        nnz = sub.getnnz(axis=0) if sp.issparse(sub) else np.count_nonzero(sub, axis=0)
        detected[genes] = np.asarray(nnz).ravel() > 0
    kept = net[(pos >= 0) & detected[np.maximum(pos, 0)]]
    counts = kept["source"].value_counts()
    order = list(dict.fromkeys(net["source"]))
    n_genes = {s: int(counts.get(s, 0)) for s in order}
    small = [s for s in order if n_genes[s] < min_genes]
    if len(small) == len(order):
        best = max(n_genes.values())
        raise StdistillError(f"no gene set has >= {min_genes} of its genes detected in the data (at most {best}); "
                             "gene symbols are matched case-sensitively: check var_names are HGNC symbols")
    if small:
        warnings.warn(f"dropped {len(small)} of {len(order)} gene sets with fewer than {min_genes} genes "
                      f"detected in the data (e.g. {small[:3]})", UserWarning, stacklevel=3)
    keep = [s for s in order if n_genes[s] >= min_genes]
    return kept[kept["source"].isin(keep)].reset_index(drop=True), {s: n_genes[s] for s in keep}


def _mean_z(X, var_names: pd.Index, net: pd.DataFrame) -> np.ndarray:
    """Weighted mean of per-gene z-scores: ``Z[:, genes] @ W / sum|W|``, without densifying ``X``.

    ``Z = (x - mean) / sd`` per gene over spots (population sd, ddof=0). Since the z-score is affine,
    ``Z @ W = X @ (W / sd) - (mean / sd) @ W``, computed on the member columns only.
    """
    sources = list(dict.fromkeys(net["source"]))
    genes = list(dict.fromkeys(net["target"]))
    W = net.pivot(index="target", columns="source", values="weight").reindex(index=genes, columns=sources)
    W = W.fillna(0.0).to_numpy(dtype=np.float64)
    Xm = X[:, var_names.get_indexer(genes)]
    if sp.issparse(Xm):
        mean = np.asarray(Xm.mean(axis=0)).ravel()
        sq = np.asarray(Xm.multiply(Xm).mean(axis=0)).ravel()
    else:
        Xm = np.asarray(Xm, dtype=np.float64)
        mean, sq = Xm.mean(axis=0), (Xm * Xm).mean(axis=0)
    sd = np.sqrt(np.clip(sq - mean * mean, 0.0, None))
    inv = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    Ws = W * inv[:, None]
    raw = np.asarray(Xm @ Ws) - (mean @ Ws)[None, :]
    return raw / np.abs(W).sum(axis=0)[None, :]


def _import_decoupler():
    try:
        import decoupler
    except ImportError as e:
        raise StdistillError(f"methods {list(_DECOUPLER_METHODS)} need decoupler ({e}); {_INSTALL_HINT}, "
                             "or use method='mean_z'") from None
    return decoupler


def _decoupler_scores(X, obs_names: pd.Index, var_names: pd.Index, net: pd.DataFrame,
                      method: str, min_genes: int) -> pd.DataFrame:
    """``decoupler.mt.<method>`` on a temporary AnnData; spots decoupler drops (no counts) get NaN."""
    dc = _import_decoupler()
    tmp = ad.AnnData(X=X, obs=pd.DataFrame(index=obs_names.astype(str)), var=pd.DataFrame(index=var_names.astype(str)))
    bsize = int(max(1, min(250_000, _DENSE_BLOCK // max(1, tmp.n_vars))))
    res = getattr(dc.mt, method)(tmp, net, tmin=min_genes, bsize=bsize, verbose=False)
    es = (tmp if res is None else res).obsm[f"score_{method}"]
    return pd.DataFrame(es).reindex(index=tmp.obs_names)


def _standardize(scores: pd.DataFrame, groups: pd.Series) -> pd.DataFrame:
    """z-score each column within each group (population sd); constant columns in a group -> 0."""
    g = scores.groupby(groups.to_numpy(), sort=False, observed=True)
    centred = scores - g.transform("mean")
    sd = g.transform("std", ddof=0)
    return centred.div(sd.where(sd > 0)).where(~(sd <= 0), 0.0).where(scores.notna())


def _check_args(adata, method: str, standardize, min_genes: int, section_key: str) -> None:
    if not isinstance(adata, ad.AnnData):
        raise StdistillError(f"expected an AnnData, got {type(adata).__name__}")
    if method not in PATHWAY_METHODS:
        raise StdistillError(f"unknown method {method!r}; choose one of {list(PATHWAY_METHODS)}")
    if standardize not in (None, "section"):
        raise StdistillError(f"standardize must be None or 'section', got {standardize!r}")
    if standardize == "section" and section_key not in adata.obs:
        raise StdistillError(f"standardize='section' needs adata.obs[{section_key!r}] (the section of each spot)")
    if not isinstance(min_genes, (int, np.integer)) or min_genes < 1:
        raise StdistillError(f"min_genes must be a positive integer, got {min_genes!r}")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise StdistillError(f"AnnData is empty ({adata.n_obs} spots x {adata.n_vars} genes)")
    if method in _DECOUPLER_METHODS:
        _import_decoupler()  # fail before any work


def pathway_scores(
    adata: ad.AnnData,
    genesets: str | os.PathLike | pd.DataFrame = "hallmark",
    method: str = "ulm",
    *,
    layer: str | None = None,
    normalize: bool = True,
    standardize: str | None = None,
    min_genes: int = 5,
    section_key: str = Key.obs.section,
    key_added: str = Key.obsm.pathway_scores,
    copy: bool = False,
) -> ad.AnnData | None:
    """Pathway (gene-set) activity of every spot.

    Parameters
    ----------
    adata
        Spots x genes, ``var_names`` gene symbols (matched to the sets **case-sensitively**).
    genesets
        ``"hallmark"``, ``"progeny"``, a ``.gmt``/CSV/TSV path or a source/target[/weight]
        DataFrame; see :func:`genesets`.
    method
        ``"ulm"`` / ``"mlm"`` (decoupler's univariate / multivariate linear model: t-value of the
        set's weights regressed against all genes of the spot; weights used), ``"aucell"``
        (decoupler's AUCell, rank-based, in [0, 1], weights ignored) or ``"mean_z"`` (no extra
        dependency: mean over member genes of the per-gene z-score across spots; with signed weights
        ``sum(w * z) / sum(|w|)``). The decoupler methods need ``pip install 'stdistill[pathways]'``.
    layer
        Read the matrix from ``adata.layers[layer]`` instead of ``X``.
    normalize
        ``True``: the matrix holds raw counts; score ``log1p`` of counts per 10,000 (scanpy
        ``normalize_total(target_sum=1e4)`` + ``log1p`` on a copy). ``False``: score the values as
        they are (already normalised).
    standardize
        ``None`` or ``"section"``: z-score each pathway within each ``obs[section_key]``
        (population sd), removing section/patient offsets.
    min_genes
        Sets with fewer member genes detected in the data (present in ``var_names`` and non-zero in
        at least one spot) are dropped with a warning; decoupler's ``tmin``.
    key_added
        Where the result goes (below).
    copy
        Return a modified copy instead of writing into ``adata``.

    Returns
    -------
    ``None`` (in place) or, with ``copy=True``, a new AnnData. Written:
    ``obsm[key_added]``: DataFrame (n_spots x n_sets), index ``obs_names``, columns set names in
    file order, float64: t-values (ulm/mlm), AUC (aucell) or z units (mean_z, or after
    standardisation). Spots with no counts are NaN.
    ``uns[key_added]``: ``{"params": {...}, "n_genes": {set: detected member genes}}``.
    The input matrix is never modified.
    """
    _check_args(adata, method, standardize, min_genes, section_key)
    net = _net(genesets)
    X = _expression(adata, layer, normalize)
    net, n_genes = _match(net, adata.var_names, X, min_genes)
    if method == "mean_z":
        vals = _mean_z(X, adata.var_names, net)
        nnz = X.getnnz(axis=1) if sp.issparse(X) else np.count_nonzero(X, axis=1)
        vals[np.asarray(nnz).ravel() == 0] = np.nan  # as decoupler: a spot without counts has no score
        scores = pd.DataFrame(vals, index=adata.obs_names.copy(), columns=list(n_genes))
    else:
        es = _decoupler_scores(X, adata.obs_names, adata.var_names, net, method, min_genes)
        scores = pd.DataFrame(es.reindex(columns=list(n_genes)).to_numpy(dtype=np.float64),
                              index=adata.obs_names.copy(), columns=list(n_genes))
    if standardize == "section":
        scores = _standardize(scores, adata.obs[section_key].astype(str))
    out = adata.copy() if copy else adata
    out.obsm[key_added] = scores
    params = {"genesets": genesets if isinstance(genesets, str) else
              ("<DataFrame>" if isinstance(genesets, pd.DataFrame) else str(genesets)),
              "method": method, "layer": layer, "normalize": bool(normalize), "standardize": standardize,
              "min_genes": int(min_genes), "section_key": section_key}
    out.uns[key_added] = {"params": {k: v for k, v in params.items() if v is not None}, "n_genes": n_genes}
    return out if copy else None
