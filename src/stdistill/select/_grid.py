"""Settings and epochs chosen on validation patients *inside* the training patients, for any recipe.

:func:`select` holds each training patient out in turn (leave-one-patient-out inside the fold),
trains every candidate of a grid on the others with the recipe's ``fit_curve``, and records the
validation curve (a score after each epoch, epoch 0 = before training). :func:`choose` averages
the curves over the inner splits and returns the best (candidate, epoch). The test patients are
never seen: the caller passes only a fold's training patients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ..io._section import PATIENT_KEY, SECTION_KEY, subset_sections

#: ``fit_curve(config, inner_train, inner_val, parts) -> validation scores for epochs 0..max_epochs``
FitCurve = Callable[[Any, ad.AnnData, ad.AnnData, dict], Sequence[float]]


def inner_splits(
    adata: ad.AnnData, parts: Callable[[ad.AnnData, str, np.ndarray], dict] | None = None,
) -> list[tuple[str, ad.AnnData, ad.AnnData, dict]]:
    """Leave-one-patient-out splits of ``adata``: ``(val_patient, inner_train, inner_val, parts)``.

    ``parts(inner_train, val_patient, train_mask) -> dict`` derives what a recipe needs without the
    validation patient (genes, a teacher, ...); ``train_mask`` is the (n_obs,) bool mask of
    ``inner_train``'s rows in ``adata``. Needs at least 2 patients in ``obs["patient"]``.
    """
    pats = adata.obs[PATIENT_KEY].astype(str).to_numpy()
    secs = adata.obs[SECTION_KEY].astype(str).to_numpy()
    uniq = sorted(set(pats))
    if len(uniq) < 2:
        raise StdistillError(f"choosing settings needs at least 2 training patients (one for validation), got {uniq}")
    out = []
    for vp in uniq:
        tr = subset_sections(adata, sorted(set(secs[pats != vp])))
        va = subset_sections(adata, sorted(set(secs[pats == vp])))
        out.append((vp, tr, va, parts(tr, vp, pats != vp) if parts is not None else {}))
    return out


def select(
    adata: ad.AnnData,
    fit_curve: FitCurve,
    grid: Sequence[dict],
    base,
    *,
    parts: Callable[[ad.AnnData, str, np.ndarray], dict] | None = None,
    where: Callable[[dict], bool] | None = None,
) -> tuple[Any, pd.DataFrame]:
    """Choose a grid candidate and its number of epochs on inner validation patients.

    Parameters
    ----------
    adata
        A fold's **training** patients (``obs["patient"]``, ``obs["section"]``).
    fit_curve
        The recipe's training run: ``fit_curve(config, inner_train, inner_val, parts)`` returns the
        validation score after each epoch, epoch 0 first (before training), ``base.max_epochs + 1``
        values. It must not stop early (``select`` sets ``patience`` past ``max_epochs``).
    grid
        Candidates: dicts of config fields updating ``base``.
    base
        A dataclass config with ``max_epochs``, ``patience`` and ``maximize`` (whether a larger
        score is better).
    parts
        See :func:`inner_splits`.

    Returns
    -------
    The chosen config (``max_epochs`` = the chosen epoch; 0: training did not help) and a table with
    one row per candidate x validation patient (``candidate``, the grid keys, ``val_patient``,
    ``curve``, ``seconds``).
    """
    if base.max_epochs < 1:
        raise StdistillError(f"choosing settings needs base.max_epochs >= 1, got {base.max_epochs}")
    splits = inner_splits(adata, parts)
    rows = []
    for ci, upd in enumerate(grid):
        cfg = replace(base, **upd, patience=base.max_epochs + 1)  # full curves: no early stopping
        for vp, tr, va, p in splits:
            t0 = time.time()
            curve = [float(x) for x in fit_curve(cfg, tr, va, p)]
            rows.append({"candidate": ci, **upd, "val_patient": vp, "curve": curve, "seconds": round(time.time() - t0, 1)})
    table = pd.DataFrame(rows)
    return choose(table, grid, base, where=where), table


def choose(table: pd.DataFrame, grid: Sequence[dict], base, where: Callable[[dict], bool] | None = None):
    """The best (candidate, epoch) of :func:`select`'s table: curves averaged over the inner splits
    (truncated to the shortest), among the candidates whose grid dict passes ``where`` (default: all).

    Returns ``base`` updated with the winner and ``max_epochs`` = its epoch.
    """
    sign = -1.0 if base.maximize else 1.0  # lower is better after the sign
    best = None  # (signed mean score, candidate, epoch)
    for ci, upd in enumerate(grid):
        if where is not None and not where(upd):
            continue
        curves = list(table.loc[table["candidate"] == ci, "curve"])
        if not curves:
            continue
        n = min(map(len, curves))
        loss = sign * np.mean([c[:n] for c in curves], axis=0)
        ep = int(np.argmin(loss))
        if best is None or loss[ep] < best[0]:
            best = (loss[ep], ci, ep)
    if best is None:
        raise StdistillError("no candidate of the grid passes `where` (or the table is empty)")
    _, ci, ep = best
    return replace(base, **grid[ci], max_epochs=ep)
