"""Reader for one sample of the HEST-1k layout (Jaume et al. 2024) into the stdistill layout.

Layout under ``root``: ``st/<id>.h5ad`` (counts, spot centres in full-resolution pixels),
``wsis/<id>.tif`` (the full-resolution H&E, read lazily) and ``metadata/<id>.json`` (pixel size
``pixel_size_um_estimated``, else ``pixel_size_um_embedded``; ``patient``; ``spot_diameter``;
``st_technology``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError, require_file
from .._keys import Key
from ._section import new_section
from .h5ad import open_h5ad

_SPOT_DIAMETER_UM = {"visium": 55.0, "visium hd": 2.0, "spatial transcriptomics": 100.0, "st": 100.0}
_KEEP_OBS = ("in_tissue", "array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres")


def read_hest(
    sample_id: str,
    root: str | os.PathLike,
    *,
    patient: str | None = None,
    microns_per_pixel: float | None = None,
) -> ad.AnnData:
    """Read HEST-1k sample ``sample_id`` from ``root`` as one section (``obs["section"] = sample_id``).

    Spots outside tissue (``obs["in_tissue"] == 0``) are dropped when that column exists.
    ``obsm["spatial"]`` are full-resolution pixels of ``wsis/<id>.tif``. ``microns_per_pixel``
    overrides the metadata; ``patient`` defaults to the metadata's ``patient`` or the sample id.
    """
    root = Path(root)
    st_path = root / "st" / f"{sample_id}.h5ad"
    wsi_path = root / "wsis" / f"{sample_id}.tif"
    meta_path = root / "metadata" / f"{sample_id}.json"
    require_file(st_path, "HEST counts file")
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except Exception as e:
            raise StdistillError(f"metadata is unreadable ({type(e).__name__}: {e})", meta_path) from None
    mpp = microns_per_pixel
    if mpp is None:
        for key in ("pixel_size_um_estimated", "pixel_size_um_embedded"):
            v = meta.get(key)
            if v is not None and np.isfinite(float(v)) and float(v) > 0:
                mpp = float(v)
                break
    if mpp is None:
        raise StdistillError(
            "microns per pixel is missing (no pixel_size_um_estimated / pixel_size_um_embedded in "
            f"{meta_path.name}); pass read_hest(..., microns_per_pixel=<um/px>)",
            meta_path,
        )
    require_file(wsi_path, "HEST whole-slide image")
    st = open_h5ad(st_path, "HEST counts file")
    if "in_tissue" in st.obs:
        st = st[st.obs["in_tissue"].astype(int).to_numpy() == 1]
    if Key.obsm.spatial in st.obsm:
        xy = np.asarray(st.obsm[Key.obsm.spatial], dtype=np.float64)[:, :2]
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(st.obs.columns):
        xy = st.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    else:
        raise StdistillError('no spot positions: expected obsm["spatial"] or obs pxl_col/row_in_fullres', st_path)
    tech = str(meta.get("st_technology", "visium")).lower()
    spot_um = meta.get("spot_diameter") or _SPOT_DIAMETER_UM.get(tech, 55.0)
    obs = pd.DataFrame({c: st.obs[c].to_numpy() for c in _KEEP_OBS if c in st.obs}, index=st.obs_names)
    adata = new_section(
        st.X,
        genes=list(st.var_names),
        spots=list(st.obs_names),
        xy_px=xy,
        section=sample_id,
        patient=str(patient or (meta.get("patient") if isinstance(meta.get("patient"), str) else None) or sample_id),
        microns_per_pixel=mpp,
        spot_diameter_um=float(spot_um),
        image=wsi_path,
        obs=obs,
        source=st_path,
    )
    info = adata.uns[Key.uns.spatial][sample_id]["metadata"]
    info["reader"] = "read_hest"
    for k in ("st_technology", "species", "organ", "tissue", "oncotree_code", "disease_state"):
        if isinstance(meta.get(k), str):
            info[k] = meta[k]
    return adata
