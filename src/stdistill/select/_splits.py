"""Inner splits of a fold's training patients: who trains and who validates while settings are chosen.

A splitter is a callable ``splitter(data) -> list[Split]``; it sees only the data it is given (a
fold's training patients), so a test patient can never validate. The splitters here:

- :class:`LeaveOnePatientOut`: every patient validates once (sorted by id, or the smallest first);
- :class:`ValidationPatients`: one split, the given patients (or the smallest) validate;
- :class:`ValidationRows`: one split with fixed validation rows (e.g. a spatial block of a
  one-patient section);
- :class:`PatientFolds`: a survival cohort's patients, leave one group out or k folds stratified
  by event.

AnnData splitters read ``obs["patient"]`` and ``obs["section"]`` and give section subsets; their
``masks(...)`` gives the same splits as (n_obs,) boolean row masks instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ..io._section import PATIENT_KEY, SECTION_KEY, subset_sections

__all__ = ["LeaveOnePatientOut", "PatientFolds", "Split", "ValidationPatients", "ValidationRows"]


@dataclass
class Split:
    """One inner split. ``train``/``val``: what the splitter made of the data (AnnData subsets,
    section ids, cohort subsets, ...); ``train_rows``/``val_rows``: (n_obs,) bool masks of those rows
    in the AnnData given (None for other data); ``parts``: what the recipe derived from the training
    part alone (see :func:`stdistill.select.select`)."""

    name: str
    train: Any
    val: Any
    train_rows: np.ndarray | None = field(default=None, repr=False)
    val_rows: np.ndarray | None = field(default=None, repr=False)
    parts: dict = field(default_factory=dict, repr=False)


def _patients_of(adata: ad.AnnData) -> np.ndarray:
    for k in (PATIENT_KEY, SECTION_KEY):
        if k not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{k}"]; choosing settings on inner patients needs it')
    return adata.obs[PATIENT_KEY].astype(str).to_numpy()


def _smallest(pats: np.ndarray, rows: np.ndarray) -> str:
    """The patient with the fewest rows (ties: the smaller id)."""
    return min(sorted(set(pats[rows])), key=lambda q: ((pats[rows] == q).sum(), q))


class _PatientSplitter:
    """Splits that hold out whole patients of an AnnData; subclasses name the validation patients.

    ``rows``: (n_obs,) bool, the usable rows of the AnnData given (e.g. spots with features);
    only they count as a patient's rows and only they train or validate. ``subset=False``: every
    split's ``train`` and ``val`` are the whole AnnData and ``train_rows``/``val_rows`` say which
    rows (no copies; for estimators that index one AnnData).
    """

    def __init__(self, *, rows: np.ndarray | None = None, subset: bool = True):
        self.rows, self.subset = (None if rows is None else np.asarray(rows, dtype=bool)), bool(subset)

    def _groups(self, pats: np.ndarray, rows: np.ndarray) -> list[list[str]]:
        raise NotImplementedError

    def masks(self, data, rows: np.ndarray | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``(name, train_rows, val_rows)`` per split, (n_obs,) bool over ``data`` (an AnnData or an
        (n_obs,) array of patient ids). ``rows``: the usable rows (default: the splitter's, else
        all); only they count as patients' rows, and both masks lie inside them."""
        pats = _patients_of(data) if isinstance(data, ad.AnnData) else np.asarray(data).astype(str)
        rows = self.rows if rows is None else np.asarray(rows, dtype=bool)
        rows = np.ones(len(pats), dtype=bool) if rows is None else rows
        if len(rows) != len(pats):
            raise StdistillError(f"rows has {len(rows)} entries, the data {len(pats)} rows")
        out = []
        for g in self._groups(pats, rows):
            val = np.isin(pats, g) & rows
            out.append(("+".join(g), rows & ~val, val))
        return out

    def __call__(self, data) -> list[Split]:
        """Splits of an AnnData (section subsets, rows in the data's order; row subsets when the
        splitter has ``rows``) or of a section -> patient mapping (``train``/``val``: tuples of
        section ids in the mapping's order)."""
        if isinstance(data, (Mapping, pd.Series)):
            sp = pd.Series(data).astype(str)
            pats = sp.to_numpy()
            return [Split("+".join(g), tuple(s for s in sp.index if sp[s] not in g), tuple(s for s in sp.index if sp[s] in g))
                    for g in self._groups(pats, np.ones(len(pats), dtype=bool))]
        secs = data.obs[SECTION_KEY].astype(str).to_numpy()
        out = []
        for name, tr, va in self.masks(data):
            if not self.subset:
                parts = (data, data)
            elif self.rows is not None:
                parts = (data[tr].copy(), data[va].copy())
            else:
                parts = (subset_sections(data, sorted(set(secs[tr]))), subset_sections(data, sorted(set(secs[va]))))
            out.append(Split(name, *parts, train_rows=tr, val_rows=va))
        return out


class LeaveOnePatientOut(_PatientSplitter):
    """Every patient validates once, trained on the others (at least 2 patients).

    ``first``: ``None`` (patients sorted by id) or ``"smallest"`` (the patient with the fewest rows
    first, then the others sorted: the niche student's ``val_patients="each"``).
    """

    def __init__(self, first: str | None = None, *, rows: np.ndarray | None = None, subset: bool = True):
        super().__init__(rows=rows, subset=subset)
        if first not in (None, "smallest"):
            raise StdistillError(f"first must be None or 'smallest', got {first!r}")
        self.first = first

    def _groups(self, pats, rows):
        uniq = sorted(set(pats[rows]))
        if len(uniq) < 2:
            raise StdistillError(f"choosing settings needs at least 2 training patients (one for validation), got {uniq}")
        if self.first == "smallest":
            s = _smallest(pats, rows)
            uniq = [s, *(q for q in uniq if q != s)]
        return [[q] for q in uniq]

    def __repr__(self) -> str:
        return "LeaveOnePatientOut()" if self.first is None else f"LeaveOnePatientOut(first={self.first!r})"


class ValidationPatients(_PatientSplitter):
    """One split: ``patients`` validate (a list of ids, or ``"smallest"``: the patient with the
    fewest rows), the other patients train."""

    def __init__(self, patients: str | Sequence[str] = "smallest", *, rows: np.ndarray | None = None, subset: bool = True):
        super().__init__(rows=rows, subset=subset)
        self.patients = patients if patients == "smallest" else [str(p) for p in patients]

    def _groups(self, pats, rows):
        have = sorted(set(pats[rows]))
        if len(have) < 2:
            raise StdistillError(f"a validation patient needs at least 2 training patients, got {have}")
        vp = [_smallest(pats, rows)] if self.patients == "smallest" else self.patients
        missing = sorted(set(vp) - set(have))
        if missing:
            raise StdistillError(f"validation patients {missing} are not in the training data")
        if set(vp) >= set(have):
            raise StdistillError(f"validation patients {vp} leave no patient to train on")
        return [list(vp)]

    def __repr__(self) -> str:
        return f"ValidationPatients({self.patients!r})"


class ValidationRows:
    """One split with fixed validation rows: ``val_rows`` (n_obs,) bool, e.g. a spatial block of a
    one-patient section (a weaker check than a held-out patient), or the validation spots a
    refinement is chosen on. ``__call__`` gives row subsets (``subset=False``: the whole AnnData
    twice, with the masks); ``rows``: the usable rows, as for the patient splitters."""

    def __init__(self, val_rows: np.ndarray, name: str = "block", *, rows: np.ndarray | None = None, subset: bool = True):
        self.val_rows, self.name = np.asarray(val_rows, dtype=bool), str(name)
        self.rows, self.subset = (None if rows is None else np.asarray(rows, dtype=bool)), bool(subset)

    def masks(self, data, rows: np.ndarray | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
        n = data.n_obs if isinstance(data, ad.AnnData) else len(data)
        if len(self.val_rows) != n:
            raise StdistillError(f"val_rows has {len(self.val_rows)} rows, the data {n}")
        rows = self.rows if rows is None else np.asarray(rows, dtype=bool)
        rows = np.ones(n, dtype=bool) if rows is None else rows
        val = self.val_rows & rows
        if not val.any() or not (rows & ~val).any():
            raise StdistillError("the validation rows leave no validation or no training rows")
        return [(self.name, rows & ~val, val)]

    def __call__(self, data: ad.AnnData) -> list[Split]:
        return [Split(name, *((data[tr].copy(), data[va].copy()) if self.subset else (data, data)), train_rows=tr, val_rows=va)
                for name, tr, va in self.masks(data)]

    def __repr__(self) -> str:
        return f"ValidationRows({int(self.val_rows.sum())} rows, name={self.name!r})"


class PatientFolds:
    """Patient folds of a survival cohort (a :class:`~stdistill.recipes.Cohort`: ``patients``,
    ``event``, ``table``, ``subset``): leave one ``table[groups]`` value out (e.g. the source patient
    of a semi-synthetic cohort), else ``k`` folds stratified by event when both classes have at
    least ``k`` patients (plain k folds otherwise), shuffled with ``seed``.

    ``require_event``: ``__call__`` drops splits whose validation patients have no event (a C-index
    needs one) and refuses when none is left.
    """

    def __init__(self, k: int = 3, *, groups: str | None = None, seed: int = 0, require_event: bool = True):
        self.k, self.groups, self.seed, self.require_event = int(k), groups, int(seed), bool(require_event)

    def folds(self, cohort) -> list[tuple[str, list[str], list[str]]]:
        """``(name, training patients, validation patients)`` per fold, every fold kept."""
        pats = np.asarray(cohort.patients)
        if self.groups is not None:
            if self.groups not in cohort.table.columns:
                raise StdistillError(f"no column {self.groups!r} in the cohort table")
            g = cohort.table[self.groups].astype(str).to_numpy()
            if len(set(g)) < 2:
                raise StdistillError(f"leave-one-{self.groups}-out needs >= 2 groups, got {sorted(set(g))}")
            return [(v, list(pats[g != v]), list(pats[g == v])) for v in sorted(set(g))]
        from sklearn.model_selection import KFold, StratifiedKFold

        ev, k = cohort.event, self.k
        if k < 2 or k > len(pats):
            raise StdistillError(f"k must be in [2, {len(pats)}] patients, got {k}")
        strat = min(ev.sum(), len(ev) - ev.sum()) >= k
        split = (StratifiedKFold(k, shuffle=True, random_state=self.seed).split(pats, ev) if strat
                 else KFold(k, shuffle=True, random_state=self.seed).split(pats))
        return [(f"fold{i}", list(pats[tr]), list(pats[te])) for i, (tr, te) in enumerate(split)]

    def __call__(self, cohort) -> list[Split]:
        out = []
        for name, tr, va in self.folds(cohort):
            cva = cohort.subset(va)
            if self.require_event and cva.event.sum() == 0:
                continue
            out.append(Split(name, cohort.subset(tr), cva))
        if not out:
            raise StdistillError("no inner validation split has an event: cannot choose settings")
        return out

    def __repr__(self) -> str:
        by = f"groups={self.groups!r}" if self.groups is not None else f"k={self.k}, seed={self.seed}"
        return f"PatientFolds({by})"
