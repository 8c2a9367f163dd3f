"""The data model: one section = one AnnData; several sections = their concatenation.

Layout (scanpy's Visium layout, plus what distillation needs):

- ``X``: raw integer UMI counts, ``scipy.sparse.csr_matrix`` (spots x genes).
- ``var_names``: unique gene symbols.
- ``obs["section"]``, ``obs["patient"]``: categorical ids. Splits are always by patient.
- ``obsm["spatial"]``: spot centres (x, y) in **full-resolution image pixels**, float64.
- ``uns["spatial"][section]``:
  - ``"scalefactors"``: ``spot_diameter_fullres`` (px), ``tissue_hires_scalef``,
    ``microns_per_pixel`` (um/px of the full-resolution image; required).
  - ``"images"``: ``"hires"`` thumbnail (longer side <= 2000 px, for plots); ``"fullres"``
    only for small in-memory images (simulated data).
  - ``"metadata"``: ``"source_image_path"`` (the full-resolution image on disk, read lazily),
    ``"image_size"`` ``[width, height]`` px. Sections without an image have neither.

Optional, written by readers or recipes: ``obs["pathology"]`` (pathologist label),
``obsm["celltype_props"]`` (DataFrame of cell-type proportions), ``obsm["X_<encoder>"]``
(patch features), ``obs["niche"]`` / ``obsm["niche_probs"]`` (niches).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import StdistillError
from .._keys import Key
from ._image import ArrayImage, ImageReader, open_image

#: the table's names (:mod:`stdistill.keys`), as the readers and checks here use them
SECTION_KEY, PATIENT_KEY, SPATIAL_KEY = Key.obs.section, Key.obs.patient, Key.obsm.spatial
HIRES_MAX = 2000


class DuplicateGenesWarning(UserWarning):
    """Gene names repeated in a counts table; they were made unique (``X``, ``X-1``, ...)."""


def _check_counts(X, source) -> sp.csr_matrix:
    """Raw counts: finite, non-negative integers. Returns CSR int32 (or int64 when large)."""
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    data = X.data
    if data.size:
        if not np.all(np.isfinite(data)):
            raise StdistillError("counts contain NaN or infinite values", source)
        if data.min() < 0:
            raise StdistillError("counts contain negative values; expected raw UMI counts", source)
        if not np.all(np.equal(np.mod(data, 1), 0)):
            raise StdistillError(
                "counts are not integers; expected raw UMI counts (not normalised or log values)", source
            )
    dtype = np.int32 if (not data.size or data.max() < 2**31) else np.int64
    X = X.astype(dtype)
    X.eliminate_zeros()
    return X


def _check_finite_xy(xy: np.ndarray, spots: Sequence[str], source, what: str = "pixel coordinates") -> None:
    """Refuse NaN or infinite spot coordinates, naming how many and one spot."""
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise StdistillError(f"{int(bad.sum())} spots have NaN or infinite {what} (e.g. spot {spots[i]!r})", source)


def join_positions(count_ids: Sequence[str], position_ids: Sequence[str], source) -> None:
    """Refuse spots that have counts but no position, or a position but no counts."""
    c, p = pd.Index(count_ids), pd.Index(position_ids)
    for idx, what in ((c, "counts"), (p, "positions")):
        dup = idx[idx.duplicated()]
        if len(dup):
            raise StdistillError(f"duplicate spot ids in the {what}: {list(dup[:3])}", source)
    no_pos = c.difference(p)
    if len(no_pos):
        raise StdistillError(
            f"{len(no_pos)} spots have counts but no position (e.g. {list(no_pos[:3])})", source
        )
    no_cnt = p.difference(c)
    if len(no_cnt):
        raise StdistillError(
            f"{len(no_cnt)} spots have a position but no counts (e.g. {list(no_cnt[:3])})", source
        )


def _counts_or_empty(counts, genes: Sequence[str], n: int, source):
    """``counts`` checked against ``n`` spots x ``genes``; ``None`` (no genes) becomes an empty (n, 0) matrix."""
    if counts is None:  # H&E only (e.g. pp.tile): no transcriptome, X is an empty (n, 0) matrix
        if len(genes):
            raise StdistillError(f"{len(genes)} genes given but no counts; pass counts= or genes=[]", source)
        return sp.csr_matrix((n, 0), dtype=np.int32)
    if counts.shape != (n, len(genes)):
        raise StdistillError(f"counts shape {counts.shape} does not match {n} spots x {len(genes)} genes", source)
    if len(genes) == 0:
        raise StdistillError("section has no genes", source)
    return counts


def _spot_index(xy: np.ndarray, spots: Sequence[str], source) -> pd.Index:
    """Spot ids as an index, after checking the (n, 2) finite positions and unique ids."""
    if xy.shape != (len(spots), 2):
        raise StdistillError(f"spot positions must be (n_spots, 2) pixel coordinates, got shape {xy.shape}", source)
    _check_finite_xy(xy, spots, source)
    spots_idx = pd.Index(spots, dtype=str)
    if spots_idx.has_duplicates:
        raise StdistillError(f"duplicate spot ids: {list(spots_idx[spots_idx.duplicated()][:3])}", source)
    return spots_idx


def _check_mpp(microns_per_pixel, source) -> None:
    if microns_per_pixel is None:
        raise StdistillError(
            "microns per pixel of the full-resolution image is missing; pass microns_per_pixel=<um/px>, "
            "e.g. 0.5 for a 20x scan",
            source,
        )
    if not (np.isfinite(microns_per_pixel) and microns_per_pixel > 0):
        raise StdistillError(
            f"microns per pixel is {microns_per_pixel!r}; it must be a positive number of um/px "
            "(e.g. 0.5 for a 20x scan)",
            source,
        )


def _gene_table(genes: Sequence[str], source) -> pd.DataFrame:
    """``var`` indexed by the genes; repeated names made unique with a :class:`DuplicateGenesWarning`."""
    var = pd.DataFrame(index=pd.Index(genes, dtype=str))
    if var.index.has_duplicates:
        dup = list(pd.unique(var.index[var.index.duplicated()]))
        shown = ", ".join(dup[:10]) + (f" and {len(dup) - 10} more" if len(dup) > 10 else "")
        warnings.warn(
            f"{source}: {len(dup)} gene names occur more than once ({shown}); made unique by appending "
            "-1, -2, ... (as anndata's var_names_make_unique does)",
            DuplicateGenesWarning,
            stacklevel=4,  # the caller of the reader that called new_section
        )
        var.index = pd.Index(ad.utils.make_index_unique(var.index.to_series().astype(str)))
    return var


def _attach_image(adata: ad.AnnData, image, section: str, source, require_inside: bool) -> None:
    """Attach ``image`` (path, array or reader) and refuse spot centres outside it when ``require_inside``."""
    reader = image if hasattr(image, "read_region") else (
        ArrayImage(image) if isinstance(image, np.ndarray) else open_image(image)
    )
    set_image(adata, reader, section=section)
    if not require_inside:
        return
    xy, w, h = adata.obsm[SPATIAL_KEY], *reader.size
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise StdistillError(
            f"{int(out.sum())} spot centres lie outside the {w}x{h} px image "
            f"(e.g. {adata.obs_names[i]} at x={xy[i, 0]:.0f}, y={xy[i, 1]:.0f}); wrong image or scale?",
            source,
        )


def new_section(
    counts,
    *,
    genes: Sequence[str],
    spots: Sequence[str],
    xy_px: np.ndarray,
    section: str,
    patient: str,
    microns_per_pixel: float | None,
    spot_diameter_um: float,
    image: str | os.PathLike | np.ndarray | ImageReader | None = None,
    obs: pd.DataFrame | None = None,
    source: str | os.PathLike | None = None,
    require_inside: bool = True,
) -> ad.AnnData:
    """Build and validate one section in the stdistill layout.

    Parameters
    ----------
    counts
        (n_spots, n_genes) raw integer counts, dense or sparse; ``None`` (with ``genes=[]``) for an
        H&E-only section (tiles): ``X`` is then an empty (n_spots, 0) matrix.
    genes, spots
        Gene symbols and spot ids (both made unique is *not* done silently for spots).
    xy_px
        (n_spots, 2) spot centres (x, y) in full-resolution image pixels.
    microns_per_pixel
        um/px of the full-resolution image. Required: the message says how to pass it.
    spot_diameter_um
        Physical spot diameter (55 for Visium, 100 for legacy ST).
    image
        Path to the full-resolution image (read lazily), an RGB array, a reader, or None.
    source
        File named in error messages.
    require_inside
        Refuse spot centres outside the image (default). Patches at edges are still padded.
    """
    source = source or section
    xy = np.asarray(xy_px, dtype=np.float64)
    n = len(spots)
    if n == 0:
        raise StdistillError("section is empty (no spots)", source)
    counts = _counts_or_empty(counts, genes, n, source)
    spots_idx = _spot_index(xy, spots, source)
    _check_mpp(microns_per_pixel, source)
    X = _check_counts(counts, source)
    var = _gene_table(genes, source)
    obs_df = pd.DataFrame(index=spots_idx) if obs is None else obs.copy()
    obs_df.index = spots_idx
    obs_df[SECTION_KEY] = pd.Categorical([section] * n)
    obs_df[PATIENT_KEY] = pd.Categorical([patient] * n)
    adata = ad.AnnData(X=X, obs=obs_df, var=var)
    adata.obsm[SPATIAL_KEY] = xy
    lib: dict = {
        "scalefactors": {
            "spot_diameter_fullres": float(spot_diameter_um / microns_per_pixel),
            "microns_per_pixel": float(microns_per_pixel),
            "tissue_hires_scalef": 1.0,
        },
        "images": {},
        "metadata": {},
    }
    adata.uns[SPATIAL_KEY] = {section: lib}
    if image is not None:
        _attach_image(adata, image, section, source, require_inside)
    return adata


def set_image(adata: ad.AnnData, reader: ImageReader, section: str | None = None) -> None:
    """Attach a full-resolution image to ``section``: path (lazy) or in-memory array, plus a hires thumbnail."""
    section = section or only_section(adata)
    lib = adata.uns[SPATIAL_KEY][section]
    thumb, scale = reader.thumbnail(HIRES_MAX)
    lib["images"] = {"hires": np.ascontiguousarray(thumb)}
    lib["scalefactors"]["tissue_hires_scalef"] = float(scale)
    lib["metadata"]["image_size"] = [int(reader.size[0]), int(reader.size[1])]
    if reader.path:
        lib["metadata"]["source_image_path"] = str(Path(reader.path).resolve())
    else:
        lib["images"]["fullres"] = reader.array  # type: ignore[attr-defined]


def sections(adata: ad.AnnData) -> list[str]:
    """Section ids in order of first appearance."""
    if SECTION_KEY not in adata.obs:
        raise StdistillError(f'AnnData has no obs["{SECTION_KEY}"]; read it with stdistill.io')
    return list(pd.unique(adata.obs[SECTION_KEY].astype(str)))


def only_section(adata: ad.AnnData) -> str:
    s = sections(adata)
    if len(s) != 1:
        raise StdistillError(f"expected one section, got {len(s)}: pass section=")
    return s[0]


def library(adata: ad.AnnData, section: str) -> dict:
    try:
        return adata.uns[SPATIAL_KEY][section]
    except KeyError:
        raise StdistillError(f'section {section!r} has no uns["spatial"][{section!r}] entry') from None


def microns_per_pixel(adata: ad.AnnData, section: str | None = None) -> float:
    """um/px of ``section``'s full-resolution image."""
    section = section or only_section(adata)
    mpp = library(adata, section)["scalefactors"].get("microns_per_pixel")
    if mpp is None:
        raise StdistillError(
            f"section {section!r} has no microns per pixel; set "
            f'adata.uns["spatial"][{section!r}]["scalefactors"]["microns_per_pixel"]'
        )
    return float(mpp)


def has_image(adata: ad.AnnData, section: str | None = None) -> bool:
    section = section or only_section(adata)
    lib = library(adata, section)
    return "source_image_path" in lib.get("metadata", {}) or "fullres" in lib.get("images", {})


def image(adata: ad.AnnData, section: str | None = None) -> ImageReader:
    """The lazy full-resolution image reader of ``section`` (opened once, then reused)."""
    section = section or only_section(adata)
    lib = library(adata, section)
    if "fullres" in lib.get("images", {}):
        return ArrayImage(np.asarray(lib["images"]["fullres"]))
    if "source_image_path" in lib.get("metadata", {}):
        path = lib["metadata"]["source_image_path"]
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            raise StdistillError("image file does not exist (moved since the section was read?)", path) from None
        return _open_cached(path, mtime)
    raise StdistillError(f"section {section!r} has no H&E image")


@functools.lru_cache(maxsize=8)
def _open_cached(path: str, mtime: int) -> ImageReader:
    """Readers are reused across calls so that a JPEG is decoded once per process."""
    return open_image(path)


def spatial_um(adata: ad.AnnData) -> np.ndarray:
    """(n_obs, 2) spot centres in micrometres (pixels x each section's um/px)."""
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    out = np.empty_like(xy)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    for s in sections(adata):
        m = sec == s
        out[m] = xy[m] * microns_per_pixel(adata, s)
    return out


def concat(adatas: Sequence[ad.AnnData], join: str = "outer") -> ad.AnnData:
    """Concatenate sections (genes outer-joined with zero counts), keeping every ``uns["spatial"]`` entry."""
    if not adatas:
        raise StdistillError("no sections to concatenate")
    spatial: dict = {}
    for a in adatas:
        spatial.update(a.uns.get(SPATIAL_KEY, {}))
    names = pd.Index(np.concatenate([a.obs_names.to_numpy() for a in adatas]))
    if names.has_duplicates:  # spot ids repeat across sections: prefix them with the section id
        renamed = []
        for a in adatas:
            a = a.copy()
            a.obs_names = (a.obs[SECTION_KEY].astype(str) + "_" + a.obs_names.astype(str)).to_numpy()
            renamed.append(a)
        adatas = renamed
    out = ad.concat(list(adatas), join=join, merge="first", fill_value=0, index_unique=None)
    for k in (SECTION_KEY, PATIENT_KEY):
        out.obs[k] = pd.Categorical(out.obs[k].astype(str), categories=pd.unique(out.obs[k].astype(str)))
    out.uns[SPATIAL_KEY] = spatial
    if sp.issparse(out.X):
        out.X = out.X.tocsr()
    return out


def subset_sections(adata: ad.AnnData, keep: Sequence[str]) -> ad.AnnData:
    """Copy of ``adata`` restricted to the sections in ``keep`` (uns pruned accordingly)."""
    keep = list(keep)
    out = adata[adata.obs[SECTION_KEY].astype(str).isin(keep)].copy()
    out.uns[SPATIAL_KEY] = {s: adata.uns[SPATIAL_KEY][s] for s in keep if s in adata.uns[SPATIAL_KEY]}
    for k in (SECTION_KEY, PATIENT_KEY):
        out.obs[k] = out.obs[k].cat.remove_unused_categories()
    return out

