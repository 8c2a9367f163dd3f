"""Choosing GenST's settings and alignment epochs on validation patients (:func:`select_genst`)."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad

from ...select import Criterion, Selection, select
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
) -> Selection:
    """Choose GenST settings and alignment epochs by leave-one-patient-out **inside** ``adata`` (a
    fold's training patients) with :func:`stdistill.select.select`: each candidate trains on all but
    one training patient, with ``n_genes`` genes chosen HEST's way on those patients (plus
    ``extra_genes``), and records the mean Pearson of the generated expression on the held-out one
    after each alignment epoch (epoch 0 = untrained alignment). Returns a
    :class:`~stdistill.select.Selection` (``.config()``: the chosen config; unpacking it as
    ``(config, table)`` is deprecated).
    """
    from ...pp.genes import hest_genes

    def parts(s) -> dict:
        g = hest_genes(s.train, n_genes, layer=layer)
        return {"genes": g + [x for x in extra_genes if x not in g and x in s.train.var_names]}

    def fit_score(cfg: GenstConfig, s) -> list[float]:
        return GenST(cfg, feature_key=feature_key, **kw).fit(s.train, s.parts["genes"], val=s.val, layer=layer).curve_

    base = base or GenstConfig()
    return select(adata, fit_score, grid, base=base, parts=parts, full_curves=True,
                  criterion=Criterion(metric="val_pearson", maximize=base.maximize))
