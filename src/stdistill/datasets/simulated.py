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

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from ..io._section import SPATIAL_KEY, concat, new_section
from ._sim_render import _DENSITY, CELL_TYPES, _frame, _Frame, _render, _smooth_fields

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

# Per cell type (columns follow CELL_TYPES).
_RNA = np.array([1.6, 1.6, 0.5, 0.5, 1.0, 0.8, 0.4])  # relative mRNA per cell
_LINEAGES = {"epithelial": (0, 1), "lymphocyte": (2, 3)}  # lineage-shared markers


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


def _niches(rng: np.random.Generator, fr: _Frame, niche_scale_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Each spot's niche (arg-max of smooth fields on the coarse grid) and its cell-type fractions (n, types)."""
    gh, gw = fr.grid
    fields = _smooth_fields((gh, gw), len(NICHES), niche_scale_um / fr.cell, rng)
    fields += rng.normal(0.0, 0.35, (len(NICHES), 1, 1))  # section-specific niche abundance
    gi = np.clip((fr.xy_um[:, 1] / fr.cell).astype(int), 0, gh - 1)
    gj = np.clip((fr.xy_um[:, 0] / fr.cell).astype(int), 0, gw - 1)
    f = fields[:, gi, gj].T  # (n, niches)
    niche = f.argmax(1)
    soft = np.exp(8.0 * (f - f.max(1, keepdims=True)))  # mixed spots only near niche borders
    soft /= soft.sum(1, keepdims=True)
    alpha = 30.0 * soft @ NICHE_PROTOTYPES + 0.02
    return niche, np.stack([rng.dirichlet(a) for a in alpha])


def _counts(rng, props, density, profiles, gamma, library_size, patient_lib, dispersion) -> np.ndarray:
    """(n, genes) int32 negative binomial counts of the RNA-weighted mixture; library size grows with density."""
    rna = props * _RNA
    p = (rna / rna.sum(1, keepdims=True)) @ profiles * gamma
    p /= p.sum(1, keepdims=True)
    section_lib = np.exp(rng.normal(0.0, 0.15))
    n = len(props)
    lib = library_size * patient_lib * section_lib * (density / 4000.0) ** 0.5 * np.exp(rng.normal(0.0, 0.35, n))
    lam = lib[:, None] * p
    return rng.poisson(rng.gamma(dispersion, lam / dispersion)).astype(np.int32)


def _pathology(rng: np.random.Generator, niche: np.ndarray, label_noise: float) -> tuple[np.ndarray, list[str]]:
    """Pathologist-like labels: the niche's region name, a ``label_noise`` share replaced at random."""
    labels = np.array([NICHE_PATHOLOGY[NICHES[k]] for k in niche], dtype=object)
    classes = sorted(set(NICHE_PATHOLOGY.values()))
    flip = rng.random(len(niche)) < label_noise
    labels[flip] = rng.choice(classes, size=int(flip.sum()))
    return labels, classes


def _section_adata(i, patient, fr, niche, labels, classes, n_cells, counts, props, img, spot_diameter_um):
    """One simulated section in the stdistill layout (:func:`~stdistill.io.new_section`)."""
    section = f"sim{i}"
    spots = [f"{section}_r{r:02d}c{c:02d}" for r, c in fr.rc - fr.rc.min(0)]
    obs = pd.DataFrame(
        {
            "niche_true": pd.Categorical([NICHES[k] for k in niche], categories=list(NICHES)),
            "pathology": pd.Categorical(labels, categories=classes),
            "n_nuclei": n_cells.astype(np.int32),
        },
        index=spots,
    )
    genes = [f"GENE{g + 1:04d}" for g in range(counts.shape[1])]
    adata = new_section(
        counts, genes=genes, spots=spots, xy_px=fr.xy_um / fr.mpp, section=section, patient=f"simP{patient}",
        microns_per_pixel=fr.mpp, spot_diameter_um=spot_diameter_um, image=img, obs=obs,
        source=f"simulated section {section}",
    )
    adata.obsm[Key.obsm.celltype_props] = pd.DataFrame(props, index=adata.obs_names, columns=list(CELL_TYPES))
    adata.uns[SPATIAL_KEY][section]["metadata"].update({"dataset": "simulated", "simulated": True})
    return adata


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
    """Section ``sim<i>``: niches, cell-type mixtures, counts, labels and image from one random stream."""
    rng = _rng(seed, 2, i)
    fr = _frame(rng, spots_per_section, spot_pitch_um, microns_per_pixel, margin_um)
    niche, props = _niches(rng, fr, niche_scale_um)
    area_share = props / _DENSITY  # mm^2 per cell of each type, weighted by fraction
    density = 1.0 / area_share.sum(1)  # cells / mm^2 at this spot
    counts = _counts(rng, props, density, profiles, gamma, library_size, patient_lib, dispersion)
    labels, classes = _pathology(rng, niche, label_noise)
    img, n_cells = _render(rng, fr, props, area_share, density, stain)
    return _section_adata(i, patient, fr, niche, labels, classes, n_cells, counts, props, img, spot_diameter_um)


#: Arguments of :func:`simulated` that every section takes as they are.
_SECTION_ARGS = (
    "spots_per_section", "microns_per_pixel", "spot_pitch_um", "spot_diameter_um", "niche_scale_um",
    "library_size", "dispersion", "label_noise", "margin_um",
)


def _check_args(
    n_sections, n_patients, spots_per_section, label_noise, microns_per_pixel, spot_pitch_um, spot_diameter_um,
    niche_scale_um, library_size, dispersion, **_,
) -> None:
    """Refuse arguments that cannot make a section (one :class:`StdistillError` naming the argument)."""
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


def _patient(seed: int, p: int, n_genes: int, patient_effect: float, stain_variation: float) -> dict:
    """Patient ``p``'s gene scaling (``gamma``), library-size factor and stain strengths (H, E, DAB)."""
    rng = _rng(seed, 3, p)
    return dict(
        gamma=np.exp(rng.normal(0.0, patient_effect, n_genes)),
        patient_lib=float(np.exp(rng.normal(0.0, 0.25))),
        stain=np.array(
            [np.exp(rng.normal(0.0, stain_variation)), np.exp(rng.normal(0.0, stain_variation)),
             abs(rng.normal(0.0, 0.003 + 0.03 * stain_variation))]
        ),
    )


def _sections(params: dict, profiles: np.ndarray) -> list[ad.AnnData]:
    """Every section with its patient's draws; consecutive sections share a patient."""
    seed, n_sections, n_patients = params["seed"], params["n_sections"], params["n_patients"]
    patients = [
        _patient(seed, p, params["n_genes"], params["patient_effect"], params["stain_variation"])
        for p in range(n_patients)
    ]
    shared = {k: params[k] for k in _SECTION_ARGS}
    sections = []
    for i in range(n_sections):
        p = i * n_patients // n_sections
        sections.append(_section(i, seed=seed, patient=p, profiles=profiles, **patients[p], **shared))
    return sections


def _annotate(adata: ad.AnnData, profiles: np.ndarray, marker_of: np.ndarray, params: dict) -> None:
    """Fixed categories, marker labels, cell-type programmes and the parameters (in place)."""
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
    params = dict(locals())  # the arguments, in signature order, with n_patients resolved
    _check_args(**params)
    profiles, marker_of = _programmes(n_genes, n_markers, seed)
    adata = concat(_sections(params, profiles))
    _annotate(adata, profiles, marker_of, params)
    return adata
