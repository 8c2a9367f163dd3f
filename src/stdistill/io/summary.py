"""``stdistill info``: load anything we read, and summarise it one line per section."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import StdistillError
from .._keys import Key
from ._section import PATIENT_KEY, SECTION_KEY, SPATIAL_KEY, library, sections

DATASETS = ("her2st", "simulated", "mob")
#: obs columns and obsm keys shown as labels when present.
LABEL_OBS = ("pathology", "niche", "cluster", "label", "region", "cell_type")
LABEL_OBSM = ("celltype_props", "niche_probs")


def load_any(path_or_name: str | os.PathLike) -> ad.AnnData:
    """Load and validate an ``.h5ad`` file, a Space Ranger ``outs/`` folder, a her2st copy, or a dataset name.

    The one loader of every command: whatever it returns passed :func:`stdistill.io.validate`
    (raw integer counts, finite coordinates, ``obs["section"]``/``obs["patient"]``, microns per
    pixel, spots inside their image), and every refusal is one StdistillError naming the input.

    Names: ``"her2st"`` (:func:`stdistill.datasets.her2st`), ``"simulated"``
    (:func:`stdistill.datasets.simulated`, default arguments), ``"mob"``
    (:func:`stdistill.datasets.mob`). An existing path wins over a name.
    """
    p = Path(path_or_name).expanduser()
    name = str(path_or_name)
    if p.exists():
        if p.is_file():
            if p.suffix.lower() == ".h5ad":
                from .h5ad import read_h5ad

                return read_h5ad(p)
            raise StdistillError("not an .h5ad file (stdistill reads .h5ad files, Visium outs/ or her2st folders, "
                                 f"and the dataset names {', '.join(DATASETS)})", p)
        if p.suffix.lower() == ".h5ad":
            raise StdistillError(".h5ad file expected, but this is a directory", p)
        if (p / "outs" / "spatial").is_dir():
            p = p / "outs"
        if (p / "spatial").is_dir():
            from .visium import read_visium

            return read_visium(p)
        if (p / "data" / "ST-cnts").is_dir() or (p / "her2st" / "data" / "ST-cnts").is_dir():
            from ..datasets.her2st import her2st

            return her2st(root=p)
        if (p / "derived").is_dir() and p.name.startswith("mob"):
            from ..datasets.mob import mob

            return mob(root=p)
        raise StdistillError("folder is neither a Space Ranger outs/ folder nor a her2st copy", p)
    if name.lower() in DATASETS:
        import importlib

        mod = importlib.import_module(f"..datasets.{name.lower()}", __package__)
        adata = getattr(mod, name.lower())()
        adata.uns.setdefault(Key.uns.dataset, name.lower())  # so that "simulated" shows wherever it is summarised
        return adata
    raise StdistillError(f"no such file or folder, and not a dataset name ({', '.join(DATASETS)})", name)


def _inside(xy: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return np.zeros(len(xy), bool)
    w, h = size
    return (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)


def _size(lib: dict) -> tuple[int, int] | None:
    """Image size from the layout, or from the image file's header (never decodes the image)."""
    from .h5ad import _image_size

    meta, images = lib.get("metadata", {}), lib.get("images", {})
    if "fullres" not in images and "source_image_path" not in meta:
        return None
    return _image_size(lib)


def section_table(adata: ad.AnnData) -> pd.DataFrame:
    """One row per section: the numbers :func:`summarise` prints (also handy in tests and scripts)."""
    rows = []
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    xy_all = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    X = sp.csr_matrix(adata.X) if not sp.issparse(adata.X) else adata.X.tocsr()
    totals = np.asarray(X.sum(axis=1)).ravel()
    secs = sections(adata)
    # genes detected per section: (sections x spots indicator) @ (spots x genes, counts > 0)
    code = pd.Categorical(sec, categories=secs).codes
    member = sp.csr_matrix((np.ones(len(sec)), (code, np.arange(len(sec)))), shape=(len(secs), len(sec)))
    detected = X.copy()
    detected.data = (detected.data > 0).astype(np.float64)
    genes_per_section = np.diff((member @ detected).tocsr().indptr)
    for k, s in enumerate(secs):
        m = sec == s
        lib = library(adata, s)
        size = _size(lib)
        has_counts = totals[m] > 0 if adata.n_vars else np.ones(int(m.sum()), bool)  # H&E-only tiles
        inside = _inside(xy_all[m], size) & has_counts
        genes = int(genes_per_section[k])
        labels = []
        for col in LABEL_OBS:
            if col in adata.obs:
                n = int(adata.obs[col][m].notna().sum())
                if n:
                    labels.append(f"{col} ({n})")
        for key in LABEL_OBSM:
            if key in adata.obsm:
                v = adata.obsm[key]
                arr = np.asarray(v.to_numpy() if isinstance(v, pd.DataFrame) else v, dtype=float)[m]
                n = int(np.isfinite(arr).all(axis=1).sum())
                if n:
                    labels.append(f"{key} ({n})")
        patient = pd.unique(adata.obs[PATIENT_KEY][m].astype(str))
        rows.append(
            {
                "section": s,
                "patient": ",".join(patient),
                "spots": int(m.sum()),
                "genes": genes,
                "microns_per_pixel": float(lib["scalefactors"].get("microns_per_pixel", np.nan)),
                "image_px": None if size is None else f"{size[0]} x {size[1]}",
                "spots_inside": int(inside.sum()),
                "fraction_inside": float(inside.mean()) if size is not None else np.nan,
                "labels": ", ".join(labels),
            }
        )
    return pd.DataFrame(rows)


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def summarise(adata: ad.AnnData, console=None, title: str | None = None) -> pd.DataFrame:
    """Print a rich table of the sections in ``adata`` and return it as a DataFrame.

    Columns: section, patient, spots, genes detected, microns per pixel (of the image frame
    ``obsm["spatial"]`` refers to), image size in pixels (or "no image"), spots with counts whose
    centre lies inside the image, that fraction, and labels present (non-missing counts).
    """
    from rich.console import Console
    from rich.table import Table

    df = section_table(adata)
    ds = adata.uns.get(Key.uns.dataset)
    shape = f"{adata.n_obs} spots x {adata.n_vars} genes"
    counts = f"{_n(len(df), 'section')}, {_n(df['patient'].nunique(), 'patient')}"
    title = title or (f"{ds}: " if isinstance(ds, str) else "") + f"{shape}, {counts}"
    table = Table(title=title)
    for col, just in (
        ("section", "left"),
        ("patient", "left"),
        ("spots", "right"),
        ("genes detected", "right"),
        ("um/px", "right"),
        ("image (px)", "right"),
        ("spots with counts+image", "right"),
        ("inside", "right"),
        ("labels", "left"),
    ):
        table.add_column(col, justify=just)
    for r in df.itertuples():
        table.add_row(
            r.section,
            r.patient,
            str(r.spots),
            str(r.genes),
            f"{r.microns_per_pixel:.3f}",
            r.image_px or "no image",
            str(r.spots_inside) if r.image_px else "-",
            f"{r.fraction_inside:.0%}" if r.image_px else "-",
            r.labels or "-",
        )
    (console or Console(width=max(150, Console().width))).print(table)
    return df
