"""Survival figures: Kaplan-Meier curves of predicted risk groups (log-rank p), a student's attention
over a slide's tiles on its H&E thumbnail, C-index bars with their spread."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ._common import _one_section, _spots, _subplots, _thumbnail
from ._expression import _save

__all__ = ["cindex_bars", "km_risk_groups", "survival_attention"]


def _lifelines():
    try:
        import lifelines
    except ImportError:
        raise StdistillError("Kaplan-Meier plots need lifelines: pip install 'stdistill[survival]'") from None
    return lifelines


def km_risk_groups(time, event, risk, *, groups=None, n_groups: int = 2, path: str | os.PathLike | None = None,
                   title: str = "Kaplan-Meier by predicted risk", time_label: str = "time"):
    """Kaplan-Meier curves (lifelines) of patients split by predicted ``risk`` into ``n_groups``
    quantile groups (2: below / above the median), or by given ``groups`` labels (e.g. from
    training-fold cut-offs), with the log-rank p-value (multivariate log-rank for > 2 groups).

    Returns the Figure (``fig.logrank_p`` holds the p-value); writes ``path`` when given.
    """
    lifelines = _lifelines()
    from lifelines.statistics import multivariate_logrank_test

    t, e, r = (np.asarray(x, dtype=np.float64).ravel() for x in (time, event, risk))
    if not (len(t) == len(e) == len(r)) or len(t) < 2:
        raise StdistillError(f"time, event and risk need the same length >= 2, got {len(t)}, {len(e)}, {len(r)}")
    if groups is None:
        if n_groups < 2:
            raise StdistillError(f"n_groups must be >= 2, got {n_groups}")
        q = np.quantile(r, np.arange(1, n_groups) / n_groups)
        g = np.searchsorted(q, r, side="right")
        names = ["low risk", "high risk"] if n_groups == 2 else [f"risk group {i + 1}" for i in range(n_groups)]
        labels = np.array([names[i] for i in g], dtype=object)
    else:
        labels = np.asarray(groups).astype(str)
    order = list(dict.fromkeys(sorted(labels, key=lambda x: (x != "low risk", x))))
    if len(order) < 2:
        raise StdistillError("Kaplan-Meier by risk needs at least two non-empty groups")
    p = float(multivariate_logrank_test(t, labels, e).p_value)
    fig, ax = _subplots(figsize=(5, 3.6), layout="constrained")
    for name in order:
        m = labels == name
        lifelines.KaplanMeierFitter(label=f"{name} (n={int(m.sum())}, {int(e[m].sum())} events)").fit(
            t[m], e[m]).plot_survival_function(ax=ax, ci_show=True)
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}\nlog-rank p = {p:.2g}", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    fig.logrank_p = p
    _save(fig, path)
    return fig


def survival_attention(adata: ad.AnnData, attention: pd.Series | np.ndarray, *, section: str | None = None,
                       path: str | os.PathLike | None = None, spot_scale: float = 1.0, cmap: str = "inferno",
                       title: str | None = None):
    """A model's attention over one slide's tiles (or spots) on its H&E thumbnail.

    ``attention``: a Series indexed by ``obs_names`` (e.g. ``SurvivalModel.attention`` of a patient
    mapped to its ``instance_ids``) or an (n_obs,) array; tiles without a value are not drawn.
    Colours are attention relative to uniform (n x weight; 1 = average), on a log scale.
    Returns the Figure; writes ``path`` when given.
    """
    section, mask = _one_section(adata, section)
    if isinstance(attention, pd.Series):
        v = attention.reindex(adata.obs_names[mask]).to_numpy(dtype=float)
    else:
        a = np.asarray(attention, dtype=float)
        if a.shape != (adata.n_obs,):
            raise StdistillError(f"attention must be a Series indexed by obs names or an array of {adata.n_obs}, got {a.shape}")
        v = a[mask]
    ok = np.isfinite(v)
    if not ok.any():
        raise StdistillError(f"no attention value for the tiles of section {section!r}")
    rel = np.full_like(v, np.nan)
    rel[ok] = np.log2(np.clip(v[ok] * ok.sum() / max(v[ok].sum(), 1e-12), 1e-3, None))
    img, xy, diam = _thumbnail(adata, section, mask, spot_scale)
    fig, ax = _subplots(figsize=(5, 5), layout="constrained")
    lim = float(max(np.abs(rel[ok]).max(), 0.5))
    ec = _spots(ax, img, xy, diam, rel, (-lim, lim), cmap)
    fig.colorbar(ec, ax=ax, shrink=0.7, label="log2 attention / uniform")
    ax.set_title(title or f"attention over {int(ok.sum())} tiles of {section}", fontsize=10)
    _save(fig, path)
    return fig


def cindex_bars(table: pd.DataFrame, *, metric: str = "cindex", path: str | os.PathLike | None = None,
                title: str = "C-index (mean +- sd over seeds)"):
    """Horizontal bars of ``<metric>_mean`` with ``<metric>_sd`` error bars, one per method (rows of
    :func:`stdistill.recipes.cv_table`); an ``oracle`` row becomes a dashed ceiling line and 0.5
    (chance) a dotted one. Returns the Figure; writes ``path`` when given."""
    col = f"{metric}_mean"
    if col not in table.columns:
        raise StdistillError(f"table has no {col!r} column (use stdistill.recipes.cv_table)")
    oracle = table[col].get("oracle") if "oracle" in table.index else None
    df = table.drop(index="oracle", errors="ignore")
    sd = df.get(f"{metric}_sd", pd.Series(0.0, index=df.index)).fillna(0.0)
    fig, ax = _subplots(figsize=(5.5, 0.32 * len(df) + 1.2), layout="constrained")
    y = np.arange(len(df))
    colours = ["tab:orange" if str(i).startswith(("amkd", "logit")) else "tab:blue" for i in df.index]
    ax.barh(y, df[col].to_numpy(), xerr=sd.to_numpy(), color=colours, alpha=0.85, error_kw={"lw": 0.8, "capsize": 2})
    ax.set_yticks(y, [str(i) for i in df.index], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.5, color="k", lw=0.6, ls=":", label="chance")
    if oracle is not None and np.isfinite(oracle):
        ax.axvline(float(oracle), color="tab:green", lw=1.0, ls="--", label=f"oracle {oracle:.3f}")
    lo = float(np.nanmin(df[col] - sd)) if len(df) else 0.4
    ax.set_xlim(min(0.4, lo - 0.02), 1.0)
    ax.set_xlabel(metric.replace("cindex_uno", "Uno C-index").replace("cindex", "Harrell C-index"))
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_title(title, fontsize=10)
    _save(fig, path)
    return fig
