"""Survival cohorts: one row per patient, a bag of instance features per slide, optional RNA per patient.

The data model of the slide-level survival recipe (AMKD):

- ``Cohort.table``: DataFrame indexed by patient id (str, index name ``"patient"``) with ``time``
  (float64, >= 0, any unit) and ``event`` (int 0/1: 1 = the event was observed, 0 = censored),
  plus any clinical columns.
- ``Cohort.bags``: ``{slide id: (n_instances, d) float32}``, the patch features of each slide
  (from :func:`stdistill.pp.tile` + :func:`stdistill.features.extract`, or the ``.h5`` files
  TRIDENT and CLAM write). ``Cohort.slide_patient`` maps each slide to its patient; a patient's
  bag is the concatenation of its slides' instances.
- ``Cohort.rna``: optional DataFrame (patients x genes, float64), the bulk transcriptome.
- ``Cohort.coords``: optional ``{slide: (n_instances, 2)}`` instance positions (pixels);
  ``Cohort.instance_ids``: optional ``{slide: (n_instances,) str}`` (tile AnnData ``obs_names``).

Readers take files in the layouts the field writes and raise :class:`~stdistill.StdistillError`
with a one-line message naming the file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .._api import renamed_kwargs
from .._errors import StdistillError
from .._keys import Key

__all__ = ["Cohort", "cohort_from_tiles", "find_bags", "read_bag", "read_clinical", "read_cohort", "read_rna"]

TIME, EVENT, PATIENT = "time", "event", "patient"


@dataclass
class Cohort:
    """A survival cohort (see the module docstring for the layout). Validated on construction."""

    table: pd.DataFrame
    bags: dict[str, np.ndarray]
    slide_patient: dict[str, str]
    rna: pd.DataFrame | None = None
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    instance_ids: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.table.copy()
        t.index = pd.Index(t.index.astype(str), name=PATIENT)
        for c in (TIME, EVENT):
            if c not in t.columns:
                raise StdistillError(f"cohort table has no {c!r} column (has {list(t.columns)[:6]})")
        if t.index.has_duplicates:
            raise StdistillError(f"cohort table repeats patients {sorted(set(t.index[t.index.duplicated()]))[:3]}")
        t[TIME] = pd.to_numeric(t[TIME], errors="coerce").astype(np.float64)
        ev = pd.to_numeric(t[EVENT], errors="coerce")
        if not (np.isfinite(t[TIME]).all() and (t[TIME] >= 0).all()):
            raise StdistillError("cohort times must be finite and >= 0")
        if not ev.isin([0, 1]).all():
            raise StdistillError("cohort events must be 0 (censored) or 1 (event)")
        t[EVENT] = ev.astype(np.int64)
        self.table = t
        self.slide_patient = {str(s): str(p) for s, p in self.slide_patient.items()}
        self.bags = {str(s): np.asarray(b, dtype=np.float32) for s, b in self.bags.items()}
        dims = {b.shape[1] for b in self.bags.values() if b.ndim == 2}
        if any(b.ndim != 2 or len(b) == 0 for b in self.bags.values()) or len(dims) > 1:
            raise StdistillError(f"every bag must be a non-empty (n_instances, d) array with one d (got d = {sorted(dims)})")
        missing = [p for p in t.index if p not in set(self.slide_patient.values())]
        if missing and self.bags:  # a cohort without any bag (genomics/clinical only) is allowed
            raise StdistillError(f"{len(missing)} patients have no slide (e.g. {missing[:3]})")
        unknown = [s for s in self.slide_patient if s not in self.bags]
        if unknown:
            raise StdistillError(f"slides without features: {unknown[:3]}")
        if self.rna is not None:
            self.rna = self.rna.copy()
            self.rna.index = self.rna.index.astype(str)
            self.rna = self.rna.reindex(t.index).astype(np.float64)

    # ------------------------------------------------------------------ access
    @property
    def patients(self) -> list[str]:
        return list(self.table.index)

    @property
    def time(self) -> np.ndarray:
        return self.table[TIME].to_numpy(np.float64)

    @property
    def event(self) -> np.ndarray:
        return self.table[EVENT].to_numpy(np.int64)

    @property
    def n_features(self) -> int:
        """d of the instance features (0 for a cohort without bags)."""
        return int(next(iter(self.bags.values())).shape[1]) if self.bags else 0

    def slides_of(self, patient: str) -> list[str]:
        """The patient's slides, sorted."""
        return sorted(s for s, p in self.slide_patient.items() if p == patient)

    def bag(self, patient: str) -> np.ndarray:
        """(n_instances, d) float32: the concatenated instances of the patient's slides."""
        slides = self.slides_of(patient)
        if not slides:
            raise StdistillError(f"patient {patient!r} has no slide features")
        return np.concatenate([self.bags[s] for s in slides])

    def subset(self, patients: Iterable[str]) -> Cohort:
        """The cohort restricted to ``patients`` (in that order); bags are shared, not copied."""
        pats = [str(p) for p in patients]
        unknown = [p for p in pats if p not in self.table.index]
        if unknown:
            raise StdistillError(f"unknown patients {unknown[:3]}")
        keep = {s: p for s, p in self.slide_patient.items() if p in set(pats)}
        return replace(self, table=self.table.loc[pats], bags={s: self.bags[s] for s in keep}, slide_patient=keep,
                       rna=None if self.rna is None else self.rna.loc[pats],
                       coords={s: v for s, v in self.coords.items() if s in keep},
                       instance_ids={s: v for s, v in self.instance_ids.items() if s in keep}, meta=dict(self.meta))

    def without_rna(self) -> Cohort:
        """The same cohort with no transcriptome (what an H&E-only model sees)."""
        return replace(self, rna=None)

    def __repr__(self) -> str:
        rna = "no RNA" if self.rna is None else f"RNA {self.rna.shape[1]} genes"
        return (f"Cohort({len(self.table)} patients, {int(self.event.sum())} events, {len(self.bags)} slides, "
                f"d={self.n_features}, {rna})")


# ---------------------------------------------------------------------------------- readers
def _read_table(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise StdistillError(f"{what} file not found", path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") or path.name.endswith((".tsv.gz", ".txt.gz")) else ","
    try:
        return pd.read_csv(path, sep=sep, comment=None)
    except Exception as e:
        raise StdistillError(f"cannot read the {what} table ({type(e).__name__}: {str(e).splitlines()[0]})", path) from None


def _events(v: pd.Series, path) -> pd.Series:
    """0/1 from numbers, booleans or cBioPortal-style strings ("1:DECEASED", "0:LIVING")."""
    if v.dtype == bool:
        return v.astype(float)
    s = v.astype(str).str.strip().str.split(":").str[0].str.lower()
    s = s.replace({"true": "1", "false": "0", "dead": "1", "deceased": "1", "alive": "0", "living": "0", "nan": ""})
    out = pd.to_numeric(s, errors="coerce")
    bad = out.notna() & ~out.isin([0, 1])
    if bad.any():
        raise StdistillError(f"event values must be 0/1 (or 1:DECEASED / 0:LIVING), got {sorted(set(v[bad].astype(str)))[:3]}", path)
    return out


def read_clinical(path: str | os.PathLike, *, patient_col: str = PATIENT, time_col: str = TIME,
                  event_col: str = EVENT) -> pd.DataFrame:
    """A clinical table (CSV, or TSV for ``.tsv``/``.txt``), one row per patient.

    Returns a DataFrame indexed by patient (str) with ``time`` (float64) and ``event`` (0/1) plus
    the other columns as read. Rows with a missing time or event are dropped with a warning.
    """
    p = Path(path)
    df = _read_table(p, "clinical")
    for c in (patient_col, time_col, event_col):
        if c not in df.columns:
            raise StdistillError(f"no {c!r} column (has {list(df.columns)[:8]}); pass the column names", p)
    df = df.rename(columns={time_col: TIME, event_col: EVENT})
    df[TIME] = pd.to_numeric(df[TIME], errors="coerce")
    df[EVENT] = _events(df[EVENT], p)
    bad = df[TIME].isna() | df[EVENT].isna()
    if bad.all():
        raise StdistillError("no row has both a time and an event", p)
    if bad.any():
        warnings.warn(f"{p}: dropped {int(bad.sum())} patients without time or event", stacklevel=2)
    df = df.loc[~bad].copy()
    if (df[TIME] < 0).any():
        raise StdistillError("times must be >= 0", p)
    df[PATIENT] = df[patient_col].astype(str)
    if df[PATIENT].duplicated().any():
        raise StdistillError(f"patients repeat: {sorted(set(df.loc[df[PATIENT].duplicated(), PATIENT]))[:3]}", p)
    df = df.drop(columns=[patient_col] if patient_col != PATIENT else []).set_index(PATIENT)
    df[EVENT] = df[EVENT].astype(np.int64)
    return df


def read_bag(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """One slide's instance features: ``(features (n, d) float32, coords (n, 2) or None)``.

    ``.h5`` as TRIDENT (``features_<encoder>/<slide>.h5``) and CLAM (``h5_files/<slide>.h5``) write
    it: datasets ``features`` ((n, d), or (1, n, d)) and optionally ``coords`` (n, 2), level-0
    pixels. ``.pt`` (CLAM ``pt_files``): a tensor of (n, d), read with ``weights_only=True``.
    """
    p = Path(path)
    if not p.is_file():
        raise StdistillError("feature file not found", p)
    coords = None
    try:
        if p.suffix == ".pt":
            import torch

            feats = torch.load(p, map_location="cpu", weights_only=True)
            feats = feats.float().numpy() if hasattr(feats, "numpy") else np.asarray(feats)
        else:
            import h5py

            with h5py.File(p, "r") as f:
                if "features" not in f:
                    raise StdistillError(f"no 'features' dataset (has {list(f.keys())[:5]})", p)
                feats = f["features"][()]
                coords = f["coords"][()] if "coords" in f else None
    except StdistillError:
        raise
    except Exception as e:
        raise StdistillError(f"cannot read features ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", p) from None
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2 or len(feats) == 0:
        raise StdistillError(f"features must be a non-empty (n_patches, d) array, got shape {feats.shape}", p)
    if not np.isfinite(feats).all():
        raise StdistillError("features contain NaN or infinite values", p)
    if coords is not None:
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, coords.shape[-1])
        if coords.shape != (len(feats), 2):
            raise StdistillError(f"coords shape {coords.shape} does not match {len(feats)} patches x 2", p)
    return feats, coords


def find_bags(features: str | os.PathLike) -> dict[str, Path]:
    """``{slide id: feature file}`` in a folder: its ``*.h5``/``*.pt`` files, or those of a CLAM
    ``h5_files/`` sub-folder or of the single TRIDENT ``features_<encoder>/`` sub-folder in it."""
    p = Path(features)
    if not p.is_dir():
        raise StdistillError("features folder not found", p)
    subs = sorted(d for d in p.glob("features_*") if d.is_dir())
    if len(subs) > 1:
        raise StdistillError(f"several encoders' features here ({', '.join(d.name for d in subs)}): pass one of them", p)
    for cand in ([subs[0]] if subs else []) + [p / "h5_files", p / "pt_files", p]:
        files = sorted(f for ext in ("*.h5", "*.pt") for f in cand.glob(ext)) if cand.is_dir() else []
        if files:
            out = {}
            for f in files:  # .h5 wins over .pt for the same slide
                out.setdefault(f.stem, f)
            return out
    raise StdistillError("no .h5 or .pt feature files (TRIDENT features_<encoder>/ or CLAM h5_files/)", p)


def _match_prefix(ids: Sequence[str], patients: Sequence[str]) -> dict[str, str]:
    """``{id: patient}`` for ids equal to, or starting with, a patient id (the longest wins): TCGA
    slide and sample barcodes start with the 12-character patient barcode."""
    pats = sorted(set(patients), key=len, reverse=True)
    exact = set(patients)
    out = {}
    for i in ids:
        if i in exact:
            out[i] = i
            continue
        hit = next((p for p in pats if i.startswith(p)), None)
        if hit is not None:
            out[i] = hit
    return out


def read_rna(path: str | os.PathLike, patients: Sequence[str] | None = None, *, orient: str = "auto") -> pd.DataFrame:
    """A bulk RNA table as patients x genes (float64).

    The file (CSV, or TSV for ``.tsv``/``.txt``) has ids in its first column and a header row.
    ``orient``: ``"patients"`` (rows are patients), ``"genes"`` (rows are genes, as TCGA/cBioPortal
    matrices are) or ``"auto"`` (the axis whose labels match more of ``patients``; without
    ``patients``, rows are patients). Sample ids that start with a patient id (TCGA sample
    barcodes) are mapped to that patient; when a patient has several samples, the first in sorted
    order is kept (``-01`` primary tumour before ``-11`` normal). Repeated gene names are averaged.
    """
    p = Path(path)
    df = _read_table(p, "RNA")
    if df.shape[1] < 2:
        raise StdistillError("RNA table needs an id column and at least one more column", p)
    df = df.set_index(df.columns[0])
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    if orient not in ("auto", "patients", "genes"):
        raise StdistillError(f"orient must be 'auto', 'patients' or 'genes', got {orient!r}")
    if orient == "auto" and patients is not None:
        by_col = len(_match_prefix(list(df.columns), patients))
        orient = "genes" if by_col > len(_match_prefix(list(df.index), patients)) else "patients"
    if orient == "genes":
        df = df.T
    try:
        df = df.apply(pd.to_numeric, errors="raise").astype(np.float64)
    except (ValueError, TypeError):
        raise StdistillError("RNA values must be numbers (is the orientation right? orient='patients'|'genes')", p) from None
    if df.columns.has_duplicates:
        df = df.T.groupby(level=0, sort=False).mean().T
    if patients is not None:
        m = _match_prefix(sorted(df.index), patients)
        if not m:
            raise StdistillError(f"no RNA sample matches a patient id (e.g. {list(df.index)[:2]} vs {list(patients)[:2]})", p)
        first = {}
        for sample in sorted(m):
            first.setdefault(m[sample], sample)
        df = df.loc[list(first.values())]
        df.index = pd.Index(list(first.keys()), name=PATIENT)
    return df


def read_cohort(clinical: str | os.PathLike | pd.DataFrame, features: str | os.PathLike,
                rna: str | os.PathLike | pd.DataFrame | None = None, *, slide_col: str = "slide",
                patient_col: str = PATIENT, time_col: str = TIME, event_col: str = EVENT,
                rna_orient: str = "auto") -> Cohort:
    """A :class:`Cohort` from a clinical table, a folder of feature files and an optional RNA table.

    Slides (feature files, see :func:`find_bags`) are assigned to patients by the table's
    ``slide_col`` column when it exists (slide ids, several separated by ``;``), else by name: a
    slide whose id equals or starts with a patient id (TCGA ``TCGA-XX-XXXX-01Z-00-DX1`` ->
    ``TCGA-XX-XXXX``). Patients without a slide are dropped with a warning; so are RNA samples
    of no listed patient.
    """
    table = clinical if isinstance(clinical, pd.DataFrame) else read_clinical(
        clinical, patient_col=patient_col, time_col=time_col, event_col=event_col)
    files = find_bags(features)
    if slide_col in table.columns:
        sp = {s.strip(): str(pid) for pid, v in table[slide_col].dropna().items() for s in str(v).split(";") if s.strip()}
        absent = [s for s in sp if s not in files]
        if absent:
            raise StdistillError(f"{len(absent)} slides of column {slide_col!r} have no feature file (e.g. {absent[:2]})", features)
    else:
        sp = _match_prefix(list(files), list(table.index))
    if not sp:
        raise StdistillError(f"no feature file matches a patient (e.g. {list(files)[:2]} vs {list(table.index)[:2]})", features)
    keep = [p for p in table.index if p in set(sp.values())]
    if len(keep) < len(table):
        warnings.warn(f"{len(table) - len(keep)} patients have no slide and were dropped", stacklevel=2)
    bags, coords = {}, {}
    for s in sp:
        bags[s], c = read_bag(files[s])
        if c is not None:
            coords[s] = c
    rna_df = None
    if rna is not None:
        rna_df = rna if isinstance(rna, pd.DataFrame) else read_rna(rna, keep, orient=rna_orient)
    return Cohort(table.loc[keep], bags, sp, rna=rna_df, coords=coords, meta={"features": str(features)})


@renamed_kwargs(features_key="feature_key")
def cohort_from_tiles(tiles, table: pd.DataFrame, rna: pd.DataFrame | None = None, *,
                      feature_key: str | None = None) -> Cohort:
    """A :class:`Cohort` from tile AnnData (:func:`stdistill.pp.tile` + :func:`stdistill.features.extract`,
    one or several slides concatenated): slide = ``obs["section"]``, patient = ``obs["patient"]``,
    instances = ``obsm[feature_key]`` (default: the only ``X_*`` key), coords = ``obsm["spatial"]``.
    ``table`` is indexed by patient with ``time`` and ``event`` (e.g. from :func:`read_clinical`).
    ``feature_key`` was ``features_key`` (still accepted for one release)."""
    from ._section import PATIENT_KEY, SECTION_KEY, SPATIAL_KEY

    keys = [k for k in tiles.obsm if k.startswith("X_")]
    if feature_key is None:
        if len(keys) != 1:
            raise StdistillError(f"pass feature_key= (tile features found: {keys or 'none; run features.extract'})")
        feature_key = keys[0]
    if feature_key not in tiles.obsm:
        raise StdistillError(f'no obsm["{feature_key}"]: run stdistill.features.extract first')
    X = np.asarray(tiles.obsm[feature_key], dtype=np.float32)
    sec = tiles.obs[SECTION_KEY].astype(str).to_numpy()
    pat = tiles.obs[PATIENT_KEY].astype(str).to_numpy()
    bags, sp, coords, ids = {}, {}, {}, {}
    for s in pd.unique(sec):
        m = sec == s
        bags[s], sp[s], ids[s] = X[m], str(pat[m][0]), tiles.obs_names.to_numpy()[m].astype(str)
        coords[s] = np.asarray(tiles.obsm[SPATIAL_KEY], dtype=np.float64)[m]
    table = table.copy()
    table.index = table.index.astype(str)
    keep = [p for p in table.index if p in set(sp.values())]
    if 0 < len(keep) < len(table):
        warnings.warn(f"{len(table) - len(keep)} patients have no tiles and were dropped", stacklevel=2)
    if not keep:
        raise StdistillError(f"no patient of the table has tiles (tiles: {sorted(set(pat))[:3]}, table: {list(table.index)[:3]})")
    sp = {s: p for s, p in sp.items() if p in set(keep)}
    return Cohort(table.loc[keep], {s: bags[s] for s in sp}, sp, rna=rna, coords={s: coords[s] for s in sp},
                  instance_ids={s: ids[s] for s in sp},
                  meta={"feature_key": feature_key, "features_record": tiles.uns.get(Key.uns.features, {}).get(feature_key)})
