"""Pathway figures: measured vs predicted activity maps on the H&E, per-pathway Pearson bars."""

from __future__ import annotations

import os
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from ._common import _clim, _one_section, _spots, _subplots, _thumbnail
from ._expression import _save

__all__ = ["pathways", "pathway_bars"]



def _frame(adata: ad.AnnData, key: str | None, what: str, required: bool) -> pd.DataFrame | None:
    """``obsm[key]`` as a DataFrame indexed like ``obs`` (None when absent and not required)."""
    if key is None or key not in adata.obsm:
        if required:
            raise StdistillError(f'no obsm["{key}"] ({what}): run stdistill pathways predict / STAMP.predict first')
        return None
    v = adata.obsm[key]
    if not isinstance(v, pd.DataFrame):
        raise StdistillError(f'obsm["{key}"] ({what}) must be a DataFrame of spots x pathways '
                             "(as pp.pathway_scores and STAMP.predict write it)")
    return v.set_axis(adata.obs_names, axis=0)


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def pathways(
    adata: ad.AnnData,
    names: str | Sequence[str],
    *,
    section: str | None = None,
    measured_key: str | None = Key.obsm.pathway_scores,
    pred_key: str = Key.obsm.pathway_pred,
    path: str | os.PathLike | None = None,
    scale: str = "row",
    spot_scale: float = 1.0,
    cmap: str = "viridis",
):
    """Measured vs predicted pathway activity on one section's H&E thumbnail, one row per pathway.

    Parameters
    ----------
    adata
        Spots or H&E-only tiles (``obsm["spatial"]``, the section's hires thumbnail).
    names
        Pathway names (columns of ``obsm[pred_key]``).
    measured_key
        ``obsm`` DataFrame of measured activities (:func:`stdistill.pp.pathway_scores`). When
        absent (H&E only, or ``None``) only the predictions are drawn; a pathway it lacks gets an
        empty measured panel.
    pred_key
        ``obsm`` DataFrame of predicted activities (:meth:`stdistill.recipes.STAMP.predict`).
    scale
        ``"row"``: one colour scale (5th-95th percentile of both panels) per pathway, so the
        magnitudes compare; ``"panel"``: each panel its own scale, so the patterns compare.
        The figure title says which.

    Spots are circles of their physical diameter; the predicted panel's title carries Pearson r
    with the measured values when both exist. Returns the Figure; writes ``path`` (PNG) when given.
    """
    if scale not in ("row", "panel"):
        raise StdistillError(f"scale must be 'row' or 'panel', got {scale!r}")
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise StdistillError("no pathway names to draw")
    pred = _frame(adata, pred_key, "predicted activities", required=True)
    meas = _frame(adata, measured_key, "measured activities", required=False)
    missing = [n for n in names if n not in pred.columns]
    if missing:
        raise StdistillError(f"pathways {missing[:3]} are not in obsm[{pred_key!r}] (has {list(pred.columns)[:6]}...)")
    section, mask = _one_section(adata, section)
    img, xy, diam = _thumbnail(adata, section, mask, spot_scale)
    cols = ["measured", "predicted"] if meas is not None else ["predicted"]
    fig, axes = _subplots(len(names), len(cols), figsize=(3.8 * len(cols) + 1.0, 3.8 * len(names)),
                             squeeze=False, layout="constrained")
    for row, name in zip(axes, names):
        p = pred[name].to_numpy(dtype=float)[mask]
        m = meas[name].to_numpy(dtype=float)[mask] if meas is not None and name in meas.columns else None
        panels = {"predicted": p} if m is None else {"measured": m, "predicted": p}
        shared = _clim(*panels.values())
        for ax, col in zip(row, cols):
            if col not in panels:
                ax.set_axis_off()
                ax.set_title(f"{name}: not measured", fontsize=10)
                continue
            ec = _spots(ax, img, xy, diam, panels[col], shared if scale == "row" else _clim(panels[col]), cmap)
            title = f"{name}\n{col}"
            r = _pearson(m, p) if col == "predicted" and m is not None else None
            if r is not None:
                title += f"  (r = {r:.2f})"
            ax.set_title(title, fontsize=10)
            if scale == "panel":
                fig.colorbar(ec, ax=ax, fraction=0.04, pad=0.01, label="activity")
        if scale == "row":
            fig.colorbar(ec, ax=list(row), fraction=0.04, pad=0.01, label="activity")
    how = ("one colour scale per pathway" if len(cols) == 1 else
           "shared colour scale per pathway" if scale == "row" else "each panel its own colour scale")
    what = "measured vs predicted" if meas is not None else "predicted from H&E"
    fig.suptitle(f"Pathway activity on {section}: {what} ({how})", fontsize=11)
    _save(fig, path)
    return fig


def pathway_bars(per_pathway: pd.DataFrame | pd.Series, *, top: int = 25, path: str | os.PathLike | None = None,
                 title: str = "Per-pathway Pearson r (mean over folds)", fold_label: str = "fold"):
    """Horizontal bars of the ``top`` pathways' mean Pearson r over folds (the numeric columns of
    ``per_pathway``; ``mean``/``std`` columns are ignored), with the fold spread as error bars
    (sd) and each fold as a point (``fold_label`` names them: "fold", "section", ...).
    Returns the Figure; writes ``path`` (PNG) when given."""
    df = per_pathway.to_frame() if isinstance(per_pathway, pd.Series) else per_pathway
    folds = df.select_dtypes("number").drop(columns=["mean", "std"], errors="ignore")
    if folds.shape[1] == 0 or folds.shape[0] == 0:
        raise StdistillError("per_pathway needs one numeric column per fold and one row per pathway")
    mean = folds.mean(axis=1, skipna=True).dropna().sort_values(ascending=False)
    show = mean.head(top).index
    sd = folds.loc[show].std(axis=1, ddof=1) if folds.shape[1] > 1 else None
    fig, ax = _subplots(figsize=(5.5, 0.24 * len(show) + 1.2), layout="constrained")
    ypos = np.arange(len(show))
    ax.barh(ypos, mean[show].to_numpy(), xerr=None if sd is None else sd.fillna(0).to_numpy(), color="tab:blue",
            alpha=0.8, error_kw={"lw": 0.8, "capsize": 2})
    if folds.shape[1] > 1:
        for j, c in enumerate(folds.columns):
            ax.plot(folds.loc[show, c].to_numpy(), ypos, "o", ms=2.5, color="k", alpha=0.6, label=fold_label if j == 0 else None)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_yticks(ypos, [str(s) for s in show], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel(f"Pearson r ({folds.shape[1]} {fold_label}{'s' if folds.shape[1] != 1 else ''}"
                  f"{', bars: mean +- sd' if sd is not None else ''})")
    ax.set_title(title, fontsize=10)
    _save(fig, path)
    return fig
