"""Reader for legacy Spatial Transcriptomics (ST, Stahl 2016) sections in the ST-Net / her2st layout.

Layout: a counts table (TSV, optionally gzipped; spots x genes, rows named ``"<x>x<y>"`` after
the spot's array coordinates, an empty first header cell) and a spot file (TSV with columns
``x``, ``y`` (array), ``pixel_x``, ``pixel_y`` (image pixels) and optionally ``selected`` and
the sub-spot array coordinates ``new_x``, ``new_y``). Legacy ST spots are 100 um across,
200 um apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import StdistillError, require_file
from .._keys import Key
from .._utils import atomic_path, file_digest
from ._section import _check_counts, join_positions, new_section

#: Centre-to-centre distance of neighbouring legacy ST spots, micrometres.
ST_PITCH_UM = 200.0
ST_SPOT_DIAMETER_UM = 100.0


def _spot_id(x: np.ndarray, y: np.ndarray) -> list[str]:
    """``"<x>x<y>"`` with integers written without a decimal point (as the counts files do)."""

    def fmt(v):
        return str(int(v)) if float(v).is_integer() else repr(float(v))

    return [f"{fmt(a)}x{fmt(b)}" for a, b in zip(x, y)]


def _header_fields(path: Path) -> list[str]:
    """Tab-separated fields of the first line (gzip read transparently); refuses other separators."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            line = fh.readline().rstrip("\r\n")
    except (OSError, EOFError) as e:
        raise StdistillError(f"counts file is unreadable ({type(e).__name__}: {e})", path) from None
    if not line:
        raise StdistillError("counts file is empty", path)
    if "\t" not in line:
        sep = next((c for c in ",; " if c in line), None)
        found = f"{'comma' if sep == ',' else 'semicolon' if sep == ';' else 'space'}-separated" if sep else "one column"
        raise StdistillError(f"expected tab-separated counts (spots x genes), but the header is {found}", path)
    return line.split("\t")


def read_counts_table(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """Read a spots x genes counts TSV(.gz): returns (CSR counts, spot ids, gene names).

    Values are checked later (integers, non-negative, finite). With ``cache_dir`` the parsed
    table is kept as a ``.npz`` keyed by the file's content digest, so a second read is fast.
    """
    path = Path(path)
    require_file(path, "counts file")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{path.name}.{file_digest(path)}.npz"
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    X = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
                    return X, z["spots"].tolist(), z["genes"].tolist()
            except Exception:  # a broken cache entry is re-parsed and overwritten
                pass
    header = _header_fields(path)
    try:
        df = pd.read_csv(path, sep="\t", index_col=0, engine="c")
    except pd.errors.EmptyDataError:
        raise StdistillError("counts file is empty", path) from None
    except Exception as e:
        raise StdistillError(f"counts file is unreadable ({type(e).__name__}: {e})", path) from None
    if len(header) == len(df.columns) + 1:  # pandas renames repeated names (X, X.1): keep the file's
        df.columns = header[1:]
    if len(df) == 0:
        raise StdistillError("section is empty (no spots in the counts)", path)
    bad = [c for c, t in df.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if bad:
        raise StdistillError(f"counts are not numeric (e.g. gene column {bad[0]!r})", path)
    values = df.to_numpy()
    if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
        raise StdistillError("counts contain NaN or infinite values (empty cells?)", path)
    X = sp.csr_matrix(values)
    spots = [str(s) for s in df.index]
    genes = [str(g) for g in df.columns]
    if cache is not None and X.nnz and np.all(np.mod(X.data, 1) == 0) and X.data.min() >= 0 and X.data.max() < 2**31:
        X32 = X.astype(np.int32)
        try:
            with atomic_path(cache) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(
                        fh,
                        data=X32.data,
                        indices=X32.indices,
                        indptr=X32.indptr,
                        shape=np.array(X32.shape),
                        spots=np.array(spots, dtype=str),
                        genes=np.array(genes, dtype=str),
                    )
        except OSError:  # a read-only cache only costs speed
            pass
    return X, spots, genes


def read_spot_file(path: str | os.PathLike) -> pd.DataFrame:
    """Read an ST spot file; keep rows with ``selected == 1`` when that column exists."""
    path = Path(path)
    require_file(path, "spot file")
    try:
        df = pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError:
        raise StdistillError("spot file is empty", path) from None
    except Exception as e:
        raise StdistillError(f"spot file is unreadable ({type(e).__name__}: {e})", path) from None
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise StdistillError(f"spot file lacks column(s) {missing}; expected x, y, pixel_x, pixel_y[, selected]", path)
    if "selected" in df.columns:
        df = df[pd.to_numeric(df["selected"], errors="coerce") == 1]
    df = df.copy()
    for cols, what in ((["x", "y"], "array coordinates (x, y)"), (["pixel_x", "pixel_y"], "pixel coordinates")):
        vals = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(vals).all(axis=1)
        if bad.any():
            raise StdistillError(
                f"{int(bad.sum())} spots have NaN, empty or non-numeric {what} (e.g. row {int(np.flatnonzero(bad)[0]) + 2})",
                path,
            )
        df[cols] = vals
    df.index = pd.Index(_spot_id(df["x"].to_numpy(), df["y"].to_numpy()))
    return df


def apply_affine(xy: np.ndarray, affine) -> np.ndarray:
    """Apply a 2x3 affine matrix ``[[a, b, tx], [c, d, ty]]`` to (n, 2) points (x, y)."""
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (2, 3):
        raise StdistillError(f"affine must be a 2x3 matrix, got shape {A.shape}")
    return xy @ A[:, :2].T + A[:, 2]


def fit_affine(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares 2x3 affine map ``src -> dst`` ((n, 2) points each); returns it and the max residual (px)."""
    src, dst = np.asarray(src, float), np.asarray(dst, float)
    if len(src) < 3:
        raise StdistillError(f"need at least 3 matching points to fit an affine map, got {len(src)}")
    design = np.c_[src, np.ones(len(src))]
    coef, *_ = np.linalg.lstsq(design, dst, rcond=None)
    resid = float(np.abs(design @ coef - dst).max())
    return coef.T, resid


def pitch_pixels(array_xy: np.ndarray, pixel_xy: np.ndarray, source=None) -> float:
    """Pixels per array step, from an affine fit of pixel coordinates against array coordinates."""
    A, _ = fit_affine(array_xy, pixel_xy)
    lin = A[:, :2]
    if np.linalg.matrix_rank(np.c_[array_xy, np.ones(len(array_xy))]) < 3:
        raise StdistillError("cannot derive the array pitch: spots lie on one line; pass microns_per_pixel=", source)
    px_per_step = float(np.mean(np.linalg.norm(lin, axis=0)))
    if not np.isfinite(px_per_step) or px_per_step <= 0:
        raise StdistillError("cannot derive the array pitch from the spot file; pass microns_per_pixel=", source)
    return px_per_step


def _positions_of(spot_ids: list[str], pos: pd.DataFrame, positions_without_counts: str, source):
    """The spot file's rows (every id of ``spot_ids`` has one) and how many positions without counts were dropped."""
    n_dropped = 0
    if positions_without_counts == "drop":
        keep = pos.index.isin(pd.Index(spot_ids))
        n_dropped = int((~keep).sum())
        pos = pos[keep]
    elif positions_without_counts != "raise":
        raise StdistillError(f"positions_without_counts must be 'raise' or 'drop', got {positions_without_counts!r}")
    join_positions(spot_ids, pos.index, source=source)
    return pos, n_dropped


def _image_xy(pos: pd.DataFrame, affine, scale: float, spots) -> np.ndarray:
    """(n, 2) spot centres in the image's pixels: ``(pixel_x, pixel_y)``, through ``affine``, times ``scale``."""
    xy = pos[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    if affine is not None:
        xy = apply_affine(xy, affine)
    if not (np.isfinite(scale) and scale > 0):
        raise StdistillError(f"scale must be a positive number, got {scale}", spots)
    return xy * float(scale)


def _resolve_mpp(mpp, pos: pd.DataFrame, xy: np.ndarray, spots) -> float:
    """um/px as given, or from the 200 um array pitch when ``"pitch"`` (sub-spot coordinates when present)."""
    if isinstance(mpp, str):
        if mpp != "pitch":
            raise StdistillError(f"microns_per_pixel must be a number or 'pitch', got {mpp!r}", spots)
        cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(pos.columns) else ["x", "y"]
        return ST_PITCH_UM / pitch_pixels(pos[cols].to_numpy(float), xy, source=spots)
    if mpp is None:
        raise StdistillError(
            "microns per pixel is missing; pass microns_per_pixel=<um/px of the image> or "
            "microns_per_pixel='pitch' to derive it from the 200 um spot pitch",
            spots,
        )
    return mpp


def read_legacy_st(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike | None = None,
    *,
    microns_per_pixel: float | Literal["pitch"] | None = None,
    section: str,
    patient: str,
    scale: float = 1.0,
    affine=None,
    spot_diameter_um: float = ST_SPOT_DIAMETER_UM,
    positions_without_counts: Literal["raise", "drop"] = "raise",
    cache_dir: str | os.PathLike | None = None,
) -> ad.AnnData:
    """Read one legacy ST section (ST-Net / her2st layout) into the stdistill layout.

    Parameters
    ----------
    counts
        Spots x genes counts TSV(.gz); rows ``"<x>x<y>"`` (array coordinates).
    spots
        Spot file with ``x``, ``y``, ``pixel_x``, ``pixel_y`` (and ``selected``).
    image
        The H&E image whose pixel frame ``pixel_x``/``pixel_y`` (after ``affine`` and ``scale``)
        refer to; ``None`` for a section without an image (coordinates then stay in the original
        full-resolution frame).
    microns_per_pixel
        um/px of that image frame, or ``"pitch"`` to derive it from the 200 um array pitch (an
        affine fit of pixel against array coordinates).
    section, patient
        Ids written to ``obs["section"]`` / ``obs["patient"]``.
    scale
        Multiplies pixel coordinates, for downscaled images (e.g. her2st A1: 2000 / 6954).
    affine
        Optional 2x3 matrix applied to ``(pixel_x, pixel_y)`` before ``scale`` (full-resolution units).
    spot_diameter_um
        100 um for legacy ST.
    positions_without_counts
        ``"raise"`` (default) refuses spots in the spot file that have no counts; ``"drop"`` drops
        them (their number is kept in ``uns["spatial"][section]["metadata"]``). Spots with counts
        but no position are always refused.
    cache_dir
        Keep parsed counts here (see :func:`read_counts_table`).

    Returns
    -------
    One section: ``X`` raw counts, ``obs`` with ``array_x``/``array_y``, ``obsm["spatial"]`` (n, 2)
    in the image's pixels.
    """
    X, spot_ids, genes = read_counts_table(counts, cache_dir=cache_dir)
    pos, n_dropped = _positions_of(spot_ids, read_spot_file(spots), positions_without_counts, f"{counts} / {spots}")
    X = _check_counts(X, counts)
    pos = pos.loc[spot_ids]
    xy = _image_xy(pos, affine, scale, spots)
    mpp = _resolve_mpp(microns_per_pixel, pos, xy, spots)
    obs = pd.DataFrame({"array_x": pos["x"].to_numpy(), "array_y": pos["y"].to_numpy()}, index=pd.Index(spot_ids))
    adata = new_section(
        X,
        genes=genes,
        spots=spot_ids,
        xy_px=xy,
        section=section,
        patient=patient,
        microns_per_pixel=mpp,
        spot_diameter_um=spot_diameter_um,
        image=image,
        obs=obs,
        source=image if image is not None else counts,
    )
    meta = adata.uns[Key.uns.spatial][section]["metadata"]
    meta["reader"] = "read_legacy_st"
    meta["coordinate_scale"] = float(scale)
    if affine is not None:
        meta["coordinate_affine"] = np.asarray(affine, dtype=np.float64)
    meta["positions_without_counts_dropped"] = n_dropped
    return adata
