"""Patient-level splits. Train and test never share a patient; entry points check it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ..io._section import PATIENT_KEY, SECTION_KEY


@dataclass(frozen=True)
class Fold:
    """One patient-level split. Section ids in ``train``/``val``/``test``; ``val`` is drawn from
    training patients (for early stopping and choosing settings), never from ``test``."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    patients: Mapping[str, str] = field(repr=False)  # section -> patient
    val: tuple[str, ...] = ()

    def __post_init__(self):
        check_split(self.train + self.val, self.test, self.patients)

    def patients_of(self, part: str) -> list[str]:
        return sorted({self.patients[s] for s in getattr(self, part)})

    def inner(self, by: str = "patient") -> list[Fold]:
        """Leave-one-patient-out folds over this fold's training (+val) sections, for tuning."""
        return folds(pd.Series({s: self.patients[s] for s in self.train + self.val}), by=by, prefix=f"{self.name}/")


def _section_patients(data) -> pd.Series:
    """section -> patient from an AnnData, a list of AnnData, a Series or a mapping."""
    if isinstance(data, ad.AnnData):
        data = [data]
    if isinstance(data, pd.Series):
        s = data.astype(str)
    elif isinstance(data, Mapping):
        s = pd.Series({str(k): str(v) for k, v in data.items()})
    elif isinstance(data, Sequence) and data and isinstance(data[0], ad.AnnData):
        pairs = {}
        for a in data:
            for k in (SECTION_KEY, PATIENT_KEY):
                if k not in a.obs:
                    raise StdistillError(f'AnnData has no obs["{k}"]: every section needs a patient id')
            g = a.obs[[SECTION_KEY, PATIENT_KEY]].astype(str).drop_duplicates()
            for sec, pat in g.itertuples(index=False):
                if pairs.setdefault(sec, pat) != pat:
                    raise StdistillError(f"section {sec!r} is assigned to two patients")
        s = pd.Series(pairs)
    else:
        raise StdistillError("folds() takes an AnnData, a list of AnnData, or a section -> patient mapping")
    return s


def check_split(train: Sequence[str], test: Sequence[str], patients: Mapping[str, str]) -> None:
    """Raise :class:`StdistillError` if train and test share a section or a patient."""
    shared_sec = set(train) & set(test)
    if shared_sec:
        raise StdistillError(f"train and test share sections {sorted(shared_sec)}")
    try:
        tr = {patients[s] for s in train}
        te = {patients[s] for s in test}
    except KeyError as e:
        raise StdistillError(f"section {e.args[0]!r} has no patient id") from None
    shared = tr & te
    if shared:
        raise StdistillError(
            f"train and test share patients {sorted(shared)}: results would leak; split by patient"
        )


def check_patient_disjoint(train: ad.AnnData, test: ad.AnnData) -> None:
    """Refuse a train/test pair of AnnData that share any patient (checked on ``obs["patient"]``)."""
    for a, what in ((train, "training"), (test, "test")):
        if PATIENT_KEY not in a.obs:
            raise StdistillError(f'{what} data has no obs["{PATIENT_KEY}"]; cannot check the split')
    shared = set(train.obs[PATIENT_KEY].astype(str)) & set(test.obs[PATIENT_KEY].astype(str))
    if shared:
        raise StdistillError(
            f"training and test data share patients {sorted(shared)}: results would leak; split by patient"
        )


def folds(
    data,
    by: str = "patient",
    n_splits: int | None = None,
    n_val_patients: int = 0,
    seed: int = 0,
    prefix: str = "",
) -> list[Fold]:
    """Patient-level folds over sections.

    Parameters
    ----------
    data
        AnnData (``obs["section"]``, ``obs["patient"]``), a list of them, or section -> patient.
    by
        Only ``"patient"`` is allowed; section-level splits leak patient identity.
    n_splits
        ``None``: leave-one-patient-out. Otherwise k folds of whole patients (seeded shuffle).
    n_val_patients
        Patients taken from each fold's training patients into ``val`` (0: none; use
        :meth:`Fold.inner` for nested leave-one-patient-out).
    """
    if by != "patient":
        raise StdistillError(f"folds must be by patient, got by={by!r}: other splits leak between train and test")
    sp = _section_patients(data)
    pats = np.array(sorted(set(sp.values)))
    if len(pats) < 2:
        raise StdistillError(f"need at least 2 patients for a patient-level split, got {len(pats)}")
    rng = np.random.default_rng(seed)
    if n_splits is None:
        groups = [[p] for p in pats]
    else:
        if not 2 <= n_splits <= len(pats):
            raise StdistillError(f"n_splits={n_splits} must be between 2 and the number of patients ({len(pats)})")
        order = rng.permutation(pats)
        groups = [sorted(g.tolist()) for g in np.array_split(order, n_splits)]
    out = []
    for g in groups:
        test = tuple(s for s in sp.index if sp[s] in g)
        rest = [p for p in pats if p not in g]
        val_p = set(rng.choice(rest, size=min(n_val_patients, len(rest) - 1), replace=False)) if n_val_patients else set()
        val = tuple(s for s in sp.index if sp[s] in val_p)
        train = tuple(s for s in sp.index if sp[s] not in g and sp[s] not in val_p)
        out.append(Fold(name=f"{prefix}{'+'.join(g)}", train=train, test=test, val=val, patients=sp.to_dict()))
    return out


def train_val_sections(
    adata: ad.AnnData, train_sections: Sequence[str] | None, val_sections: Sequence[str] | None,
) -> tuple[ad.AnnData, ad.AnnData | None, np.ndarray]:
    """``(train AnnData, validation AnnData or None, (n_obs,) bool mask of the training rows)``.

    ``train_sections=None``: every section not in ``val_sections``. Train and validation must not
    share a patient (:func:`check_split`).
    """
    from ..io._section import sections, subset_sections

    val = list(val_sections or [])
    train = list(train_sections or [s for s in sections(adata) if s not in set(val)])
    if val:
        check_split(train, val, dict(zip(adata.obs[SECTION_KEY].astype(str), adata.obs[PATIENT_KEY].astype(str))))
    mask = adata.obs[SECTION_KEY].astype(str).isin(train).to_numpy()
    return subset_sections(adata, train), subset_sections(adata, val) if val else None, mask
