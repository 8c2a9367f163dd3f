"""Tiling an H&E-only slide into tissue tiles, in the same AnnData shape as spot data."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from ..io._image import ArrayImage, ImageReader, open_image
from ..io._section import new_section

#: thumbnail pixels along one tile side used to measure its tissue fraction
_THUMB_PX_PER_TILE = 8
#: gaps in the tissue mask narrower than about this (um) are closed (fat cells are 50-150 um)
_CLOSE_UM = 100.0


def _reader(image) -> ImageReader:
    if hasattr(image, "read_region"):
        return image
    if isinstance(image, np.ndarray):
        return ArrayImage(image)
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    raise StdistillError(f"tile: image must be a path, an ImageReader or an RGB array, got {type(image).__name__}")


def slide_mpp(reader) -> float | None:
    """Microns per pixel recorded in a whole-slide file's metadata (tiffslide/openslide), if any."""
    props = getattr(getattr(reader, "_slide", None), "properties", None) or {}
    for key in ("tiffslide.mpp-x", "openslide.mpp-x"):
        try:
            v = float(props.get(key))
        except (TypeError, ValueError):
            continue
        if np.isfinite(v) and v > 0:
            return v
    return None


#: smallest tissue piece kept (um^2): about two 112 um tiles; smaller specks are debris
MIN_AREA_UM2 = 25_000.0
#: holes inside tissue up to this area (um^2) are filled (fat cells, small lumina)
MAX_HOLE_UM2 = 50_000.0


def _otsu(values: np.ndarray) -> float | None:
    from skimage.filters import threshold_otsu

    if values.size < 2 or float(values.max()) - float(values.min()) < 1e-6:
        return None
    return float(threshold_otsu(values))


def _close(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary closing with a disk of radius ``r`` px, via distance transforms (fast for any radius)."""
    from scipy.ndimage import distance_transform_edt

    grown = distance_transform_edt(~np.pad(mask, r + 1)) <= r
    return (distance_transform_edt(grown) > r)[r + 1 : -r - 1, r + 1 : -r - 1]


def _drop_faint_pieces(mask: np.ndarray, od: np.ndarray, share: float = 0.97, ratio: float = 0.5) -> np.ndarray:
    """Second Otsu pass, on optical density (OD) inside the first pass's mask. The piece
    (connected component) with the most pixels in the dense class is the reference tissue; another
    piece is a glass smear when at least ``share`` of its pixels are in the faint class (no nuclei,
    no dense stroma) and its median OD is below ``ratio`` x the reference's."""
    from scipy.ndimage import label, median

    t2 = _otsu(od[mask])
    if t2 is None:
        return mask
    lab, n = label(mask)
    if n < 2:
        return mask
    faint = od <= t2
    size = np.bincount(lab.ravel(), minlength=n + 1)
    n_faint = np.bincount(lab.ravel(), weights=faint.ravel(), minlength=n + 1)
    ref = int(np.argmax(np.where(np.arange(n + 1) > 0, size - n_faint, -1)))
    med = np.r_[0.0, median(od, lab, np.arange(1, n + 1))]
    smear = (n_faint >= share * np.maximum(size, 1)) & (med < ratio * med[ref])
    smear[0] = smear[ref] = False
    return mask & ~smear[lab]


def _by_area(mask: np.ndarray, px_area_um2: float, min_area_um2: float, max_hole_um2: float) -> np.ndarray:
    """Remove pieces smaller than ``min_area_um2`` and fill enclosed holes up to ``max_hole_um2``."""
    from scipy.ndimage import label

    lab, n = label(mask)
    area = np.bincount(lab.ravel(), minlength=n + 1) * px_area_um2
    keep = area >= min_area_um2
    keep[0] = False
    mask = keep[lab]
    holes, m = label(~mask)
    area = np.bincount(holes.ravel(), minlength=m + 1) * px_area_um2
    border = np.unique(np.r_[holes[0], holes[-1], holes[:, 0], holes[:, -1]])
    fill = area <= max_hole_um2
    fill[0] = False
    fill[border] = False
    return mask | fill[holes]


def tissue_mask(
    thumb: np.ndarray,
    close_px: int = 0,
    *,
    um_per_px: float | None = None,
    min_area_um2: float = MIN_AREA_UM2,
    max_hole_um2: float = MAX_HOLE_UM2,
    guard: bool = True,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail (``um_per_px``: micrometres per thumbnail pixel).

    1. Otsu threshold on HSV saturation (median-filtered): glass is grey-white, stain is not.
    2. Pen-mark guard (``guard``): saturated pixels of green/blue hue (70-235 degrees, which H&E
       never takes) and near-black pixels (value < 0.12) are not tissue.
    3. Smear guard (``guard``): a second Otsu pass on optical density inside the mask; pieces
       that are almost all in its faint class, when that class is clearly fainter, are glass
       smears (pale pink films) and are dropped.
    4. Closing with a disk of ``close_px`` thumbnail pixels; then, when ``um_per_px`` is known,
       pieces under ``min_area_um2`` (debris) are removed and enclosed holes up to
       ``max_hole_um2`` filled; without it every enclosed hole is filled.
    """
    from PIL import Image, ImageFilter
    from scipy.ndimage import binary_fill_holes
    from skimage.color import rgb2hsv

    rgb = np.asarray(thumb)[..., :3]
    hsv = rgb2hsv(rgb).astype(np.float32)
    sat = np.round(hsv[..., 1] * 255).astype(np.uint8)
    sat = np.asarray(Image.fromarray(sat).filter(ImageFilter.MedianFilter(5)))
    t1 = _otsu(sat)
    if t1 is None or int(sat.max()) - int(sat.min()) < 5:  # a flat image: one class only
        return np.full(sat.shape, float(sat.mean()) > 25)
    mask = sat > t1
    if guard:
        hue = hsv[..., 0] * 360
        mask &= ~(((hue > 70) & (hue < 235)) | (hsv[..., 2] < 0.12))
        od = -np.log((rgb.astype(np.float32) + 1) / 256).sum(-1)
        mask = _drop_faint_pieces(mask, od)
    if close_px > 0:
        mask = _close(mask, int(close_px))
    if um_per_px is None:
        return binary_fill_holes(mask)
    return _by_area(mask, float(um_per_px) ** 2, min_area_um2, max_hole_um2)


def tile(
    image: str | os.PathLike | ImageReader | np.ndarray,
    *,
    size_um: float = 112.0,
    px: int = 224,
    microns_per_pixel: float | None = None,
    section: str = "slide",
    patient: str | None = None,
    min_tissue: float = 0.5,
    min_area_um2: float | None = None,
    max_hole_um2: float = MAX_HOLE_UM2,
    guard: bool = True,
) -> ad.AnnData:
    """Grid an H&E-only slide into square tiles and keep those on tissue.

    The result has the shape of spot data (see :mod:`stdistill.io._section`), so everything
    downstream (:func:`stdistill.pp.patches`, feature extraction, students) runs on it unchanged:
    ``obs`` = tiles (``obs["section"]``, ``obs["patient"]``, ``obs["tissue_fraction"]``,
    ``obs["tile_row"]``, ``obs["tile_col"]``), ``obsm["spatial"]`` = tile centres in
    full-resolution pixels, ``uns["spatial"][section]`` with the image and its microns per
    pixel, and ``X`` an empty sparse (n_tiles x 0) matrix (no transcriptome).

    Tissue is found on a thumbnail (:func:`tissue_mask`: Otsu on saturation, pen-mark and
    glass-smear guards, gaps up to ~100 um closed, debris and holes judged by area in um^2);
    only whole tiles are made, the grid centred on the image.

    Parameters
    ----------
    image
        Slide path (read lazily), an :class:`~stdistill.io.ImageReader`, or an RGB uint8 array
        (height, width, 3).
    size_um
        Tile side in micrometres (112 um = HEST's 224 px at 0.5 um/px).
    px
        Tile side in pixels the patches will be resampled to (recorded in
        ``uns["spatial"][section]["metadata"]["tile_px"]``; pass it to :func:`~stdistill.pp.patches`).
    microns_per_pixel
        um/px of the full-resolution image; read from a whole-slide file's metadata when omitted.
    section, patient
        Ids written to ``obs`` (``patient`` defaults to ``section``).
    min_tissue
        Keep tiles whose tissue fraction (0-1) is at least this.
    min_area_um2, max_hole_um2, guard
        Passed to :func:`tissue_mask` (areas in square micrometres); ``min_area_um2`` defaults
        to the area of two tiles.
    """
    reader = _reader(image)
    source = getattr(reader, "path", None) or f"image of section {section!r}"
    mpp = microns_per_pixel if microns_per_pixel is not None else slide_mpp(reader)
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise StdistillError(
            "microns per pixel of the slide is missing; pass microns_per_pixel= (Python) or "
            "--mpp (stdistill predict), "
            "e.g. 0.5 for a 20x scan",
            source,
        )
    if not (np.isfinite(size_um) and size_um > 0 and px > 0):
        raise StdistillError(f"tile size must be positive, got size_um={size_um}, px={px}", source)
    if not 0.0 <= min_tissue <= 1.0:
        raise StdistillError(f"min_tissue must be in [0, 1], got {min_tissue}", source)
    w, h = reader.size
    side = size_um / mpp  # full-resolution px
    nx, ny = int(w // side), int(h // side)
    if nx < 1 or ny < 1:
        raise StdistillError(f"the {w}x{h} px image is smaller than one {size_um:g} um tile ({side:.0f} px)", source)
    x0 = (w - nx * side) / 2
    y0 = (h - ny * side) / 2

    # thumbnail with about _THUMB_PX_PER_TILE px per tile side (at least 1024 px, at most the image, 8192 px)
    thumb_max = int(min(max(w, h), 8192, max(1024, np.ceil(_THUMB_PX_PER_TILE * max(w, h) / side))))
    thumb, scale = reader.thumbnail(thumb_max)
    mask = tissue_mask(np.asarray(thumb), close_px=int(round(_CLOSE_UM / 2 * scale / mpp)), um_per_px=mpp / scale,
                       min_area_um2=2 * size_um**2 if min_area_um2 is None else min_area_um2, max_hole_um2=max_hole_um2, guard=guard)
    th, tw = mask.shape
    sx, sy = tw / w, th / h  # thumbnail px per full-res px (may differ by rounding)
    # tissue fraction per tile: mean of the mask over the tile's footprint (summed-area table)
    sat = np.zeros((th + 1, tw + 1))
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    cols, rows = np.meshgrid(np.arange(nx), np.arange(ny))
    cols, rows = cols.ravel(), rows.ravel()
    ax0 = np.clip(np.round((x0 + cols * side) * sx).astype(int), 0, tw)
    ax1 = np.clip(np.round((x0 + (cols + 1) * side) * sx).astype(int), 0, tw)
    ay0 = np.clip(np.round((y0 + rows * side) * sy).astype(int), 0, th)
    ay1 = np.clip(np.round((y0 + (rows + 1) * side) * sy).astype(int), 0, th)
    ax1, ay1 = np.maximum(ax1, ax0 + 1).clip(max=tw), np.maximum(ay1, ay0 + 1).clip(max=th)
    area = np.maximum((ax1 - ax0) * (ay1 - ay0), 1)
    frac = (sat[ay1, ax1] - sat[ay0, ax1] - sat[ay1, ax0] + sat[ay0, ax0]) / area
    keep = frac >= min_tissue
    if not keep.any():
        raise StdistillError(
            f"no tile has at least {min_tissue:.0%} tissue (best {frac.max():.0%}); "
            "lower min_tissue= or check the image",
            source,
        )
    rows, cols, frac = rows[keep], cols[keep], frac[keep]
    xy = np.c_[x0 + (cols + 0.5) * side, y0 + (rows + 0.5) * side]
    ids = [f"{section}_t{r:05d}_{c:05d}" for r, c in zip(rows, cols)]
    obs = pd.DataFrame(
        {
            Key.obs.tissue_fraction: frac.astype(np.float32),
            Key.obs.tile_row: rows.astype(np.int32),
            Key.obs.tile_col: cols.astype(np.int32),
        },
        index=ids,
    )
    adata = new_section(
        None,
        genes=[],
        spots=ids,
        xy_px=xy,
        section=section,
        patient=patient if patient is not None else section,
        microns_per_pixel=float(mpp),
        spot_diameter_um=float(size_um),
        image=reader,
        obs=obs,
        source=source,
    )
    adata.uns[Key.uns.spatial][section]["metadata"].update({"tile_size_um": float(size_um), "tile_px": int(px)})
    return adata
