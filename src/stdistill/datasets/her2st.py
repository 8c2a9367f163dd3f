"""HER2-positive breast cancer, legacy ST (Andersson et al., Nat. Commun. 12, 6012, 2021).

Files come from the public GitHub repository ``almaan/her2st`` at a fixed commit (see
:mod:`stdistill.datasets._download`); they are research data without a licence file: cite the
paper and do not redistribute them.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from .._utils import progress
from ..io._section import concat
from ..io.legacy_st import fit_affine, read_legacy_st
from . import _download

PATIENTS = "ABCDEFGH"
#: The 36 sections with counts: A1-A6, B1-B6, C1-C6, D1-D6, E1-E3, F1-F3, G1-G3, H1-H3.
SECTIONS: tuple[str, ...] = tuple(
    f"{p}{i}" for p, n in zip(PATIENTS, (6, 6, 6, 6, 3, 3, 3, 3)) for i in range(1, n + 1)
)
#: Sections with pathologist region labels (J1 has labels but no counts).
LABELLED = ("A1", "B1", "C1", "D1", "E1", "F1", "G2", "H1")
#: The Shiny-app copies of A1/A2 are 2000 px wide: full-resolution widths 6954 and 6966 px.
APP_SCALE = {"A1": 2000 / 6954, "A2": 2000 / 6966}
_APP_PNG = "app/www/imgs/{s}_HE_image_dark.png"
_A2_WARP = "res/ST-cluster/lbl/A2-cluster-annotation.tsv.gz"
_PROPS_ZIP = "res/ST-deconv/props/major.zip"


def _counts(s: str) -> str:
    return f"data/ST-cnts/{s}.tsv.gz"


def _spotfile(s: str) -> str:
    return f"data/ST-spotfiles/{s}_selection.tsv"


def _labels(s: str) -> str:
    return f"data/ST-pat/lbl/{s}_labeled_coordinates.tsv"


def _needed_files(sections: Sequence[str]) -> list[str]:
    """Repository paths that :func:`her2st` reads for ``sections`` (all in the manifest)."""
    out = [_PROPS_ZIP]
    for s in sections:
        out += [_counts(s), _spotfile(s)]
        if s in LABELLED:
            out.append(_labels(s))
        if s in APP_SCALE:
            out.append(_APP_PNG.format(s=s))
        if s == "A2":
            out.append(_A2_WARP)
        out += [p for p in _download.HER2ST_MANIFEST if p.startswith(f"data/ST-imgs/{s[0]}/{s}/")]
    return list(dict.fromkeys(out))


def _is_her2st(p: Path) -> bool:
    return (p / "data" / "ST-cnts").is_dir()


def resolve_root(root: str | os.PathLike | None, sections: Sequence[str] = SECTIONS) -> Path:
    """Where the her2st files are: ``root``, else ``$STDISTILL_DATA/her2st``, else the download cache.

    The cache (``$STDISTILL_CACHE/her2st`` or ``~/.cache/stdistill/her2st``) is filled from the
    public repository when files are missing; every download is checked against the manifest.
    """
    if root is not None:
        p = Path(root).expanduser()
        for cand in (p, p / "her2st"):
            if _is_her2st(cand):
                return cand
        raise StdistillError("not a her2st copy: expected data/ST-cnts/ inside (or inside her2st/)", p)
    env = os.environ.get("STDISTILL_DATA")
    if env:
        p = Path(env).expanduser()
        for cand in (p / "her2st", p):
            if _is_her2st(cand):
                return cand
        raise StdistillError("STDISTILL_DATA has no her2st/ folder with data/ST-cnts/ inside", p)
    cache = _download.cache_dir() / "her2st"
    return _download.ensure_files(_needed_files(sections), cache, _download.HER2ST_MANIFEST, _download.HER2ST_URL)


def _image_for(root: Path, s: str) -> tuple[Path | None, float, np.ndarray | None, str]:
    """(image path, coordinate scale, affine, description) of section ``s``'s best image here."""
    jpgs = sorted((root / "data" / "ST-imgs" / s[0] / s).glob("*.jpg")) if (root / "data" / "ST-imgs").is_dir() else []
    if jpgs:
        return jpgs[0], 1.0, None, "full-resolution H&E"
    png = root / _APP_PNG.format(s=s)
    if s in APP_SCALE and png.is_file():
        affine = None
        if s == "A2":
            affine = _a2_warp(root / _A2_WARP)
        return png, APP_SCALE[s], affine, f"app copy, 2000 px wide (coordinates x {APP_SCALE[s]:.6f})"
    return None, 1.0, None, "no image"


def _a2_warp(path: Path) -> np.ndarray:
    """The rigid map from A2's spot-file pixels to the frame of its app PNG (fitted on the annotated spots)."""
    if not path.is_file():
        raise StdistillError("A2's app image needs its warped coordinates from this file, which is missing", path)
    df = pd.read_csv(path, sep="\t")
    need = {"pixel_x", "pixel_y", "warped_x", "warped_y"}
    if not need <= set(df.columns):
        raise StdistillError(f"expected columns {sorted(need)}", path)
    df = df.dropna(subset=sorted(need))
    A, resid = fit_affine(df[["pixel_x", "pixel_y"]].to_numpy(), df[["warped_x", "warped_y"]].to_numpy())
    if resid > 1.0:
        raise StdistillError(
            f"warped coordinates are not an affine map of pixel coordinates (residual {resid:.1f} px)", path
        )
    return A


def _pathology(root: Path, s: str, adata: ad.AnnData) -> pd.Series:
    """Pathologist label per spot (NaN where none): join on rounded sub-spot array coordinates."""
    out = pd.Series(np.nan, index=adata.obs_names, dtype=object)
    path = root / _labels(s)
    if s not in LABELLED or not path.is_file():
        return out
    lbl = pd.read_csv(path, sep="\t").dropna(subset=["x", "y", "label"])
    key = list(zip(np.round(lbl["x"]).astype(int), np.round(lbl["y"]).astype(int)))
    lookup = dict(zip(key, lbl["label"].astype(str)))
    spots = zip(adata.obs["array_x"].astype(int), adata.obs["array_y"].astype(int))
    out[:] = [lookup.get(k, np.nan) for k in spots]
    return out


def _props(zf: zipfile.ZipFile | None, s: str, spot_ids: Sequence[str]) -> pd.DataFrame | None:
    if zf is None:
        return None
    name = f"major/{s}-proportion.tsv"
    if name not in zf.namelist():
        return None
    df = pd.read_csv(io.BytesIO(zf.read(name)), sep="\t", index_col=0)
    df.index = df.index.astype(str)
    return df.reindex(list(spot_ids)).astype(np.float64)


def _wanted(sections: Sequence[str] | None) -> list[str]:
    wanted = list(SECTIONS if sections is None else sections)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise StdistillError(f"unknown her2st section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    if not wanted:
        raise StdistillError("no her2st sections requested")
    return wanted


def _read_section(base: Path, s: str, image: tuple, zf: zipfile.ZipFile | None, parsed: Path) -> ad.AnnData:
    """Section ``s`` with its image, pathology labels and cell-type proportions; spots named ``<s>_<x>x<y>``."""
    img, scale, affine, what = image
    a = read_legacy_st(
        base / _counts(s),
        base / _spotfile(s),
        img,
        microns_per_pixel="pitch",
        section=s,
        patient=s[0],
        scale=scale,
        affine=affine,
        positions_without_counts="drop",
        cache_dir=parsed,
    )
    a.uns[Key.uns.spatial][s]["metadata"]["image_description"] = what
    a.obs[Key.obs.pathology] = _pathology(base, s, a).to_numpy()
    props = _props(zf, s, a.obs_names)
    a.obs_names = [f"{s}_{i}" for i in a.obs_names]
    if props is not None:
        props.index = a.obs_names
        a.obsm[Key.obsm.celltype_props] = props
    return a


def her2st(
    root: str | os.PathLike | None = None,
    sections: Sequence[str] | None = None,
    images_only: bool = False,
) -> ad.AnnData:
    """All HER2ST sections (36, patients A-H) as one AnnData in the stdistill layout.

    Parameters
    ----------
    root
        A local copy with the repository's layout (``data/ST-cnts/``, ...), or a folder holding
        ``her2st/``. Default: ``$STDISTILL_DATA/her2st``, else a cache
        (``$STDISTILL_CACHE`` or ``~/.cache/stdistill``) filled once from the public
        ``almaan/her2st`` repository at a fixed commit, every file checked against its git blob
        SHA-1 (about 66 MB).
    sections
        Section ids to read (default all 36, ``"A1"`` ... ``"H3"``).
    images_only
        Keep only sections with an H&E image here (B4, C2-C5 full resolution; A1, A2 2000 px).

    Returns
    -------
    AnnData (spots x union of genes, raw counts, genes missing in a section are 0):

    - ``obs["section"]`` (``"A1"`` ...), ``obs["patient"]`` (the letter), ``obs["array_x"]``,
      ``obs["array_y"]``; ``obs_names`` are ``"<section>_<x>x<y>"``.
    - ``obs["pathology"]``: pathologist region label (8 sections), NaN elsewhere; joined on the
      rounded sub-spot array coordinates of the label files.
    - ``obsm["celltype_props"]``: DataFrame of stereoscope proportions of 8 major cell types.
    - ``obsm["spatial"]``: spot centres in pixels of the attached image (for A1/A2 the 2000 px app
      copies, i.e. pixel coordinates x 2000/6954 and 2000/6966; A2 also mapped into the rigidly
      warped frame of its PNG by an affine map fitted on the spots of
      ``res/ST-cluster/lbl/A2-cluster-annotation.tsv.gz`` that have both frames). Sections without
      an image keep the spot file's full-resolution pixel coordinates.
    - microns per pixel: derived per section from the array pitch: an affine fit of pixel
      coordinates against the spots' array coordinates gives pixels per array step, and one step
      is 200 um (about 0.69 um/px for the full-resolution JPEGs, about 3.2 um/px for the A1/A2
      copies). Spots are 100 um across.
    """
    wanted = _wanted(sections)
    base = resolve_root(root, wanted)
    images = {s: _image_for(base, s) for s in wanted}
    if images_only:
        wanted = [s for s in wanted if images[s][0] is not None]
        if not wanted:
            raise StdistillError("no section with an H&E image in this her2st copy", base)
    parsed = _download.cache_dir() / "parsed"
    zpath = base / _PROPS_ZIP
    zf = zipfile.ZipFile(zpath) if zpath.is_file() else None
    try:  # ~1 min on first run (parsing)
        sections_read = progress(wanted, desc="her2st: reading sections")
        parts = [_read_section(base, s, images[s], zf, parsed) for s in sections_read]
    finally:
        if zf is not None:
            zf.close()
    out = concat(parts) if len(parts) > 1 else parts[0]
    labels = out.obs[Key.obs.pathology]
    cats = sorted(pd.unique(labels.dropna().astype(str)))
    out.obs[Key.obs.pathology] = pd.Categorical(labels.where(labels.notna(), None), categories=cats)
    out.uns[Key.uns.dataset] = "her2st"
    return out
