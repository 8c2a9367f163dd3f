"""Mouse olfactory bulb, legacy ST (Stahl et al., Science 353:78, 2016), replicates 1 and 2.

A second species and image frame beside HER2ST. The files come from the ``spaceST`` R package
(``ludvigla/spaceST``), which carries no licence: use them for internal evaluation, do not
redistribute them. There is no download: pass ``root`` or set ``STDISTILL_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from ..io._section import concat, new_section
from ..io.h5ad import open_h5ad
from ..io.legacy_st import ST_SPOT_DIAMETER_UM

FOLDER = "mob-st-stahl2016-spacest"
REPLICATES = ("Rep1", "Rep2")


def _resolve(root: str | os.PathLike | None) -> Path:
    cands = []
    if root is not None:
        p = Path(root).expanduser()
        cands = [p, p / FOLDER]
    elif os.environ.get("STDISTILL_DATA"):
        p = Path(os.environ["STDISTILL_DATA"]).expanduser()
        cands = [p / FOLDER, p]
    else:
        raise StdistillError(
            f"mob() needs a local copy: pass root= or set STDISTILL_DATA to a folder holding {FOLDER}/"
        )
    for c in cands:
        if (c / "derived").is_dir():
            return c
    raise StdistillError(f"not a {FOLDER} copy: expected derived/Rep1_MOB_counts_spots.h5ad inside", cands[0])


def mob(root: str | os.PathLike | None = None, patient_per_replicate: bool = False) -> ad.AnnData:
    """The two mouse olfactory bulb replicates (267 + 280 spots, raw counts) as one AnnData.

    Parameters
    ----------
    root
        The ``mob-st-stahl2016-spacest`` folder (or its parent); default ``$STDISTILL_DATA``.
    patient_per_replicate
        The two sections probably come from one animal, so by default both have
        ``obs["patient"] = "MOB"`` (no honest patient-level split exists). ``True`` gives each
        replicate its own id, only for exercising split code.

    Returns
    -------
    Sections ``"Rep1"``, ``"Rep2"``; ``obsm["spatial"]`` in pixels of the H&E JPEGs (about
    3.45 um/px: the images are cropped so that their corners are the centres of array spots
    (1, 1) and (33, 35), and one array step is 200 um); ``obs["array_x"]``, ``obs["array_y"]``
    are sub-spot array coordinates. Mouse gene symbols.
    """
    base = _resolve(root)
    parts = []
    for rep in REPLICATES:
        path = base / "derived" / f"{rep}_MOB_counts_spots.h5ad"
        src = open_h5ad(path, "MOB counts file")
        mpp = src.uns.get("um_per_px")
        img = src.uns.get("image")
        image = base / str(img) if img is not None else base / "inst" / "extdata" / f"HE_{rep}.jpg"
        obs = pd.DataFrame(
            {c: src.obs[c].to_numpy() for c in ("array_x", "array_y") if c in src.obs}, index=src.obs_names
        )
        a = new_section(
            src.X,
            genes=list(src.var_names),
            spots=list(src.obs_names),
            xy_px=np.asarray(src.obsm[Key.obsm.spatial], dtype=np.float64),
            section=rep,
            patient=rep if patient_per_replicate else "MOB",
            microns_per_pixel=None if mpp is None else float(mpp),
            spot_diameter_um=ST_SPOT_DIAMETER_UM,
            image=image,
            obs=obs,
            source=path,
        )
        a.uns[Key.uns.spatial][rep]["metadata"]["reader"] = "datasets.mob"
        a.uns[Key.uns.spatial][rep]["metadata"]["species"] = "Mus musculus"
        a.obs_names = [f"{rep}_{i}" for i in a.obs_names]
        parts.append(a)
    out = concat(parts)
    out.uns[Key.uns.dataset] = "mob"
    return out
