"""Training helpers of the niche student: augmented feature views and a spatial validation block."""

from __future__ import annotations

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch

from .._errors import StdistillError
from .._moments import section_moments
from ..io._section import SECTION_KEY, SPATIAL_KEY


def normalise_views(adata: ad.AnnData, f: np.ndarray, views: np.ndarray, how: str, mean=None, sd=None) -> np.ndarray:
    """(n, V, F) augmented views z-scored with the statistics of the clean features ``f`` (n, F):
    per section (``how="section"``) or with the given training ``mean``/``sd`` (``"global"``).
    Rows whose clean features are not finite are 0."""
    f = np.asarray(f, dtype=np.float32)
    v = np.asarray(views, dtype=np.float32)
    if v.ndim != 3 or v.shape[0] != f.shape[0] or v.shape[2] != f.shape[1]:
        raise StdistillError(f"augmented views must be (n_obs, views, {f.shape[1]}), got {v.shape}")
    ok = np.all(np.isfinite(f), axis=1) & np.all(np.isfinite(v), axis=(1, 2))
    out = np.zeros_like(v)
    if how == "global":
        out[ok] = (v[ok] - mean) / sd
    else:
        for m, mu, s_ in section_moments(adata, f, ok):
            out[m] = (v[m] - mu[None]) / s_[None]
    return np.clip(out, -10, 10).astype(np.float32)


class ViewSampler(L.Callback):
    """Each training epoch, every spot's feature is one of (clean, view 1..V), drawn with a
    generator seeded by (seed, epoch); validation and everything after ``fit`` see the clean ones.

    Works on any LightningModule holding its per-spot features in a ``feats`` buffer (n, d)."""

    def __init__(self, clean: np.ndarray, views: np.ndarray, seed: int):
        self.clean = torch.from_numpy(np.ascontiguousarray(clean, dtype=np.float32))
        self.views = torch.from_numpy(np.ascontiguousarray(views, dtype=np.float32))
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer, pl_module):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(trainer.current_epoch))
        n, n_views = self.views.shape[:2]
        pick = torch.randint(0, n_views + 1, (n,), generator=g)
        x = self.clean.clone()
        rows = torch.nonzero(pick > 0).squeeze(1)
        x[rows] = self.views[rows, pick[rows] - 1]
        pl_module.feats.copy_(x.to(pl_module.feats.device))

    def _restore(self, pl_module):
        pl_module.feats.copy_(self.clean.to(pl_module.feats.device))

    def on_validation_epoch_start(self, trainer, pl_module):
        self._restore(pl_module)

    def on_fit_end(self, trainer, pl_module):
        self._restore(pl_module)


def spatial_block(adata: ad.AnnData, valid: np.ndarray, fraction: float) -> np.ndarray:
    """(n_obs,) bool: in each section, the ``fraction`` of its valid spots lying first along the
    section's longer axis (a contiguous band), held out for validation. At least one valid spot of
    each section stays out of the block."""
    if not 0 < fraction < 1:
        raise StdistillError(f"val_block must be in (0, 1), got {fraction}")
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    out = np.zeros(adata.n_obs, dtype=bool)
    for s in pd.unique(sec):
        rows = np.flatnonzero((sec == s) & valid)
        if len(rows) < 2:
            continue
        pts = xy[rows]
        axis = int(np.argmax(np.ptp(pts, axis=0)))
        order = rows[np.argsort(pts[:, axis], kind="stable")]
        k = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1)
        out[order[:k]] = True
    return out
