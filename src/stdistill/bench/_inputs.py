"""Inputs of :func:`stdistill.bench.expression`: features (several keys side by side), augmented
views, feature candidates, target genes, and the settings every fold shares."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np

from .._errors import StdistillError
from ..features._matrix import feature_keys as _feature_keys
from ..features._matrix import feature_matrix as _features
from ..pp.genes import read_gene_list


@dataclass
class _Setup:
    """What every fold of :func:`expression` shares."""

    F: np.ndarray  # (n_spots, D) features
    V: np.ndarray | None  # (n_spots, K, D) augmented views (extra training rows), or None
    sec_of: np.ndarray  # section of each spot
    pat_of: np.ndarray  # patient of each spot
    known: set  # sections present in the data
    fixed_genes: list[str] | None  # None: chosen on each fold's training sections
    extra: list[str]  # report-only genes present in the data
    n_genes: int  # genes chosen per fold when fixed_genes is None
    min_frac: float
    layer: str | None  # raw counts: a layer or X
    alpha: float | str
    alphas: Sequence[float]
    probe: dict  # latent_dim, seed, svd_solver, clip of every probe


def _views(adata: ad.AnnData, feature_key: str | Sequence[str]) -> np.ndarray:
    """Augmented views of the features of :func:`_features`, (n_spots, K, D).

    Each key's views are ``obsm[key + "_views"]`` (n_spots, K, D_key), written by
    ``features.extract(views=K)``; a key without them (e.g. a context key) repeats its clean
    features in every view. At least one key must have views, and all the same K.
    """
    keys = _feature_keys(feature_key)
    have = {k: adata.obsm[k + "_views"] for k in keys if k + "_views" in adata.obsm}
    if not have:
        raise StdistillError(f"views=True but there is no obsm[{keys[0] + '_views'!r}]; extract augmented views first "
                             "(stdistill.features.extract(..., views=K))")
    shapes = {k: np.shape(v) for k, v in have.items()}
    if len({sh[1] if len(sh) == 3 else -1 for sh in shapes.values()}) > 1:
        raise StdistillError(f"views of the feature keys differ in number: {shapes}")
    out = []
    for k in keys:
        F = _features(adata, k)
        if k not in have:
            out.append(np.broadcast_to(F[:, None], (len(F), next(iter(shapes.values()))[1], F.shape[1])))
            continue
        V = np.asarray(have[k], dtype=np.float64)
        if V.ndim != 3 or V.shape[0] != adata.n_obs or V.shape[2] != F.shape[1]:
            raise StdistillError(f"obsm[{k + '_views'!r}] must be (n_spots, K, {F.shape[1]}), got {V.shape}")
        if not np.isfinite(V).all():
            raise StdistillError(f"obsm[{k + '_views'!r}] has NaN/inf values; subset to sections with features")
        out.append(V)
    return np.concatenate(out, axis=2)


def _candidates(feature_key: Mapping, views: bool) -> dict[str, tuple[list[str], bool]]:
    """Feature candidates of :func:`expression` as name -> (obsm keys, views), or a one-line error.

    A candidate is a key, a list of keys, or ``{"key": key or list of keys, "views": bool}``
    (``views`` defaults to ``expression``'s ``views``).
    """
    if not feature_key:
        raise StdistillError("feature_key is an empty dict; give at least one candidate, name -> obsm key(s)")
    out = {}
    for name, c in feature_key.items():
        if not isinstance(name, str):
            raise StdistillError(f"feature candidate names must be strings, got {name!r}")
        v = views
        if isinstance(c, Mapping):
            unknown = set(c) - {"key", "views"}
            if "key" not in c or unknown:
                raise StdistillError(f"feature candidate {name!r} must be a key, a list of keys or "
                                     f"{{'key': ..., 'views': bool}}, got {dict(c)!r}")
            c, v = c["key"], bool(c.get("views", views))
        try:
            out[name] = (_feature_keys(c), v)
        except StdistillError as e:
            raise StdistillError(f"feature candidate {name!r}: {e}") from None
    return out


def _present_extra_genes(adata: ad.AnnData, extra_genes: Sequence[str]) -> list[str]:
    """``extra_genes`` that are in the data; the others are left out with a warning (they are report-only)."""
    missing = [x for x in extra_genes if x not in adata.var_names]
    if missing:
        warnings.warn(f"extra_genes not in the data, left out of the report: {missing}", stacklevel=3)
    return [x for x in extra_genes if x in adata.var_names]


def _given_genes(genes: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """``genes=`` of :func:`expression` as a list (read from a file for a path); None stays None."""
    if isinstance(genes, (str, os.PathLike)):
        return read_gene_list(genes)
    return list(genes) if genes is not None else None
