"""Simulated paired ST + H&E sections with known ground truth (the embedded default data).

Everything here is **simulated**: no real tissue, no real genes. The generative model:

1. **Niches.** Each section is a tissue blob covered by a Visium-like hexagonal spot lattice
   (100 um pitch, 55 um spots). One smooth Gaussian random field per niche (correlation length
   ``niche_scale_um``) is drawn over the section; a spot's niche is the arg-max field
   (spatially coherent, Voronoi-like domains) and its soft niche weights the soft-max.
2. **Cell-type mixture.** A spot's cell-type proportions (fractions of cells) are drawn from a
   Dirichlet centred on the weighted niche prototypes (:data:`NICHE_PROTOTYPES`).
3. **Counts.** Each cell type has an expression programme over ``n_genes`` genes (``GENE0001``...,
   with lineage-shared and type-specific marker genes); a spot's expected profile is the
   RNA-weighted mixture, scaled per patient gene by gene (``patient_effect``, so batch correction
   matters); counts are negative binomial around a library size that grows with cell density.
4. **Image.** An H&E-like RGB image at ``microns_per_pixel`` is rendered from the *same* mixture:
   nuclei placed per spot at each cell type's density with its size, shape and hematoxylin
   darkness, eosin from the cell types' cytoplasm/stroma, composed in skimage's HED colour space
   (:func:`skimage.color.hed2rgb`), with per-patient stain variation. Two pairs of cell types look
   alike (``tumour_A``/``tumour_B``; ``T_cell``/``B_cell``), so morphology carries part, not all,
   of the transcriptomic signal: the ``tumour_A_nest`` and ``tumour_B_nest`` niches differ in
   expression only.

Ground truth: ``obs["niche_true"]``, ``obsm["celltype_props"]`` (DataFrame), ``obs["pathology"]``
(a pathologist-like label derived from the niche, with ``label_noise``), ``obs["n_nuclei"]``,
``var["marker_of"]`` and ``varm["celltype_profile"]``.
"""

from __future__ import annotations

import functools

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from .._errors import StdistillError
from .._keys import Key
from ..io._section import SPATIAL_KEY, concat, new_section

#: Cell types, in the column order of ``obsm["celltype_props"]``.
CELL_TYPES: tuple[str, ...] = ("tumour_A", "tumour_B", "T_cell", "B_cell", "fibroblast", "endothelial", "adipocyte")
#: Niches, in the category order of ``obs["niche_true"]``.
NICHES: tuple[str, ...] = ("tumour_A_nest", "tumour_B_nest", "immune_aggregate", "stroma", "adipose")
#: Niche -> mean cell-type fractions (rows sum to 1; columns follow :data:`CELL_TYPES`).
NICHE_PROTOTYPES = np.array(
    [
        [0.74, 0.02, 0.06, 0.02, 0.10, 0.06, 0.00],
        [0.02, 0.74, 0.06, 0.02, 0.10, 0.06, 0.00],
        [0.06, 0.06, 0.42, 0.28, 0.10, 0.08, 0.00],
        [0.04, 0.04, 0.07, 0.03, 0.59, 0.23, 0.00],
        [0.01, 0.01, 0.03, 0.02, 0.15, 0.13, 0.65],
    ]
)
#: Niche -> what a pathologist would call the region (HER2ST's vocabulary).
NICHE_PATHOLOGY: dict[str, str] = {
    "tumour_A_nest": "invasive cancer",
    "tumour_B_nest": "invasive cancer",
    "immune_aggregate": "immune infiltrate",
    "stroma": "connective tissue",
    "adipose": "adipose tissue",
}

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
_RNA = np.array([1.6, 1.6, 0.5, 0.5, 1.0, 0.8, 0.4])  # relative mRNA per cell
_LINEAGES = {"epithelial": (0, 1), "lymphocyte": (2, 3)}  # lineage-shared markers
_SIZE_BINS, _ANGLE_BINS = 9, 12


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent stream per (seed, purpose, index): a section does not depend on how many others exist."""
    return np.random.default_rng([int(seed), *key])


def _programmes(n_genes: int, n_markers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_types, n_genes) expression proportions (rows sum to 1) and each gene's marker label."""
    n_types = len(CELL_TYPES)
    n_special = (n_types + len(_LINEAGES)) * n_markers
    if n_genes < max(500, 2 * n_special):
        raise StdistillError(f"simulated: n_genes={n_genes} is too small; use >= {max(500, 2 * n_special)}")
    rng = _rng(seed, 1)
    low = rng.random(n_genes) < 0.5  # half the genes are lowly expressed
    base = np.where(low, rng.normal(-3.5, 1.0, n_genes), rng.normal(0.0, 1.2, n_genes))
    logmu = base[None, :] + rng.normal(0.0, 0.25, (n_types, n_genes))
    marker_of = np.array([""] * n_genes, dtype=object)
    genes = rng.permutation(np.flatnonzero(low))[:n_special]  # markers: off everywhere else
    groups = [((t,), CELL_TYPES[t]) for t in range(n_types)] + [(ts, name) for name, ts in _LINEAGES.items()]
    for k, (types, name) in enumerate(groups):
        g = genes[k * n_markers : (k + 1) * n_markers]
        marker_of[g] = name
        boost = rng.normal(np.log(60.0), 0.5, len(g))
        for t in types:
            logmu[t, g] += boost
    mu = np.exp(logmu)
    return mu / mu.sum(1, keepdims=True), marker_of


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


def _section(
    i: int,
    *,
    seed: int,
    patient: int,
    profiles: np.ndarray,
    gamma: np.ndarray,
    patient_lib: float,
    stain: np.ndarray,
    spots_per_section: int,
    microns_per_pixel: float,
    spot_pitch_um: float,
    spot_diameter_um: float,
    niche_scale_um: float,
    library_size: float,
    dispersion: float,
    label_noise: float,
    margin_um: float,
) -> ad.AnnData:
    rng = _rng(seed, 2, i)
    mpp, pitch = microns_per_pixel, spot_pitch_um
    row_pitch = pitch * np.sqrt(3) / 2
    blob = _Blob(spots_per_section * pitch * row_pitch, rng)
    xy_um, rc = _lattice(blob, pitch)
    n = len(xy_um)
    lo = xy_um.min(0) - pitch / 2 - margin_um  # image origin in blob coordinates (um)
    w_px, h_px = (np.ceil((xy_um.max(0) + pitch / 2 + margin_um - lo) / mpp)).astype(int)
    xy_um = xy_um - lo  # um from the image's top-left corner

    # -- niches: arg-max of smooth fields on a coarse grid (10 um cells) --------------------------
    cell = 10.0
    gh, gw = int(np.ceil(h_px * mpp / cell)), int(np.ceil(w_px * mpp / cell))
    fields = _smooth_fields((gh, gw), len(NICHES), niche_scale_um / cell, rng)
    fields += rng.normal(0.0, 0.35, (len(NICHES), 1, 1))  # section-specific niche abundance
    gi = np.clip((xy_um[:, 1] / cell).astype(int), 0, gh - 1)
    gj = np.clip((xy_um[:, 0] / cell).astype(int), 0, gw - 1)
    f = fields[:, gi, gj].T  # (n, niches)
    niche = f.argmax(1)
    soft = np.exp(8.0 * (f - f.max(1, keepdims=True)))  # mixed spots only near niche borders
    soft /= soft.sum(1, keepdims=True)
    alpha = 30.0 * soft @ NICHE_PROTOTYPES + 0.02
    props = np.stack([rng.dirichlet(a) for a in alpha])

    # -- counts -------------------------------------------------------------------------------------
    area_share = props / _DENSITY  # mm^2 per cell of each type, weighted by fraction
    density = 1.0 / area_share.sum(1)  # cells / mm^2 at this spot
    rna = props * _RNA
    p = (rna / rna.sum(1, keepdims=True)) @ profiles * gamma
    p /= p.sum(1, keepdims=True)
    section_lib = np.exp(rng.normal(0.0, 0.15))
    lib = library_size * patient_lib * section_lib * (density / 4000.0) ** 0.5 * np.exp(rng.normal(0.0, 0.35, n))
    lam = lib[:, None] * p
    counts = rng.poisson(rng.gamma(dispersion, lam / dispersion)).astype(np.int32)

    # -- pathologist-like labels: the niche's region name, some spots mislabelled ----------------
    labels = np.array([NICHE_PATHOLOGY[NICHES[k]] for k in niche], dtype=object)
    classes = sorted(set(NICHE_PATHOLOGY.values()))
    flip = rng.random(n) < label_noise
    labels[flip] = rng.choice(classes, size=int(flip.sum()))

    # -- image: every location belongs to its nearest spot and shows that spot's mixture -------------
    tree = cKDTree(xy_um)
    cy, cx = np.meshgrid((np.arange(gh) + 0.5) * cell, (np.arange(gw) + 0.5) * cell, indexing="ij")
    tissue_c = gaussian_filter(blob.inside(cx + lo[0], cy + lo[1]).astype(np.float32), 1.0)
    owner_c = tree.query(np.c_[cx.ravel(), cy.ravel()])[1].reshape(gh, gw)
    area_frac = area_share / area_share.sum(1, keepdims=True)
    eos_c = gaussian_filter((area_frac @ _EOSIN_BG)[owner_c].astype(np.float32), 1.5)
    angle_c = _smooth_fields((gh, gw), 1, 8.0, rng)[0] * 1.2  # local fibre direction (radians)
    tissue = _upsample(tissue_c, w_px, h_px) > 0.5
    E = _upsample(eos_c, w_px, h_px)
    H = np.where(tissue, np.float32(0.012), np.float32(0.0))

    # cells: a Poisson process at the highest density, thinned to each owner spot's density
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
    gy = np.minimum((pos_um[:, 1] / cell).astype(int), gh - 1)
    gx = np.minimum((pos_um[:, 0] / cell).astype(int), gw - 1)
    theta = np.where(_ALIGNED[ctype], angle_c[gy, gx] + rng.normal(0, 0.25, m), rng.uniform(0, np.pi, m))
    body_e = _EOSIN_BODY[ctype] * np.exp(rng.normal(0.0, 0.1, m))
    pos_px = np.round(pos_um / mpp).astype(int)
    fat = ctype == CELL_TYPES.index("adipocyte")
    for sel in (fat, ~fat):  # fat vacuoles first, the other cells over their edges
        _draw(E, pos_px[sel], ctype[sel], size[sel], theta[sel], _BODY_UM, body_e[sel], mpp)
    # nuclei: centred, or pushed to the rim of the cell (adipocytes), tangential there
    phi = rng.uniform(0, 2 * np.pi, m)
    off = (_NUC_OFFSET[ctype] * _BODY_UM[ctype, 1] * size)[:, None] * np.c_[np.cos(phi), np.sin(phi)]
    nuc_theta = np.where(_NUC_OFFSET[ctype] > 0, phi + np.pi / 2, theta) % np.pi
    hema = _HEMA[ctype] * np.exp(rng.normal(0.0, 0.12, m))
    _draw(H, np.round((pos_um + off) / mpp).astype(int), ctype, size, nuc_theta, _NUC_UM, hema, mpp, rim=0.2)
    n_cells = np.bincount(owner, minlength=n)

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

    section = f"sim{i}"
    spots = [f"{section}_r{r:02d}c{c:02d}" for r, c in rc - rc.min(0)]
    obs = pd.DataFrame(
        {
            "niche_true": pd.Categorical([NICHES[k] for k in niche], categories=list(NICHES)),
            "pathology": pd.Categorical(labels, categories=classes),
            "n_nuclei": n_cells.astype(np.int32),
        },
        index=spots,
    )
    genes = [f"GENE{g + 1:04d}" for g in range(profiles.shape[1])]
    adata = new_section(
        counts,
        genes=genes,
        spots=spots,
        xy_px=xy_um / mpp,
        section=section,
        patient=f"simP{patient}",
        microns_per_pixel=mpp,
        spot_diameter_um=spot_diameter_um,
        image=img,
        obs=obs,
        source=f"simulated section {section}",
    )
    adata.obsm[Key.obsm.celltype_props] = pd.DataFrame(props, index=adata.obs_names, columns=list(CELL_TYPES))
    adata.uns[SPATIAL_KEY][section]["metadata"].update({"dataset": "simulated", "simulated": True})
    return adata


def simulated(
    n_sections: int = 6,
    n_patients: int | None = None,
    seed: int = 0,
    *,
    spots_per_section: int = 200,
    n_genes: int = 1000,
    n_markers: int = 15,
    microns_per_pixel: float = 1.0,
    spot_pitch_um: float = 100.0,
    spot_diameter_um: float = 55.0,
    niche_scale_um: float = 150.0,
    library_size: float = 2500.0,
    dispersion: float = 5.0,
    patient_effect: float = 0.4,
    stain_variation: float = 0.15,
    label_noise: float = 0.1,
    margin_um: float = 80.0,
) -> ad.AnnData:
    """Simulated paired ST + H&E sections with known ground truth (no real data; see the module doc).

    Deterministic per ``seed``; section ``i`` depends only on ``seed``, ``i`` and its patient,
    not on ``n_sections``. The default (6 sections x ~200 spots, ~1.8 mm images) takes a few
    seconds.

    Parameters
    ----------
    n_sections
        Sections ``sim0``, ``sim1``, ...; consecutive sections share a patient.
    n_patients
        Patients ``simP0``, ...; each has its own gene scaling and stain. ``<= n_sections``;
        default ``min(3, n_sections)``.
    seed
        Random seed.
    spots_per_section
        Approximate spots per section (the tissue blob is sized for it).
    n_genes
        Genes ``GENE0001``...; >= 500.
    n_markers
        Marker genes per cell type and per lineage (``var["marker_of"]``).
    microns_per_pixel
        Resolution of the rendered image, um/px (1.0 ~ a 10x scan).
    spot_pitch_um, spot_diameter_um
        Centre-to-centre spot distance and spot diameter in um (Visium: 100, 55).
    niche_scale_um
        Correlation length of the niche fields in um (larger -> bigger niche domains).
    library_size
        Median UMIs per spot at a typical cell density (4000 cells/mm^2).
    dispersion
        Negative binomial shape (smaller -> more overdispersed).
    patient_effect
        SD of the per-patient, per-gene log scaling (0 -> no batch effect).
    stain_variation
        SD of the per-patient log hematoxylin/eosin strength (0 -> identical staining).
    label_noise
        Fraction of spots whose ``obs["pathology"]`` is replaced by a random class.
    margin_um
        Glass (background) around the tissue, um.

    Returns
    -------
    One AnnData in the stdistill layout (:func:`stdistill.io.concat` of the sections), with
    raw counts in ``X``, ``obs["section"]``, ``obs["patient"]``, ``obs["niche_true"]``,
    ``obs["pathology"]``, ``obs["n_nuclei"]`` (nuclei drawn in the spot's lattice cell),
    ``obsm["spatial"]`` (px), ``obsm["celltype_props"]`` (DataFrame, fractions of cells),
    ``var["marker_of"]``, ``varm["celltype_profile"]`` (expression proportions per cell type),
    in-memory images in ``uns["spatial"][section]["images"]["fullres"]`` and
    ``uns["simulated"]`` (parameters, cell types, niches).
    """
    if n_patients is None:
        n_patients = min(3, max(n_sections, 1))
    if n_sections < 1 or n_patients < 1 or n_patients > n_sections:
        raise StdistillError(
            f"simulated: need 1 <= n_patients <= n_sections, got n_sections={n_sections}, n_patients={n_patients}"
        )
    if spots_per_section < 10:
        raise StdistillError(f"simulated: spots_per_section={spots_per_section} is too small; use >= 10")
    for name, v in (("microns_per_pixel", microns_per_pixel), ("spot_pitch_um", spot_pitch_um),
                    ("spot_diameter_um", spot_diameter_um), ("niche_scale_um", niche_scale_um),
                    ("library_size", library_size), ("dispersion", dispersion)):
        if not np.isfinite(v) or v <= 0:
            raise StdistillError(f"simulated: {name} must be positive, got {v}")
    if not 0 <= label_noise <= 1:
        raise StdistillError(f"simulated: label_noise must be in [0, 1], got {label_noise}")
    params = dict(
        n_sections=n_sections, n_patients=n_patients, seed=seed, spots_per_section=spots_per_section,
        n_genes=n_genes, n_markers=n_markers, microns_per_pixel=microns_per_pixel, spot_pitch_um=spot_pitch_um,
        spot_diameter_um=spot_diameter_um, niche_scale_um=niche_scale_um, library_size=library_size,
        dispersion=dispersion, patient_effect=patient_effect, stain_variation=stain_variation,
        label_noise=label_noise, margin_um=margin_um,
    )
    profiles, marker_of = _programmes(n_genes, n_markers, seed)
    patients = []
    for p in range(n_patients):
        rng = _rng(seed, 3, p)
        patients.append(
            dict(
                gamma=np.exp(rng.normal(0.0, patient_effect, n_genes)),
                patient_lib=float(np.exp(rng.normal(0.0, 0.25))),
                stain=np.array(
                    [np.exp(rng.normal(0.0, stain_variation)), np.exp(rng.normal(0.0, stain_variation)),
                     abs(rng.normal(0.0, 0.003 + 0.03 * stain_variation))]
                ),
            )
        )
    sections = []
    for i in range(n_sections):
        p = i * n_patients // n_sections
        sections.append(
            _section(
                i, seed=seed, patient=p, profiles=profiles, **patients[p],
                spots_per_section=spots_per_section, microns_per_pixel=microns_per_pixel,
                spot_pitch_um=spot_pitch_um, spot_diameter_um=spot_diameter_um, niche_scale_um=niche_scale_um,
                library_size=library_size, dispersion=dispersion, label_noise=label_noise, margin_um=margin_um,
            )
        )
    adata = concat(sections)
    for k, cats in (("niche_true", list(NICHES)), ("pathology", sorted(set(NICHE_PATHOLOGY.values())))):
        adata.obs[k] = pd.Categorical(adata.obs[k].astype(str), categories=cats)
    adata.var["marker_of"] = pd.Categorical(marker_of.astype(str))
    adata.varm[Key.varm.celltype_profile] = pd.DataFrame(profiles.T, index=adata.var_names, columns=list(CELL_TYPES))
    adata.uns[Key.uns.simulated] = {
        "dataset": "simulated",
        "params": params,
        "cell_types": list(CELL_TYPES),
        "niches": list(NICHES),
        "niche_pathology": dict(NICHE_PATHOLOGY),
    }
    return adata
