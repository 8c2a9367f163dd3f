"""What :func:`stdistill.bench.expression` returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .._errors import StdistillError
from ..select import Selection

__all__ = ["ExpressionBenchResult"]


@dataclass
class ExpressionBenchResult:
    """What :func:`expression` returns.

    ``per_fold``: one row per fold (test patients, spots, genes, alpha, PCA width, Pearson mean).
    ``per_gene``: genes x folds Pearson r (NaN where a gene was not a target of that fold), with
    ``mean``/``std`` columns over folds. ``predictions``: fold -> DataFrame (test spots x genes)
    of predicted log1p expression; ``targets``: the same measured. ``selection`` (feature
    candidates only): folds x candidates, each candidate's mean Pearson over the leave-one-patient-out
    folds inside that fold's training patients (the fold's choice is ``per_fold["chosen"]``);
    ``selections``: fold -> its :class:`~stdistill.select.Selection` (candidates x inner folds).
    """

    per_fold: pd.DataFrame
    per_gene: pd.DataFrame
    predictions: dict[str, pd.DataFrame] = field(repr=False)
    targets: dict[str, pd.DataFrame] = field(repr=False)
    genes: dict[str, list[str]] = field(repr=False)
    params: dict = field(default_factory=dict)
    selection: pd.DataFrame | None = None
    selections: dict[str, Selection] | None = field(default=None, repr=False)

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_fold["pearson_mean"]))

    @property
    def std(self) -> float:
        return float(np.std(self.per_fold["pearson_mean"]))  # ddof=0, as HEST

    def gene(self, name: str) -> pd.Series:
        """Per-fold Pearson r of one gene (NaN where it was not a target)."""
        if name not in self.per_gene.index:
            raise StdistillError(f"gene {name!r} was not a target in any fold")
        return self.per_gene.loc[name].drop(["mean", "std", "n_folds"], errors="ignore")

    def summary(self) -> str:
        return f"Pearson {self.mean:.4f} +- {self.std:.4f} over {len(self.per_fold)} folds"

    def to_uns(self) -> dict:
        """A plain (h5ad-writable) dict: per-fold table, summary, parameters (and, with feature
        candidates, ``selection``: ``folds`` and each candidate's inner scores under ``inner_pearson``)."""
        pf = self.per_fold
        out = {
            "pearson_mean": self.mean,
            "pearson_std": self.std,
            "per_fold": {c: pf[c].astype(str).to_numpy() if pf[c].dtype == object else pf[c].to_numpy()
                         for c in pf.columns},
            "params": {k: (v if isinstance(v, (int, float, str)) else json.dumps(v)) for k, v in self.params.items()},
        }
        if self.selection is not None:
            sel = self.selection
            out["selection"] = {"folds": sel.index.astype(str).to_numpy(),
                                "inner_pearson": {str(c): sel[c].to_numpy() for c in sel.columns}}
        return out
