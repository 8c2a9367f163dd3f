"""Patient-level splits. Train and test never share a patient; entry points check it.

``folds(adata, by="spatial")`` is the one exception, for a user with a single section: contiguous
spatial blocks with a margin, a weaker check than held-out patients (it warns so)."""

from __future__ import annotations

import warnings
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


class WeakSplitWarning(UserWarning):
    """A split whose train and test share a patient (spatial blocks of one section)."""


@dataclass(frozen=True)
class SpotFold:
    """One spatial split of a single section, as spot ids (``obs_names``).

    ``dropped``: spots outside the test block but within ``margin_um`` of a test spot, removed
    from training so no training neighbourhood overlaps a test spot."""

    name: str
    section: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    dropped: tuple[str, ...]
    margin_um: float


#: Spatial blocks when ``folds(by="spatial")`` gets no ``n_splits``.
SPATIAL_BLOCKS = 4


def spatial_folds(adata: ad.AnnData, n_splits: int | None = None, radius_um: float | None = None,
                  prefix: str = "") -> list[SpotFold]:
    """Contiguous spatial blocks of one section as folds, with a margin of one neighbourhood radius.

    The section is cut into ``n_splits`` strips of equal spot counts along its longer axis; each
    strip is a test block once. Training spots within ``radius_um`` of any test spot are dropped.
    Train and test still share the patient, the tissue and the slide's staining: this is a weaker
    check than patient-level folds and warns (:class:`WeakSplitWarning`).

    Parameters
    ----------
    radius_um
        Margin in um (default: the neighbourhood radius the niche models use,
        :func:`stdistill.pp.neighbors.radius_for_neighbors` with ``N_NEIGHBORS`` spots).
    """
    from .._defaults import N_NEIGHBORS
    from ..io._section import spatial_um
    from .neighbors import radius_for_neighbors

    secs = adata.obs[SECTION_KEY].astype(str).unique() if SECTION_KEY in adata.obs else []
    if len(secs) != 1:
        raise StdistillError(f'by="spatial" splits one section, got {len(secs)}; subset to one '
                             '(io.subset_sections) or split by="patient"')
    k = SPATIAL_BLOCKS if n_splits is None else int(n_splits)
    if not 2 <= k <= adata.n_obs // 2:
        raise StdistillError(f"n_splits={k} spatial blocks must be between 2 and half the spots ({adata.n_obs // 2})")
    margin = float(radius_for_neighbors(adata, N_NEIGHBORS) if radius_um is None else radius_um)
    if not (np.isfinite(margin) and margin >= 0):
        raise StdistillError(f"radius_um must be >= 0 (micrometres), got {radius_um}")
    xy = spatial_um(adata)
    axis = int(np.argmax(np.ptp(xy, axis=0)))
    blocks = np.array_split(np.argsort(xy[:, axis], kind="stable"), k)
    names = adata.obs_names.astype(str)
    out = []
    for i, test in enumerate(blocks):
        rest = np.setdiff1d(np.arange(adata.n_obs), test)
        near = _within(xy[rest], xy[test], margin)
        if near.all():
            raise StdistillError(f"a margin of {margin:.0f} um leaves no training spots for block {i}; "
                                 "use fewer blocks or a smaller radius_um")
        out.append(SpotFold(name=f"{prefix}{secs[0]}/block{i}", section=str(secs[0]), train=tuple(names[rest[~near]]),
                            test=tuple(names[np.sort(test)]), dropped=tuple(names[rest[near]]), margin_um=margin))
    warnings.warn(f"folds(by='spatial'): {k} blocks of section {secs[0]!r} share its patient; a weaker check than "
                  f"patient-level folds (margin {margin:.0f} um dropped from training)", WeakSplitWarning, stacklevel=3)
    return out


def _within(a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """(len(a),) bool: the point of ``a`` lies within ``r`` of some point of ``b``."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(b).query(a, k=1)
    return d <= r


def folds(
    data,
    by: str = "patient",
    n_splits: int | None = None,
    n_val_patients: int = 0,
    seed: int = 0,
    prefix: str = "",
    radius_um: float | None = None,
) -> list[Fold] | list[SpotFold]:
    """Patient-level folds over sections (or, ``by="spatial"``, spatial blocks of one section).

    Parameters
    ----------
    data
        AnnData (``obs["section"]``, ``obs["patient"]``), a list of them, or section -> patient.
    by
        ``"patient"``; or ``"spatial"`` for one section only: :func:`spatial_folds` (contiguous
        blocks, a margin of ``radius_um`` dropped from training; the weaker check, and it warns).
        Section-level splits are refused: they leak patient identity.
    n_splits
        ``None``: leave-one-patient-out. Otherwise k folds of whole patients (seeded shuffle).
    n_val_patients
        Patients taken from each fold's training patients into ``val`` (0: none; use
        :meth:`Fold.inner` for nested leave-one-patient-out).
    radius_um
        ``by="spatial"`` only: the margin in um (default: the niche models' neighbourhood radius).
    """
    if by == "spatial":
        if not isinstance(data, ad.AnnData) or n_val_patients:
            raise StdistillError('by="spatial" takes one section\'s AnnData and no n_val_patients')
        return spatial_folds(data, n_splits=n_splits, radius_um=radius_um, prefix=prefix)
    if by != "patient":
        raise StdistillError(f"folds must be by patient (or by='spatial' within one section), got by={by!r}: "
                             "other splits leak between train and test")
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
