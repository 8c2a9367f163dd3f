"""Geometry and H&E rendering of the simulated sections (see :mod:`stdistill.datasets.simulated`).

The tissue blob and its spot lattice, the image frame around it, and the image drawn from each
spot's cell-type mixture: cells placed at their type's density with its size, shape and stain,
composed in skimage's HED colour space.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

#: Cell types, in the column order of ``obsm["celltype_props"]``.
CELL_TYPES: tuple[str, ...] = ("tumour_A", "tumour_B", "T_cell", "B_cell", "fibroblast", "endothelial", "adipocyte")

# Morphology per cell type (columns follow CELL_TYPES). Look-alike pairs share every value.
_DENSITY = np.array([7000, 7000, 12000, 12000, 1800, 2500, 250.0])  # cells / mm^2 of pure tissue
# nucleus and cell-body semi-axes (um)
_NUC_UM = np.array([[5.0, 3.8], [5.0, 3.8], [2.9, 2.6], [2.9, 2.6], [6.5, 1.6], [5.0, 1.8], [4.0, 1.4]])
_BODY_UM = np.array([[8.5, 7.0], [8.5, 7.0], [3.8, 3.6], [3.8, 3.6], [9.0, 2.6], [7.0, 2.6], [40.0, 36.0]])
_SIZE_SD = np.array([0.18, 0.18, 0.07, 0.07, 0.12, 0.12, 0.10])  # relative size variation (log SD)
_HEMA = np.array([0.095, 0.095, 0.15, 0.15, 0.12, 0.11, 0.10])  # hematoxylin in the nucleus (HED units)
_EOSIN_BODY = np.array([0.036, 0.036, 0.012, 0.012, 0.050, 0.030, 0.001])  # eosin of the cell body
_EOSIN_BG = np.array([0.020, 0.020, 0.014, 0.014, 0.036, 0.024, 0.024])  # eosin between cells (ECM, membranes)
_NUC_OFFSET = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9])  # nucleus off-centre (fraction of the body radius)
_ALIGNED = np.array([False, False, False, False, True, True, False])  # cells follow the local fibre direction
_SIZE_BINS, _ANGLE_BINS = 9, 12


class _Blob:
    """An irregular ellipse (um): the tissue outline."""

    def __init__(self, area_um2: float, rng: np.random.Generator):
        aspect = rng.uniform(0.87, 1.15)
        self.a, self.b = np.sqrt(area_um2 * aspect / np.pi), np.sqrt(area_um2 / (aspect * np.pi))
        self.phase = rng.uniform(0, 2 * np.pi, 3)

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ang = np.arctan2(y / self.b, x / self.a)
        wobble = 1 + sum(0.05 * np.sin(k * ang + ph) for k, ph in zip((2, 3, 5), self.phase))
        return (x / self.a) ** 2 + (y / self.b) ** 2 <= wobble**2


def _lattice(blob: _Blob, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Hexagonal lattice points (um, blob-centred) inside ``blob``, and their (row, col)."""
    row_pitch = pitch * np.sqrt(3) / 2
    nr, nc = int(2.3 * blob.b / row_pitch) + 4, int(2.3 * blob.a / pitch) + 4
    r, c = np.meshgrid(np.arange(nr), np.arange(nc), indexing="ij")
    y = (r - nr // 2) * row_pitch
    x = (c - nc // 2) * pitch + (r % 2) * pitch / 2
    keep = blob.inside(x, y)
    return np.c_[x[keep], y[keep]], np.c_[r[keep], c[keep]]


def _smooth_fields(shape: tuple[int, int], k: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(k, h, w) standardised Gaussian random fields with correlation length ``sigma`` (grid cells)."""
    f = np.stack([gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect") for _ in range(k)])
    return (f - f.mean(axis=(1, 2), keepdims=True)) / f.std(axis=(1, 2), keepdims=True)


def _upsample(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.array(Image.fromarray(a.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


@functools.lru_cache(maxsize=4096)
def _stamp(ax: float, ay: float, theta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) of a filled ellipse with semi-axes (ax, ay) px rotated by theta, and d^2 in [0, 1]."""
    r = int(np.ceil(max(ax, ay))) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    c, s = np.cos(theta), np.sin(theta)
    u, v = (xx * c + yy * s) / max(ax, 0.5), (-xx * s + yy * c) / max(ay, 0.5)
    d2 = u**2 + v**2
    m = d2 <= 1.0
    if not m.any():
        m[r, r] = True
    return yy[m], xx[m], d2[m]


def _draw(canvas, pos_px, ctype, size, theta, axes_um, value, mpp, rim=0.0) -> None:
    """Paint filled ellipses (one per object) onto ``canvas`` in place; objects sharing a stamp go together.

    ``value`` (n,) is the painted level; ``rim`` > 0 darkens towards the edge (nuclear membrane).
    """
    h, w = canvas.shape
    s_bin = np.clip(np.round(np.log(size) / 0.1) + _SIZE_BINS // 2, 0, _SIZE_BINS - 1).astype(int)
    a_bin = (np.round(theta / (np.pi / _ANGLE_BINS)) % _ANGLE_BINS).astype(int)
    key = (ctype * _SIZE_BINS + s_bin) * _ANGLE_BINS + a_bin
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    for sel in np.split(order, bounds):
        if not len(sel):
            continue
        t, rest = divmod(int(key[sel[0]]), _SIZE_BINS * _ANGLE_BINS)
        sb, ab = divmod(rest, _ANGLE_BINS)
        sc = float(np.exp((sb - _SIZE_BINS // 2) * 0.1))
        ax, ay = (round(float(v) * sc / mpp, 2) for v in axes_um[t])
        dy, dx, d2 = _stamp(ax, ay, ab * np.pi / _ANGLE_BINS)
        yy = pos_px[sel, 1, None] + dy[None, :]
        xx = pos_px[sel, 0, None] + dx[None, :]
        keep = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        shade = (1.0 - rim + 2 * rim * d2) if rim else np.ones_like(d2)
        vals = value[sel, None] * shade[None, :]
        canvas[yy[keep], xx[keep]] = vals[keep]


def _hed_to_rgb(h: np.ndarray, e: np.ndarray, d: float, levels: int = 4096) -> np.ndarray:
    """RGB in [0, 1] (float32, (..., 3)) of hematoxylin ``h``, eosin ``e`` and a constant DAB ``d`` (HED units).

    Exactly skimage's :func:`~skimage.color.hed2rgb`, evaluated per stain on a fine lookup table:
    the stains' optical densities add, so their transmitted RGB multiply.
    """
    from skimage.color import hed2rgb

    top = float(max(h.max(), e.max(), 1e-6))
    grid = np.linspace(0.0, top, levels)
    zero = np.zeros_like(grid)
    lut_h = hed2rgb(np.c_[grid, zero, zero]).astype(np.float32)
    lut_e = hed2rgb(np.c_[zero, grid, zero]).astype(np.float32)
    tint = hed2rgb(np.array([[0.0, 0.0, d]]))[0].astype(np.float32)
    scale = np.float32((levels - 1) / top)
    ih = np.rint(np.clip(h, 0, top) * scale).astype(np.int32)
    ie = np.rint(np.clip(e, 0, top) * scale).astype(np.int32)
    rgb = lut_h[ih]
    rgb *= lut_e[ie]
    rgb *= tint
    return rgb


@dataclasses.dataclass
class _Frame:
    """One section's geometry: spot centres in um from the image's top-left corner, image size (px) and
    the coarse grid (``cell`` um squares) that niche fields and eosin are drawn on."""

    blob: _Blob
    xy_um: np.ndarray  # (n, 2)
    rc: np.ndarray  # (n, 2) lattice (row, col)
    lo: np.ndarray  # image origin in blob coordinates (um)
    w_px: int
    h_px: int
    mpp: float
    cell: float = 10.0

    @property
    def grid(self) -> tuple[int, int]:
        return int(np.ceil(self.h_px * self.mpp / self.cell)), int(np.ceil(self.w_px * self.mpp / self.cell))


def _frame(rng: np.random.Generator, spots_per_section: int, pitch: float, mpp: float, margin_um: float) -> _Frame:
    """Tissue blob sized for ``spots_per_section`` spots, its hexagonal lattice and the image frame around it."""
    row_pitch = pitch * np.sqrt(3) / 2
    blob = _Blob(spots_per_section * pitch * row_pitch, rng)
    xy_um, rc = _lattice(blob, pitch)
    lo = xy_um.min(0) - pitch / 2 - margin_um
    w_px, h_px = (np.ceil((xy_um.max(0) + pitch / 2 + margin_um - lo) / mpp)).astype(int)
    return _Frame(blob, xy_um - lo, rc, lo, w_px, h_px, mpp)


def _stain_maps(rng, fr: _Frame, tree: cKDTree, area_share: np.ndarray):
    """Tissue mask and starting eosin/hematoxylin (full resolution), and the coarse fibre direction.

    Every location belongs to its nearest spot and shows that spot's mixture.
    """
    gh, gw, cell = *fr.grid, fr.cell
    cy, cx = np.meshgrid((np.arange(gh) + 0.5) * cell, (np.arange(gw) + 0.5) * cell, indexing="ij")
    tissue_c = gaussian_filter(fr.blob.inside(cx + fr.lo[0], cy + fr.lo[1]).astype(np.float32), 1.0)
    owner_c = tree.query(np.c_[cx.ravel(), cy.ravel()])[1].reshape(gh, gw)
    area_frac = area_share / area_share.sum(1, keepdims=True)
    eos_c = gaussian_filter((area_frac @ _EOSIN_BG)[owner_c].astype(np.float32), 1.5)
    angle_c = _smooth_fields((gh, gw), 1, 8.0, rng)[0] * 1.2  # local fibre direction (radians)
    tissue = _upsample(tissue_c, fr.w_px, fr.h_px) > 0.5
    E = _upsample(eos_c, fr.w_px, fr.h_px)
    H = np.where(tissue, np.float32(0.012), np.float32(0.0))
    return tissue, E, H, angle_c


def _cells(rng, fr: _Frame, tree: cKDTree, tissue, props, density, angle_c) -> dict[str, np.ndarray]:
    """Cells: a Poisson process at the highest density, thinned to each owner spot's density and the
    tissue; each with a type drawn from its spot's mixture, a size, an orientation and its eosin."""
    mpp, w_px, h_px = fr.mpp, fr.w_px, fr.h_px
    gh, gw = fr.grid
    d_max = float(density.max())
    m = rng.poisson(d_max * w_px * h_px * mpp**2 * 1e-6)
    pos_um = rng.random((m, 2)) * np.array([w_px, h_px]) * mpp
    owner = tree.query(pos_um)[1]
    keep = (rng.random(m) < density[owner] / d_max) & tissue[
        np.minimum((pos_um[:, 1] / mpp).astype(int), h_px - 1), np.minimum((pos_um[:, 0] / mpp).astype(int), w_px - 1)
    ]
    pos_um, owner = pos_um[keep], owner[keep]
    m = len(owner)
    cum = np.cumsum(props[owner], axis=1)
    ctype = np.minimum((rng.random(m)[:, None] > cum).sum(1), len(CELL_TYPES) - 1)
    size = np.exp(rng.normal(0.0, _SIZE_SD[ctype]))
    gy = np.minimum((pos_um[:, 1] / fr.cell).astype(int), gh - 1)
    gx = np.minimum((pos_um[:, 0] / fr.cell).astype(int), gw - 1)
    theta = np.where(_ALIGNED[ctype], angle_c[gy, gx] + rng.normal(0, 0.25, m), rng.uniform(0, np.pi, m))
    body_e = _EOSIN_BODY[ctype] * np.exp(rng.normal(0.0, 0.1, m))
    return dict(pos_um=pos_um, owner=owner, ctype=ctype, size=size, theta=theta, body_e=body_e)


def _paint_cells(rng, fr: _Frame, E: np.ndarray, H: np.ndarray, c: dict[str, np.ndarray]) -> None:
    """Cell bodies into eosin, nuclei into hematoxylin (in place)."""
    mpp, ctype, size = fr.mpp, c["ctype"], c["size"]
    pos_px = np.round(c["pos_um"] / mpp).astype(int)
    fat = ctype == CELL_TYPES.index("adipocyte")
    for sel in (fat, ~fat):  # fat vacuoles first, the other cells over their edges
        _draw(E, pos_px[sel], ctype[sel], size[sel], c["theta"][sel], _BODY_UM, c["body_e"][sel], mpp)
    # nuclei: centred, or pushed to the rim of the cell (adipocytes), tangential there
    m = len(ctype)
    phi = rng.uniform(0, 2 * np.pi, m)
    off = (_NUC_OFFSET[ctype] * _BODY_UM[ctype, 1] * size)[:, None] * np.c_[np.cos(phi), np.sin(phi)]
    nuc_theta = np.where(_NUC_OFFSET[ctype] > 0, phi + np.pi / 2, c["theta"]) % np.pi
    hema = _HEMA[ctype] * np.exp(rng.normal(0.0, 0.12, m))
    _draw(H, np.round((c["pos_um"] + off) / mpp).astype(int), ctype, size, nuc_theta, _NUC_UM, hema, mpp, rim=0.2)


def _to_rgb(rng, fr: _Frame, E: np.ndarray, H: np.ndarray, tissue: np.ndarray, stain: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) image: fibrous eosin texture, the patient's stain strengths, scanner noise, glass."""
    w_px, h_px = fr.w_px, fr.h_px
    nuclear = H > 0.03
    # fibrous eosin texture (~2 um grain), drawn at half resolution
    texture = gaussian_filter(rng.standard_normal(((h_px + 1) // 2, (w_px + 1) // 2), dtype=np.float32), 0.6)
    texture = _upsample(texture * np.float32(1.3) + np.float32(1.0), w_px, h_px)
    E *= np.maximum(texture, 0.3, out=texture)
    E[nuclear] *= 0.35
    H[nuclear] *= np.clip(1.0 + 0.3 * rng.standard_normal(int(nuclear.sum()), dtype=np.float32), 0.5, 1.6)
    E[~tissue] = 0.0
    rgb = _hed_to_rgb(H * np.float32(stain[0]), E * np.float32(stain[1]), float(stain[2]))
    rgb *= 248.0
    rgb += rng.standard_normal((h_px, w_px, 1), dtype=np.float32) * np.float32(1.5) + np.float32(4.0)
    img = np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)
    img[~tissue] = np.clip(252 + rng.integers(-2, 3, (int((~tissue).sum()), 1)), 0, 255)  # glass
    return img


def _render(rng, fr: _Frame, props, area_share, density, stain) -> tuple[np.ndarray, np.ndarray]:
    """The section's H&E-like image (uint8 (h, w, 3)) and the number of cells drawn per spot."""
    tree = cKDTree(fr.xy_um)
    tissue, E, H, angle_c = _stain_maps(rng, fr, tree, area_share)
    cells = _cells(rng, fr, tree, tissue, props, density, angle_c)
    _paint_cells(rng, fr, E, H, cells)
    n_cells = np.bincount(cells["owner"], minlength=len(fr.xy_um))
    return _to_rgb(rng, fr, E, H, tissue, stain), n_cells
