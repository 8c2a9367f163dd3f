"""One-step import of a user's own spots + counts + H&E image into the stdistill section layout."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import StdistillError, require_file
from .._keys import Key

#: Column names tried, in order, for spot centres in full-resolution pixels (x = column, y = row).
X_COLUMNS = ("x", "pixel_x", "pxl_col_in_fullres", "imagecol", "x_px")
Y_COLUMNS = ("y", "pixel_y", "pxl_row_in_fullres", "imagerow", "y_px")


def _delimiter(path: Path) -> str:
    """Tab or comma, whichever the first line holds more of."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", errors="replace") as f:
            head = f.readline()
    except OSError as e:
        raise StdistillError(f"unreadable ({type(e).__name__}: {e})", path) from None
    return "\t" if head.count("\t") >= head.count(",") and "\t" in head else ","


def read_table(path: str | os.PathLike, what: str) -> pd.DataFrame:
    """A tab- or comma-separated table (delimiter detected; ``.gz`` allowed), first column as index."""
    p = require_file(path, what)
    try:
        df = pd.read_csv(p, sep=_delimiter(p), index_col=0)
    except Exception as e:
        raise StdistillError(f"cannot read the {what} ({type(e).__name__}: {str(e).splitlines()[0]})", p) from None
    if df.empty:
        raise StdistillError(f"{what} has no rows or no columns", p)
    df.index = df.index.astype(str)
    return df


def _column(df: pd.DataFrame, given: str | None, options: Sequence[str], path: Path) -> str:
    if given is not None:
        if given not in df.columns:
            raise StdistillError(f"no column {given!r} in the positions (have {list(df.columns)[:8]})", path)
        return given
    low = {str(c).lower(): c for c in df.columns}
    for o in options:
        if o in low:
            return low[o]
    raise StdistillError(f"no spot pixel column among {list(options)} in the positions (have {list(df.columns)[:8]}); "
                         "pass x=/y= (--x-col/--y-col)", path)


def _counts_table(path: Path, spot_ids: pd.Index) -> pd.DataFrame:
    """Counts as spots x genes; a genes x spots table (columns are the spot ids) is transposed."""
    df = read_table(path, "counts table")
    if len(df.index.intersection(spot_ids)) == 0 and len(df.columns.astype(str).intersection(spot_ids)) > 0:
        df = df.T
        df.index = df.index.astype(str)
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise StdistillError(f"non-numeric count columns {[str(b) for b in bad[:3]]}; expected spots x genes "
                             "(first column spot ids)", path)
    return df


def _from_tables(counts: Path, positions: Path, x: str | None, y: str | None):
    """(counts matrix, genes, spot ids, xy px) from a counts table and a positions table."""
    from ._section import join_positions

    pos = read_table(positions, "positions table")
    xc, yc = _column(pos, x, X_COLUMNS, positions), _column(pos, y, Y_COLUMNS, positions)
    df = _counts_table(counts, pos.index)
    join_positions(df.index, pos.index, counts)
    xy = pos.loc[df.index, [xc, yc]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    return sp.csr_matrix(df.to_numpy()), [str(g) for g in df.columns], list(df.index), xy


def _from_h5ad(path: Path, layer: str | None):
    """(counts, genes, spot ids, xy px, obs) from an .h5ad with ``obsm["spatial"]`` in image pixels."""
    from .h5ad import open_h5ad

    a = open_h5ad(path, ".h5ad file")
    if Key.obsm.spatial not in a.obsm:
        raise StdistillError('no obsm["spatial"] (spot centres in full-resolution pixels)', path)
    if layer is not None and layer not in a.layers:
        raise StdistillError(f"no layer {layer!r} (have {list(a.layers)})", path)
    X = a.layers[layer] if layer is not None else (a.layers[Key.layers.counts] if Key.layers.counts in a.layers else a.X)
    keep = a.obs.drop(columns=[c for c in ("section", "patient") if c in a.obs])
    return X, list(a.var_names), list(a.obs_names), np.asarray(a.obsm[Key.obsm.spatial], dtype=np.float64)[:, :2], keep


def read_spots(
    counts: str | os.PathLike,
    *,
    image: str | os.PathLike,
    microns_per_pixel: float,
    positions: str | os.PathLike | None = None,
    section: str | None = None,
    patient: str | None = None,
    spot_diameter_um: float = 55.0,
    x: str | None = None,
    y: str | None = None,
    layer: str | None = None,
) -> ad.AnnData:
    """Read one section of one's own data (spots, raw counts, an H&E image) into the stdistill layout.

    Two layouts:

    - ``counts`` an ``.h5ad`` with raw counts in ``X`` (or ``layers["counts"]``, or ``layer=``) and
      spot centres in ``obsm["spatial"]`` (full-resolution pixels of ``image``);
    - ``counts`` a counts table (spots x genes, first column spot ids; genes x spots is detected)
      plus ``positions``, a table of spot ids and pixel centres (columns ``x``/``y`` or Space
      Ranger's ``pxl_col_in_fullres``/``pxl_row_in_fullres``; ``x=``/``y=`` name others). Tables
      are tab- or comma-separated (detected), optionally gzipped.

    Parameters
    ----------
    image
        The full-resolution H&E image the pixel coordinates refer to (read lazily; its size is
        read from the file header).
    microns_per_pixel
        um/px of that image (e.g. about 0.25 for a 40x scan, 0.5 for 20x).
    section, patient
        ``obs["section"]`` and ``obs["patient"]`` (default: the image's file name stem, and the
        section). Give the patient: folds are by patient.
    spot_diameter_um
        Physical spot diameter in um (55 for Visium, 100 for legacy ST).

    Returns
    -------
    A validated AnnData (as :func:`stdistill.io.validate`) with ``obs["section"]``,
    ``obs["patient"]``, ``obsm["spatial"]`` and ``uns["spatial"][section]`` (scale factors, image
    path, image size). Every problem is one :class:`StdistillError` naming the file.
    """
    from ._section import new_section
    from .h5ad import validate

    c = require_file(counts, "counts file")
    img = require_file(image, "image")
    obs = None
    if c.suffix.lower() == ".h5ad":
        if positions is not None:
            raise StdistillError("positions come from obsm['spatial'] of the .h5ad; drop positions=", c)
        X, genes, spots, xy, obs = _from_h5ad(c, layer)
    else:
        if positions is None:
            raise StdistillError("a counts table needs positions= (a table of spot ids and pixel x, y)", c)
        X, genes, spots, xy = _from_tables(c, Path(positions), x, y)
    section = section or img.stem
    a = new_section(X, genes=genes, spots=spots, xy_px=xy, section=section, patient=patient or section,
                    microns_per_pixel=microns_per_pixel, spot_diameter_um=spot_diameter_um, image=img, obs=obs,
                    source=c)
    return validate(a, c)
