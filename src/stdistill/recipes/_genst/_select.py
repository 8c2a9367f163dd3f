"""Choosing GenST's settings and alignment epochs on validation patients (:func:`select_genst`)."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ._config import GenstConfig
from ._model import GenST

__all__ = ["select_genst"]


def select_genst(
    adata: ad.AnnData,
    grid: Sequence[dict],
    *,
    base: GenstConfig | None = None,
    feature_key: str = "X_effnet-lite0-imagenet",
    n_genes: int = 50,
    extra_genes: Sequence[str] = (),
    layer: str | None = None,
    **kw,
) -> tuple[GenstConfig, pd.DataFrame]:
    """Choose GenST settings and alignment epochs by leave-one-patient-out **inside** ``adata`` (a
    fold's training patients) with :func:`stdistill.select.select`: each candidate trains on all but
    one training patient, with ``n_genes`` genes chosen HEST's way on those patients (plus
    ``extra_genes``), and records the mean Pearson of the generated expression on the held-out one
    after each alignment epoch (epoch 0 = untrained alignment). Returns the chosen config and the table.
    """
    from ...pp.genes import hest_genes
    from ...select import select

    base = base or GenstConfig()

    def parts(tr: ad.AnnData, _vp: str, _mask: np.ndarray) -> dict:
        g = hest_genes(tr, n_genes, layer=layer)
        return {"genes": g + [x for x in extra_genes if x not in g and x in tr.var_names]}

    def fit_curve(cfg: GenstConfig, tr: ad.AnnData, va: ad.AnnData, p: dict) -> list[float]:
        return GenST(cfg, feature_key=feature_key, **kw).fit(tr, p["genes"], val=va, layer=layer).curve_

    return select(adata, fit_curve, grid, base, parts=parts)
