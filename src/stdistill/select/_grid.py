"""Settings and epochs chosen on validation patients *inside* the training patients, for any recipe.

:func:`select` trains every candidate on every inner split of a fold's training patients (by
default leave-one-patient-out) with the recipe's ``fit_score``, which returns the validation score
after each epoch (a curve, epoch 0 = before training) or one score, and returns a
:class:`~stdistill.select.Selection`. :func:`choose` re-aggregates such a table. The test patients
are never seen: the caller passes only a fold's training patients.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import is_dataclass, replace
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ._selection import Criterion, Selection, settings_of
from ._splits import LeaveOnePatientOut, Split

#: ``fit_score(settings, split) -> scores per epoch (a curve) or one score``
FitScore = Callable[[Any, Split], "Sequence[float] | float"]


def _criterion(base, criterion: Criterion | None) -> Criterion:
    if criterion is not None:
        return criterion
    return Criterion(maximize=bool(getattr(base, "maximize", True)), metric=str(getattr(base, "val_metric", "score")))


def _record(upd: dict, split: str, out, seconds: float, ci: int) -> dict:
    """One table row from a fit_score result (a curve or a number)."""
    row = {"candidate": ci, **upd, "split": split}
    if np.ndim(out) == 0:
        row["score"] = float(out)
    else:
        row["curve"] = [float(x) for x in out]
    row["seconds"] = round(seconds, 1)
    return row


def _full(base, full_curves: bool):
    """``base`` with early stopping off (``patience`` past ``max_epochs``) for ``full_curves``."""
    if not full_curves:
        return base
    if getattr(base, "max_epochs", 1) < 1:
        raise StdistillError(f"choosing settings needs base.max_epochs >= 1, got {base.max_epochs}")
    return replace(base, patience=base.max_epochs + 1) if is_dataclass(base) else {**base, "patience": base["max_epochs"] + 1}


def _run(fit_score: FitScore, candidates: list[dict], splits: list[Split], base, order: str,
         with_candidate: bool) -> pd.DataFrame:
    """The candidates x splits table, candidate-major (``order="candidates"``) or split-major."""
    pairs = ([(ci, s) for ci in range(len(candidates)) for s in splits] if order == "candidates"
             else [(ci, s) for s in splits for ci in range(len(candidates))])
    rows = {}
    for ci, s in pairs:
        t0 = time.time()
        out = fit_score(settings_of(base, candidates[ci]), s, *((ci,) if with_candidate else ()))
        rows[(ci, s.name)] = _record(candidates[ci], s.name, out, time.time() - t0, ci)
    kinds = {"curve" in r for r in rows.values()}
    if len(kinds) > 1:
        raise StdistillError("fit_score returned curves for some runs and single scores for others")
    return pd.DataFrame([rows[(ci, s.name)] for ci in range(len(candidates)) for s in splits])


def select(
    data,
    fit_score: FitScore,
    candidates: Sequence[dict],
    *legacy,
    base: Any = None,
    splitter: Callable[[Any], list[Split]] | None = None,
    criterion: Criterion | None = None,
    parts: Callable[..., dict] | None = None,
    where: Callable[[dict], bool] | None = None,
    full_curves: bool = False,
    order: str = "candidates",
    with_candidate: bool = False,
) -> Selection:
    """Train every candidate on every inner split of ``data`` and choose one.

    Parameters
    ----------
    data
        A fold's **training** patients: an AnnData (``obs["patient"]``, ``obs["section"]``), a
        cohort, ... whatever ``splitter`` takes.
    fit_score
        The recipe's training run: ``fit_score(settings, split)`` trains ``settings`` (``base``
        updated with one candidate) on ``split.train`` and returns the score on ``split.val``
        after each epoch (a curve, first value at ``criterion.first_epoch``) or one number.
    candidates
        Settings to try: dicts updating ``base``.
    base
        A dataclass config or a dict (None: the candidates alone).
    splitter
        ``splitter(data) -> list[Split]``; default :class:`LeaveOnePatientOut`.
    criterion
        How scores are compared (:class:`Criterion`); default: maximise (or ``base.maximize``) the
        mean curve.
    parts
        ``parts(split) -> dict``: what a recipe derives from ``split.train`` alone (genes, a
        teacher, ...), computed once per split before training; in ``split.parts``.
    where
        Only candidates whose dict passes are chosen (all are trained).
    full_curves
        Record whole curves: candidates train with ``patience = max_epochs + 1`` (no early
        stopping); ``base`` needs ``max_epochs >= 1``.
    order
        ``"candidates"`` (each candidate on every split in turn) or ``"splits"`` (every candidate on
        one split, then the next split). The table lists candidates in order either way.
    with_candidate
        Call ``fit_score(settings, split, candidate)`` with the candidate's index (for run names or
        keeping a fitted model per candidate and split).

    Returns
    -------
    Selection
        ``.config()`` is ``base`` with the chosen settings (and, for curves, ``max_epochs`` = the
        chosen epoch; 0: training did not help).

    Notes
    -----
    The form ``select(adata, fit_curve, grid, base, parts=...)`` returning ``(config, table)``, with
    ``fit_curve(config, inner_train, inner_val, parts)`` and ``parts(inner_train, val_patient,
    train_mask)``, is deprecated and still works for one release.
    """
    if legacy:
        return _legacy_select(data, fit_score, candidates, *legacy, parts=parts, where=where)
    if order not in ("candidates", "splits"):
        raise StdistillError(f"order must be 'candidates' or 'splits', got {order!r}")
    candidates = [dict(c) for c in candidates] or [{}]
    fit_base = _full(base, full_curves)
    splits = (splitter or LeaveOnePatientOut())(data)
    if parts is not None:
        for s in splits:
            s.parts = parts(s)
    table = _run(fit_score, candidates, splits, fit_base, order, with_candidate)
    return Selection.from_table(table, candidates, _criterion(base, criterion), base=base, where=where)


def _legacy_select(adata, fit_curve, grid, base, parts=None, where=None) -> tuple[Any, pd.DataFrame]:
    warnings.warn("select(adata, fit_curve, grid, base) returning (config, table) is deprecated; use "
                  "select(data, fit_score, candidates, base=..., full_curves=True) and its Selection",
                  DeprecationWarning, stacklevel=3)
    new_parts = (lambda s: parts(s.train, s.name, s.train_rows)) if parts is not None else None
    sel = select(adata, lambda cfg, s: fit_curve(cfg, s.train, s.val, s.parts), grid, base=base, parts=new_parts,
                 where=where, full_curves=True)
    return sel.config(), sel.table.rename(columns={"split": "val_patient"})


def inner_splits(
    adata: ad.AnnData, parts: Callable[[ad.AnnData, str, np.ndarray], dict] | None = None,
) -> list[tuple[str, ad.AnnData, ad.AnnData, dict]]:
    """Leave-one-patient-out splits of ``adata``: ``(val_patient, inner_train, inner_val, parts)``
    (:class:`LeaveOnePatientOut` as tuples).

    ``parts(inner_train, val_patient, train_mask) -> dict`` derives what a recipe needs without the
    validation patient; ``train_mask`` is the (n_obs,) bool mask of ``inner_train``'s rows in
    ``adata``. Needs at least 2 patients in ``obs["patient"]``.
    """
    return [(s.name, s.train, s.val, parts(s.train, s.name, s.train_rows) if parts is not None else {})
            for s in LeaveOnePatientOut()(adata)]


def choose(table: pd.DataFrame, grid: Sequence[dict], base, where: Callable[[dict], bool] | None = None, *,
           criterion: Criterion | None = None):
    """The best (candidate, epoch) of a selection table (:attr:`Selection.table`, or the older
    ``val_patient`` tables): by default curves averaged over the splits (cut to the shortest), among
    the candidates whose dict passes ``where`` (default: all).

    Returns ``base`` updated with the winner and ``max_epochs`` = its epoch.
    """
    t = table if "split" in table.columns else table.rename(columns={"val_patient": "split", "val_patients": "split"})
    return Selection.from_table(t, grid, _criterion(base, criterion), base=base, where=where).config()
