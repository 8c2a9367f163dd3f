"""Read and write sections as ``.h5ad``, validating the stdistill data model both ways."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import StdistillError, require_file
from ._section import (
    PATIENT_KEY,
    SECTION_KEY,
    SPATIAL_KEY,
    _check_counts,
    _check_finite_xy,
)


def _image_size(lib: dict, read_header: bool = True) -> tuple[int, int] | None:
    """(width, height) px of a section's image: the recorded ``image_size``, the in-memory
    ``fullres`` array, or (``read_header``) the header of ``source_image_path``; None without an image."""
    meta, images = lib.get("metadata", {}), lib.get("images", {})
    if "image_size" in meta:
        w, h = (int(v) for v in np.asarray(meta["image_size"]).ravel()[:2])
        return w, h
    if "fullres" in images:
        arr = np.asarray(images["fullres"])
        return int(arr.shape[1]), int(arr.shape[0])
    path = meta.get("source_image_path")
    if read_header and path is not None:
        from ._image import open_image

        w, h = open_image(path).size  # reads the header only (PNG, JPEG, TIFF pyramids)
        return int(w), int(h)
    return None


def validate(adata: ad.AnnData, source: str | os.PathLike | None = None, check_images: bool = True) -> ad.AnnData:
    """Check ``adata`` against the data model; raise :class:`StdistillError` naming ``source`` on the first problem.

    Checks: raw counts in ``X`` (finite, non-negative integers; H&E-only tiles have 0 genes),
    unique spot ids, ``obs["section"]`` and ``obs["patient"]``, ``obsm["spatial"]`` (n, 2) finite, a ``uns["spatial"]`` entry with
    microns per pixel for every section, and (with ``check_images``) that an attached image file
    exists and every spot centre lies inside the image (its size read from the file's header
    when the layout does not record it).
    """
    src = source if source is not None else "AnnData"
    if adata.n_obs == 0:
        raise StdistillError("section is empty (no spots)", src)
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()]
        raise StdistillError(f"duplicate spot ids: {list(dup[:3])}", src)
    for key in (SECTION_KEY, PATIENT_KEY):
        if key not in adata.obs:
            raise StdistillError(f'obs["{key}"] is missing; every spot needs its {key} id', src)
        if adata.obs[key].isna().any():
            raise StdistillError(f'obs["{key}"] has missing values', src)
    if adata.X is None:
        raise StdistillError("X is empty; expected raw counts", src)
    _check_counts(adata.X if sp.issparse(adata.X) else np.asarray(adata.X), src)
    if SPATIAL_KEY not in adata.obsm:
        raise StdistillError(f'obsm["{SPATIAL_KEY}"] (spot centres in image pixels) is missing', src)
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise StdistillError(f'obsm["{SPATIAL_KEY}"] must be (n_spots, 2) pixel coordinates, got shape {xy.shape}', src)
    _check_finite_xy(xy[:, :2], adata.obs_names, src, what=f'coordinates in obsm["{SPATIAL_KEY}"]')
    libs = adata.uns.get(SPATIAL_KEY, {})
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    for s in pd.unique(sec):
        lib = libs.get(s)
        if lib is None:
            raise StdistillError(f'section {s!r} has no uns["spatial"][{s!r}] entry', src)
        mpp = lib.get("scalefactors", {}).get("microns_per_pixel")
        where = f'adata.uns["spatial"][{s!r}]["scalefactors"]["microns_per_pixel"]'
        if mpp is None:
            raise StdistillError(f"section {s!r} has no microns per pixel; set {where} = <um/px>", src)
        if not (np.isfinite(float(mpp)) and float(mpp) > 0):
            raise StdistillError(f"section {s!r} has microns per pixel {mpp!r}; {where} must be > 0", src)
        if not check_images:
            continue
        path = lib.get("metadata", {}).get("source_image_path")
        if path is not None and not Path(path).is_file():
            raise StdistillError(
                f"image of section {s!r} is missing: {path} (moved? fix "
                f'uns["spatial"][{s!r}]["metadata"]["source_image_path"])',
                src,
            )
        size = _image_size(lib)
        if size is not None and (path is not None or "fullres" in lib.get("images", {})):
            w, h = size
            p = xy[sec == s, :2]
            out = (p[:, 0] < 0) | (p[:, 1] < 0) | (p[:, 0] >= w) | (p[:, 1] >= h)
            if out.any():
                raise StdistillError(
                    f"{int(out.sum())} spot centres of section {s!r} lie outside its {w}x{h} px image", src
                )
    return adata


def open_h5ad(path: str | os.PathLike, what: str = ".h5ad file") -> ad.AnnData:
    """``anndata.read_h5ad`` with one-line errors naming ``path`` (``what`` names the file's role)."""
    path = Path(path)
    require_file(path, what)
    try:
        return ad.read_h5ad(path)
    except Exception as e:
        raise StdistillError(f"{what} is unreadable ({type(e).__name__}: {e})", path) from None


def read_h5ad(path: str | os.PathLike, check_images: bool = True) -> ad.AnnData:
    """Read an ``.h5ad`` written by :func:`write_h5ad` (or any file in the stdistill layout) and validate it."""
    path = Path(path)
    adata = open_h5ad(path)
    for lib in adata.uns.get(SPATIAL_KEY, {}).values():
        meta = lib.get("metadata", {}) if isinstance(lib, dict) else {}
        if "image_size" in meta:  # h5py gives arrays back; the layout holds a [width, height] list
            meta["image_size"] = [int(v) for v in np.asarray(meta["image_size"]).ravel()]
    for key in (SECTION_KEY, PATIENT_KEY):
        if key in adata.obs and not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
            adata.obs[key] = pd.Categorical(adata.obs[key].astype(str))
    if sp.issparse(adata.X) and not isinstance(adata.X, sp.csr_matrix):
        adata.X = sp.csr_matrix(adata.X)
    return validate(adata, path, check_images=check_images)


def _storable(value, where: str):
    """A copy of ``value`` that h5ad can store: str keys, lists for tuples, no None values."""
    if isinstance(value, dict):
        return {str(k): _storable(v, f"{where}/{k}") for k, v in value.items() if v is not None}
    if isinstance(value, (tuple, list)):
        try:
            arr = np.asarray(value)
        except ValueError:
            arr = None
        if arr is not None and arr.dtype.kind in "biufU":
            return arr
        return {str(i): _storable(v, f"{where}/{i}") for i, v in enumerate(value)}
    if isinstance(value, Path):
        return str(value)
    return value


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike, compression: str | None = "gzip") -> Path:
    """Validate and write ``adata`` to ``path`` atomically (nothing is left behind when writing fails).

    ``uns`` is made storable first: dict keys become strings, tuples become arrays, ``None``
    values are dropped; the caller's object is not changed. The file is built in memory and then
    copied to disk (:func:`stdistill._utils.write_hdf5`), so a full disk raises
    :class:`StdistillError` and the process lives on.
    """
    from anndata.io import write_elem

    from .._utils import write_hdf5

    path = Path(path)
    if path.is_dir():
        raise StdistillError("is a directory; expected an .h5ad file path", path)
    validate(adata, path, check_images=False)
    out = adata.copy()
    out.uns = _storable(dict(adata.uns), "uns")
    out.strings_to_categoricals()
    kwargs = {"compression": compression} if compression else {}
    try:
        write_hdf5(path, lambda f: write_elem(f, "/", out, dataset_kwargs=kwargs))
    except StdistillError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StdistillError(f"could not write ({type(e).__name__}: {msg})", path) from None
    return path
