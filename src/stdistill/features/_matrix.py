"""Features as a matrix: ``obsm[feature_key]`` (one key or several side by side), checked finite."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np

from .._errors import StdistillError
from .._keys import Key


def feature_keys(feature_key: str | Sequence[str]) -> list[str]:
    """``feature_key`` (an obsm key or a list of them) as a non-empty list of distinct keys."""
    keys = [feature_key] if isinstance(feature_key, str) else list(feature_key)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise StdistillError(f"feature_key must be an obsm key or a non-empty list of them, got {feature_key!r}")
    if len(set(keys)) < len(keys):
        raise StdistillError(f"feature_key lists a key twice: {keys}")
    return keys


def feature_matrix(adata: ad.AnnData, feature_key: str | Sequence[str]) -> np.ndarray:
    """``obsm[feature_key]`` as a finite (n_spots, D) float64 array, or a one-line error.

    Several keys: their features side by side, (n_spots, D_1 + D_2 + ...), in the given order.
    """
    keys = feature_keys(feature_key)
    missing = [k for k in keys if k not in adata.obsm]
    if missing:
        raise StdistillError(
            f"no obsm[{missing[0]!r}]; extract features first (stdistill.features.extract) "
            f"(have: {list(adata.obsm.keys())})"
        )
    if len(keys) > 1:
        return np.concatenate([feature_matrix(adata, k) for k in keys], axis=1)
    feature_key = keys[0]
    F = np.asarray(adata.obsm[feature_key], dtype=np.float64)
    if F.ndim != 2 or len(F) != adata.n_obs:
        raise StdistillError(f"obsm[{feature_key!r}] must be (n_spots, D), got {F.shape}")
    if not np.isfinite(F).all():
        bad = adata.obs[Key.obs.section].astype(str)[~np.isfinite(F).all(1)].unique().tolist()
        raise StdistillError(f"obsm[{feature_key!r}] has NaN/inf rows (sections {bad[:5]}); subset to sections with features")
    return F
