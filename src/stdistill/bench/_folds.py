"""Patient-level folds of :func:`stdistill.bench.expression`: HEST's split files, k folds or given splits."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import pandas as pd

from .._errors import StdistillError
from ..io._section import PATIENT_KEY, SECTION_KEY
from ..pp.splits import Fold, check_split, folds as _make_folds

__all__ = ["read_hest_splits"]


def read_hest_splits(path: str | os.PathLike, adata: ad.AnnData, sample_column: str = "sample_id") -> list[Fold]:
    """HEST split CSVs (``splits/train_{i}.csv`` / ``test_{i}.csv``, column ``sample_id``) as folds.

    ``sample_id`` values must be section ids of ``adata``; patients come from ``obs["patient"]``,
    and a split whose train and test share a patient is refused.
    """
    d = Path(path)
    if not d.is_dir():
        raise StdistillError("HEST splits folder does not exist", d)
    pats = _patients(adata)
    out = []
    i = 0
    while (d / f"train_{i}.csv").is_file() and (d / f"test_{i}.csv").is_file():
        parts = {}
        for part in ("train", "test"):
            f = d / f"{part}_{i}.csv"
            df = pd.read_csv(f)
            if sample_column not in df.columns:
                raise StdistillError(f"no {sample_column!r} column (columns: {list(df.columns)})", f)
            ids = df[sample_column].astype(str).tolist()
            unknown = [s for s in ids if s not in pats]
            if unknown:
                raise StdistillError(f"samples {unknown[:3]} are not sections of the data (obs['section'])", f)
            parts[part] = tuple(ids)
        try:
            out.append(Fold(name=f"split{i}", train=parts["train"], test=parts["test"], patients=pats))
        except StdistillError as e:
            raise StdistillError(f"split {i}: {e}", d) from None
        i += 1
    if not out:
        raise StdistillError("no train_0.csv / test_0.csv pair (HEST layout: splits/train_{i}.csv, test_{i}.csv)", d)
    return out


def _patients(adata: ad.AnnData) -> dict[str, str]:
    for k in (SECTION_KEY, PATIENT_KEY):
        if k not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{k}"]; patient-level folds need it')
    g = adata.obs[[SECTION_KEY, PATIENT_KEY]].astype(str).drop_duplicates()
    if g[SECTION_KEY].duplicated().any():
        raise StdistillError("a section is assigned to two patients")
    return dict(zip(g[SECTION_KEY], g[PATIENT_KEY]))


def _resolve_folds(adata: ad.AnnData, folds) -> list[Fold]:
    pats = _patients(adata)
    if folds is None:
        return _make_folds(pd.Series(pats))
    if isinstance(folds, int):
        return _make_folds(pd.Series(pats), n_splits=folds)
    if isinstance(folds, (str, os.PathLike)):
        return read_hest_splits(folds, adata)
    out = []
    for i, f in enumerate(folds):
        if isinstance(f, Fold):
            check_split(f.train + f.val, f.test, pats)
            out.append(f)
        else:  # (train_sections, test_sections)
            tr, te = f
            out.append(Fold(name=f"fold{i}", train=tuple(tr), test=tuple(te), patients=pats))
    if not out:
        raise StdistillError("folds is empty")
    return out
