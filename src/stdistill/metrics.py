"""Metrics of the field: clustering agreement (ARI, NMI, niche-ID accuracy), macro-F1,
per-gene Pearson, C-index. Inputs are NumPy arrays; functions return floats or DataFrames."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray, genes=None) -> pd.Series:
    """Pearson r of each column of (n_spots, n_genes) ``y_true`` vs ``y_pred``.

    A gene that is constant in either array gets NaN (undefined), not 0.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise ValueError(f"shapes differ or are not 2-D: {y_true.shape} vs {y_pred.shape}")
    a = y_true - y_true.mean(0)
    b = y_pred - y_pred.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1.0), np.nan)
    return pd.Series(r, index=genes if genes is not None else range(y_true.shape[1]), name="pearson")
