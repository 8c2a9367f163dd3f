"""Per-section statistics of feature matrices (each section's own images, no labels)."""

from __future__ import annotations

from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd

from ._keys import Key


def section_moments(adata: ad.AnnData, f: np.ndarray, ok: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per section with >= 2 rows in ``ok``: (row mask, mean (F,), sd (F,), tiny sds set to 1) of ``f``."""
    sec = adata.obs[Key.obs.section].astype(str).to_numpy()
    for s in pd.unique(sec):
        m = (sec == s) & ok
        if m.sum() < 2:
            continue
        mu, s_ = f[m].mean(0), f[m].std(0)
        s_[s_ < 1e-6] = 1.0
        yield m, mu, s_
