"""Export to SpatialData (optional extra: ``pip install 'stdistill[spatialdata]'``)."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from ._section import SECTION_KEY, SPATIAL_KEY, library, sections

_INSTALL = "pip install 'stdistill[spatialdata]'"


def to_spatialdata(adata: ad.AnnData) -> Any:
    """Convert sections in the stdistill layout to a :class:`spatialdata.SpatialData`.

    Per section ``s``: a coordinate system ``s`` in the pixels of ``obsm["spatial"]``, shapes
    ``"<s>_spots"`` (circles of the spot diameter) and, when the section has an image, its
    ``hires`` thumbnail ``"<s>_hires"`` scaled into that frame (full-resolution images stay on disk:
    their path is kept in ``table.uns["spatial"]``). The table is ``adata`` with
    ``obs["region"]`` (the shapes element) and ``obs["instance_id"]``.

    Raises :class:`StdistillError` when spatialdata is not installed.
    """
    try:
        import spatialdata as sd
        from spatialdata.models import Image2DModel, ShapesModel, TableModel
        from spatialdata.transformations import Identity, Scale
    except ImportError:
        raise StdistillError(f"to_spatialdata needs the optional spatialdata package: {_INSTALL}") from None
    secs = sections(adata)
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    shapes, images = {}, {}
    instance = np.empty(adata.n_obs, dtype=np.int64)
    for s in secs:
        m = np.flatnonzero(sec == s)
        instance[m] = np.arange(len(m))
        lib = library(adata, s)
        radius = float(lib["scalefactors"]["spot_diameter_fullres"]) / 2
        shapes[f"{s}_spots"] = ShapesModel.parse(
            xy[m],
            geometry=0,
            radius=np.full(len(m), radius),
            index=pd.Index(instance[m]),
            transformations={s: Identity()},
        )
        hires = lib.get("images", {}).get("hires")
        if hires is not None:
            f = float(lib["scalefactors"].get("tissue_hires_scalef", 1.0))
            arr = np.asarray(hires)[..., :3].transpose(2, 0, 1)
            images[f"{s}_hires"] = Image2DModel.parse(
                arr,
                dims=("c", "y", "x"),
                c_coords=["r", "g", "b"],
                transformations={s: Scale([1 / f, 1 / f], axes=("y", "x"))},
            )
    table = adata.copy()
    table.obs["region"] = pd.Categorical([f"{s}_spots" for s in sec], categories=[f"{s}_spots" for s in secs])
    table.obs["instance_id"] = instance
    table = TableModel.parse(
        table, region=[f"{s}_spots" for s in secs], region_key="region", instance_key="instance_id"
    )
    return sd.SpatialData(images=images, shapes=shapes, tables={"table": table})
