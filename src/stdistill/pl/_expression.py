"""Expression figures: maps of measured vs predicted expression on the H&E, per-gene Pearson bars."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._utils import atomic_path
from ._common import _clim, _one_section, _spots, _thumbnail

__all__ = ["expression_maps", "pearson_bars"]


def _save(fig, path):
    if path is not None:
        path = os.fspath(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=130, bbox_inches="tight", format=os.path.splitext(path)[1][1:] or "png")


def _values(adata: ad.AnnData, v, name: str, mask: np.ndarray) -> np.ndarray:
    """Per-spot values of the section's spots: a Series indexed by obs names, or an array over all obs."""
    if isinstance(v, pd.Series):
        out = v.reindex(adata.obs_names[mask]).to_numpy(dtype=float)
        if np.isnan(out).all():
            raise StdistillError(f"{name}: no values for the spots of this section (index must be obs names)")
        return out
    arr = np.asarray(v, dtype=float)
    if arr.shape != (adata.n_obs,):
        raise StdistillError(f"{name}: expected {adata.n_obs} values (one per spot), got shape {arr.shape}")
    return arr[mask]


def expression_maps(
    adata: ad.AnnData,
    gene: str,
    predictions: Mapping[str, pd.Series | np.ndarray],
    *,
    section: str | None = None,
    measured: pd.Series | np.ndarray | None = None,
    path: str | os.PathLike | None = None,
    spot_scale: float = 1.0,
    cmap: str = "viridis",
    title: str | None = None,
):
    """Predicted (and, where measured, measured) expression of ``gene`` on one section's H&E thumbnail.

    Parameters
    ----------
    adata
        Sections (``obsm["spatial"]`` in full-resolution px, a hires thumbnail in
        ``uns["spatial"][section]["images"]["hires"]`` scaled by ``tissue_hires_scalef``); raw
        counts only needed for the measured panel.
    gene
        Gene symbol. Measured: ``log1p`` of its raw counts unless ``measured`` is given; when the
        gene is not in ``var_names`` (H&E-only data) only the predictions are drawn.
    predictions
        Panel title -> predicted log1p values (a Series indexed by obs names, e.g. a column of
        :attr:`ExpressionBenchResult.predictions`, or an array over all spots). Drawn clipped at
        0 (log1p counts are never negative; regression heads can undershoot).
    section
        Section to draw (default: the only one).

    Each panel's colour scale is its own (5th-95th percentile); with a measured panel, titles
    carry Pearson r with the measured values (of the unclipped predictions). Returns the Figure;
    writes ``path`` (PNG) when given.
    """
    from matplotlib.figure import Figure

    section, mask = _one_section(adata, section)
    meas = _measured(adata, gene, measured, mask)
    preds = [(k, _values(adata, v, k, mask)) for k, v in predictions.items()]
    panels = ([("measured", meas)] if meas is not None else []) + [(k, np.maximum(v, 0.0)) for k, v in preds]
    if not panels:
        raise StdistillError(f"nothing to draw for {gene!r}: no predictions and not measured")
    img, xy, d = _thumbnail(adata, section, mask, spot_scale)
    fig = Figure(figsize=(4.2 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    raw = dict(preds)
    for ax, (name, v) in zip(axes[0], panels):
        sc = _spots(ax, img, xy, d, v, _clim(v), cmap)
        ax.set_title(name + _pearson_note(meas, raw.get(name)), fontsize=10)
        fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.01, label="log1p counts" if name == "measured" else "predicted log1p")
    what = "measured vs predicted" if meas is not None else "predicted (not measured here)"
    fig.suptitle(title or f"{gene} on {section}: {what}", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return fig


def _measured(adata: ad.AnnData, gene: str, measured, mask: np.ndarray) -> np.ndarray | None:
    """log1p counts of ``gene`` on the section (or ``measured``); None when the gene was not measured."""
    if measured is not None:
        return _values(adata, measured, "measured", mask)
    if gene not in adata.var_names:
        return None
    x = adata[mask, gene].X
    return np.log1p(np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=float).ravel())


def _pearson_note(meas: np.ndarray | None, v: np.ndarray | None) -> str:
    """``"  (r = 0.42)"`` between measured and predicted values, or "" when not computable."""
    if meas is None or v is None:
        return ""
    ok = np.isfinite(v) & np.isfinite(meas)
    if ok.sum() <= 2 or np.std(v[ok]) == 0 or np.std(meas[ok]) == 0:
        return ""
    return f"  (r = {np.corrcoef(meas[ok], v[ok])[0, 1]:.2f})"


def pearson_bars(per_gene: pd.DataFrame | pd.Series, *, top: int = 25, path: str | os.PathLike | None = None,
                 highlight: Sequence[str] = ("ERBB2",), title: str = "Per-gene Pearson r (mean over folds)"):
    """Horizontal bars of the ``top`` genes' Pearson r (``per_gene["mean"]`` of a bench result), with ``highlight`` genes marked."""
    from matplotlib.figure import Figure

    s = per_gene["mean"] if isinstance(per_gene, pd.DataFrame) else per_gene
    s = s.dropna().sort_values(ascending=False)
    show = s.head(top)
    extra = [g for g in highlight if g in s.index and g not in show.index]
    show = pd.concat([show, s[extra]])
    fig = Figure(figsize=(5, 0.22 * len(show) + 1))
    ax = fig.subplots()
    colours = ["tab:red" if g in highlight else "tab:blue" for g in show.index]
    ax.barh(range(len(show)), show.to_numpy(), color=colours)
    ax.set_yticks(range(len(show)), show.index, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("Pearson r")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig
