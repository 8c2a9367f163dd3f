"""Reader for 10x Genomics Visium (Space Ranger ``outs/``) into the stdistill layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from ._section import new_section

VISIUM_SPOT_DIAMETER_UM = 55.0
_POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """Space Ranger >= 2.0 ``tissue_positions.csv`` (header) or 1.x ``tissue_positions_list.csv`` (none)."""
    for name, header in (("tissue_positions.csv", 0), ("tissue_positions_list.csv", None)):
        path = spatial / name
        if path.is_file():
            try:
                df = pd.read_csv(path, header=header)
            except Exception as e:
                raise StdistillError(f"spot positions are unreadable ({type(e).__name__}: {e})", path) from None
            if header is None:
                if df.shape[1] != 6:
                    raise StdistillError(
                        f"expected 6 columns ({', '.join(_POSITION_COLUMNS)}), got {df.shape[1]}", path
                    )
                df.columns = _POSITION_COLUMNS
            missing = set(_POSITION_COLUMNS) - set(df.columns)
            if missing:
                raise StdistillError(f"spot positions lack column(s) {sorted(missing)}", path)
            return df.set_index("barcode"), path
    raise StdistillError(
        "no tissue_positions.csv or tissue_positions_list.csv: not a Space Ranger outs/ folder?", spatial
    )


def _is_blank(path: Path) -> bool:
    """True for a placeholder image of one colour (scanpy's test data ships such a hires PNG)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (256, 256))
            small = np.asarray(im.convert("RGB").resize((256, 256)), dtype=np.float32)
    except Exception:
        return True
    return float(small.reshape(-1, 3).std(axis=0).max()) < 1.0


def _read_counts(root: Path, count_file: str) -> tuple[ad.AnnData, Path]:
    """The Space Ranger count matrix of ``root`` (scanpy's reader) and its path."""
    if root.is_file():
        raise StdistillError("Visium folder expected, but this is a file", root)
    if not root.is_dir():
        raise StdistillError("Visium folder does not exist", root)
    h5 = root / count_file
    if not h5.is_file():
        raise StdistillError(f"no {count_file} (Space Ranger count matrix) in this folder", root)
    import scanpy as sc

    try:
        return sc.read_10x_h5(h5), h5
    except Exception as e:
        raise StdistillError(f"count matrix is unreadable ({type(e).__name__}: {e})", h5) from None


def _in_tissue(counts: ad.AnnData, spatial: Path, h5: Path) -> tuple[ad.AnnData, pd.DataFrame]:
    """Counts and positions of the spots under tissue, joined by barcode (every counted barcode needs a position)."""
    pos, pos_path = _read_positions(spatial)
    if pos.index.has_duplicates:
        raise StdistillError(
            f"duplicate barcodes in the positions: {list(pos.index[pos.index.duplicated()][:3])}", pos_path
        )
    if counts.obs_names.has_duplicates:
        dup = counts.obs_names[counts.obs_names.duplicated()]
        raise StdistillError(f"duplicate barcodes in the counts: {list(dup[:3])}", h5)
    no_pos = counts.obs_names.difference(pos.index)
    if len(no_pos):
        raise StdistillError(f"{len(no_pos)} barcodes have counts but no position (e.g. {list(no_pos[:3])})", h5)
    pos = pos.loc[counts.obs_names]
    in_tissue = pos["in_tissue"].to_numpy() == 1
    return counts[in_tissue], pos[in_tissue]


def _scalefactors(spatial: Path, microns_per_pixel: float | None) -> tuple[dict, float]:
    """``scalefactors_json.json`` and the full-resolution um/px (given, or from the 55 um spot diameter)."""
    sf_path = spatial / "scalefactors_json.json"
    try:
        scalef = json.loads(sf_path.read_text())
    except FileNotFoundError:
        raise StdistillError("scale factors file is missing", sf_path) from None
    except Exception as e:
        raise StdistillError(f"scale factors are unreadable ({type(e).__name__}: {e})", sf_path) from None
    if microns_per_pixel is not None:
        return scalef, microns_per_pixel
    d = scalef.get("spot_diameter_fullres")
    if d is None:
        raise StdistillError(
            "microns per pixel is missing (no spot_diameter_fullres); pass microns_per_pixel=", sf_path
        )
    try:
        d = float(d)
    except (TypeError, ValueError):
        d = float("nan")
    if not (np.isfinite(d) and d > 0):
        raise StdistillError(
            f"spot_diameter_fullres is {scalef['spot_diameter_fullres']!r}, not a positive number of pixels; "
            "fix it or pass microns_per_pixel=",
            sf_path,
        )
    return scalef, VISIUM_SPOT_DIAMETER_UM / d


def _attached_image(spatial: Path, scalef: dict, source_image_path) -> tuple[Path | None, float, str]:
    """The image to attach, its scale from full-resolution pixels and its frame's name.

    The given full-resolution image, else the hires PNG unless blank, else the lowres PNG, else none.
    """
    if source_image_path is not None:
        return Path(source_image_path), 1.0, "fullres"
    for name, key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
        p = spatial / f"tissue_{name}_image.png"
        if p.is_file() and key in scalef and not _is_blank(p):
            return p, float(scalef[key]), name
    return None, 1.0, "fullres (no image attached)"


def read_visium(
    path: str | os.PathLike,
    *,
    library_id: str | None = None,
    patient: str | None = None,
    source_image_path: str | os.PathLike | None = None,
    microns_per_pixel: float | None = None,
    count_file: str = "filtered_feature_bc_matrix.h5",
) -> ad.AnnData:
    """Read a Space Ranger ``outs/`` folder (Visium; Space Ranger 1.x and 2.0+ layouts).

    Only spots under tissue are kept (``in_tissue == 1``); a barcode of the count matrix without a
    position is refused. Gene symbols become ``var_names`` (made unique), Ensembl ids go to
    ``var["gene_ids"]``.

    Image frame: with ``source_image_path`` (the full-resolution H&E given to Space Ranger),
    ``obsm["spatial"]`` are full-resolution pixels. Otherwise the best image in ``spatial/`` is
    attached (``tissue_hires_image.png`` unless it is a blank placeholder, else the lowres one) and
    ``obsm["spatial"]`` and microns per pixel are expressed in *that* image's pixels, so that
    ``obsm["spatial"]`` always refers to the attached image. ``obsm["spatial_fullres"]`` keeps the
    Space Ranger full-resolution coordinates.

    Parameters
    ----------
    path
        The ``outs/`` folder (holding the count matrix and ``spatial/``).
    library_id, patient
        Section and patient ids; default: the folder name (the parent's when it is ``outs``).
    source_image_path
        Full-resolution image to attach instead of the PNGs.
    microns_per_pixel
        um/px of the full-resolution image; default derived from ``spot_diameter_fullres``
        (Visium spots are 55 um across).
    """
    root = Path(path)
    counts, h5 = _read_counts(root, count_file)
    if library_id is None:
        library_id = (root.parent.name if root.name == "outs" else root.name) or "visium"
    patient = patient or library_id
    spatial = root / "spatial"
    counts, pos = _in_tissue(counts, spatial, h5)
    scalef, mpp_full = _scalefactors(spatial, microns_per_pixel)
    xy_full = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    image, scale, frame = _attached_image(spatial, scalef, source_image_path)
    obs = pos[["in_tissue", "array_row", "array_col"]].copy()
    adata = new_section(
        counts.X,
        genes=list(counts.var_names),
        spots=list(counts.obs_names),
        xy_px=xy_full * scale,
        section=library_id,
        patient=patient,
        microns_per_pixel=mpp_full / scale,
        spot_diameter_um=VISIUM_SPOT_DIAMETER_UM,
        image=image,
        obs=obs,
        source=image if image is not None else root,
    )
    for col in ("gene_ids", "feature_types", "genome"):
        if col in counts.var:
            adata.var[col] = counts.var[col].to_numpy()
    adata.obsm["spatial_fullres"] = xy_full
    meta = adata.uns[Key.uns.spatial][library_id]["metadata"]
    meta.update(reader="read_visium", image_frame=frame, fullres_scale=scale, visium_folder=str(root.resolve()))
    return adata
