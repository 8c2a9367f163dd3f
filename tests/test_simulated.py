"""stdistill.datasets.simulated: the embedded default data and its ground truth."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from stdistill import StdistillError, io
from stdistill.datasets import simulated
from stdistill.datasets.simulated import CELL_TYPES, NICHE_PATHOLOGY, NICHES

SMALL = dict(spots_per_section=90, n_genes=500)


@pytest.fixture(scope="module")
def sim():
    return simulated(n_sections=3, n_patients=3, seed=0, **SMALL)


def _dark_fraction(patch: np.ndarray) -> float:
    """Share of hematoxylin-dark pixels (nuclei) in an RGB patch."""
    return float((patch.mean(-1) < 150).mean())


def test_deterministic_per_seed(sim):
    again = simulated(n_sections=3, n_patients=3, seed=0, **SMALL)
    assert sim.X.dtype.kind == "i" and again.X.dtype.kind == "i"
    assert (sim.X != again.X).nnz == 0
    for s in io.sections(sim):
        assert np.array_equal(sim.uns["spatial"][s]["images"]["fullres"], again.uns["spatial"][s]["images"]["fullres"])
    pd.testing.assert_frame_equal(sim.obs, again.obs)
    assert np.array_equal(sim.obsm["spatial"], again.obsm["spatial"])
    other = simulated(n_sections=1, seed=1, **SMALL)
    first = io.subset_sections(sim, ["sim0"])
    assert other.n_obs != first.n_obs or (other.X != first.X).nnz > 0


def test_section_does_not_depend_on_how_many_are_made(sim):
    one = simulated(n_sections=1, n_patients=1, seed=0, **SMALL)
    first = io.subset_sections(sim, ["sim0"])
    assert (one.X != first.X).nnz == 0
    assert np.array_equal(io.image(one, "sim0").array, io.image(first, "sim0").array)


def test_data_model_and_labels(sim):
    assert io.sections(sim) == ["sim0", "sim1", "sim2"]
    assert list(sim.obs["patient"].cat.categories) == ["simP0", "simP1", "simP2"]
    assert sp.issparse(sim.X) and sim.X.format == "csr" and np.issubdtype(sim.X.dtype, np.integer)  # raw counts, CSR
    assert sim.n_vars >= 500 and sim.var_names.is_unique and sim.var_names[0] == "GENE0001"
    for s in io.sections(sim):
        lib = sim.uns["spatial"][s]
        assert lib["metadata"]["dataset"] == "simulated"
        assert io.microns_per_pixel(sim, s) == 1.0
        assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55.0)
        img = io.image(sim, s)
        assert max(img.size) <= 2000 and img.read_region(0, 0, 4, 4).dtype == np.uint8
        w, h = img.size
        xy = sim.obsm["spatial"][(sim.obs["section"] == s).to_numpy()]
        assert (xy[:, 0] > 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] > 0).all() and (xy[:, 1] < h).all()
    assert sim.uns["simulated"]["dataset"] == "simulated"
    # Visium-like lattice: nearest neighbour 100 um away
    xy_um = io.spatial_um(io.subset_sections(sim, ["sim0"]))
    d = NearestNeighbors(n_neighbors=2).fit(xy_um).kneighbors(xy_um)[0][:, 1]
    assert np.allclose(d, 100.0, atol=0.5)
    props = sim.obsm["celltype_props"]
    assert isinstance(props, pd.DataFrame) and list(props.columns) == list(CELL_TYPES)
    assert (props.index == sim.obs_names).all() and np.allclose(props.sum(1), 1.0)
    assert list(sim.obs["niche_true"].cat.categories) == list(NICHES)
    assert set(sim.obs["pathology"].cat.categories) == set(NICHE_PATHOLOGY.values())
    assert list(sim.varm["celltype_profile"].columns) == list(CELL_TYPES)


def test_counts_are_realistic(sim):
    X = sim.X
    assert X.data.min() > 0 and np.issubdtype(X.dtype, np.integer)
    zeros = 1 - X.nnz / (X.shape[0] * X.shape[1])
    assert 0.3 < zeros < 0.95, zeros
    lib = np.asarray(X.sum(1)).ravel()
    assert 500 < np.median(lib) < 20000
    assert lib.std() / lib.mean() > 0.2  # library sizes vary
    detected = np.asarray((X > 0).mean(0)).ravel()
    assert (detected > 0.9).sum() > 20 and (detected < 0.1).sum() > 50  # some genes everywhere, many rare
    # overdispersion: variance well above the mean for most genes (negative binomial, not Poisson)
    dense = X.toarray().astype(float)
    m, v = dense.mean(0), dense.var(0)
    assert np.median((v / np.maximum(m, 1e-9))[m > 1]) > 1.5


def test_niches_are_spatially_coherent(sim):
    agree, chance = [], []
    for s in io.sections(sim):
        m = (sim.obs["section"] == s).to_numpy()
        xy = sim.obsm["spatial"][m]
        nn = NearestNeighbors(n_neighbors=7).fit(xy).kneighbors(xy)[1][:, 1:]
        c = sim.obs["niche_true"].cat.codes.to_numpy()[m]
        agree.append((c[nn] == c[:, None]).mean())
        p = np.bincount(c) / len(c)
        chance.append((p**2).sum())
    assert np.mean(agree) > np.mean(chance) + 0.25, (agree, chance)


def test_expression_follows_cell_types(sim):
    """Marker genes of tumour_A are higher in tumour_A nests than tumour_B nests, and the reverse."""
    X = sim.X.toarray().astype(float)
    X = X / X.sum(1, keepdims=True)
    niche = sim.obs["niche_true"].astype(str).to_numpy()
    a = sim.var["marker_of"].astype(str).to_numpy() == "tumour_A"
    b = sim.var["marker_of"].astype(str).to_numpy() == "tumour_B"
    ina, inb = niche == "tumour_A_nest", niche == "tumour_B_nest"
    assert ina.sum() > 3 and inb.sum() > 3
    assert X[ina][:, a].sum(1).mean() > 3 * X[inb][:, a].sum(1).mean()
    assert X[inb][:, b].sum(1).mean() > 3 * X[ina][:, b].sum(1).mean()


def test_image_carries_part_of_the_signal(sim):
    """Nuclear density and colour follow the niche; the look-alike tumour niches look alike."""
    from stdistill.pp import PatchDataset

    ds = PatchDataset(sim, size_um=80, px=40)
    patches = np.stack([ds.read(i) for i in range(len(ds))])
    ok = ~ds.padded & (patches.min(-1) < 250).reshape(len(ds), -1).all(1)  # whole patch on tissue
    dark = np.array([_dark_fraction(p) for p in patches])
    bright = patches.mean(axis=(1, 2, 3))
    niche = sim.obs["niche_true"].astype(str).to_numpy()
    n_nuc = sim.obs["n_nuclei"].to_numpy()
    from scipy.stats import spearmanr

    assert spearmanr(dark[ok], n_nuc[ok]).statistic > 0.5
    by = pd.DataFrame({"dark": dark, "bright": bright, "niche": niche})[ok].groupby("niche").mean()
    assert by.loc["adipose", "bright"] > by.loc["tumour_A_nest", "bright"] + 10
    assert by.loc["adipose", "dark"] < by.loc["stroma", "dark"] < by.loc["tumour_A_nest", "dark"]
    # tumour_A and tumour_B share every morphology parameter: their nuclear density is alike
    ta, tb = by.loc["tumour_A_nest", "dark"], by.loc["tumour_B_nest", "dark"]
    assert abs(ta - tb) < 0.35 * ta


def test_patient_effects():
    """Gene scaling per patient separates patients; with patient_effect=0 it does not."""
    def patient_gap(effect):
        a = simulated(n_sections=2, n_patients=2, seed=3, patient_effect=effect, stain_variation=effect, **SMALL)
        X = a.X.toarray().astype(float)
        L = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
        p = a.obs["patient"].astype(str).to_numpy()
        expr = np.abs(L[p == "simP0"].mean(0) - L[p == "simP1"].mean(0)).mean()
        colour = [io.image(a, s).array[io.image(a, s).array.mean(-1) < 240].mean(0) for s in ("sim0", "sim1")]
        return expr, np.abs(colour[0] - colour[1]).max()

    e0, c0 = patient_gap(0.0)
    e1, c1 = patient_gap(0.5)
    assert e1 > 1.5 * e0
    assert c1 > c0


def test_pathology_is_a_noisy_view_of_the_niche(sim):
    expected = sim.obs["niche_true"].astype(str).map(NICHE_PATHOLOGY)
    agree = (sim.obs["pathology"].astype(str) == expected).mean()
    assert 0.8 < agree < 0.99  # label_noise=0.1 over 4 classes: about 92%
    clean = simulated(n_sections=1, seed=0, label_noise=0.0, **SMALL)
    assert (clean.obs["pathology"].astype(str) == clean.obs["niche_true"].astype(str).map(NICHE_PATHOLOGY)).all()


def test_bad_parameters():
    with pytest.raises(StdistillError, match="n_patients"):
        simulated(n_sections=2, n_patients=3)
    with pytest.raises(StdistillError, match="n_genes"):
        simulated(n_sections=1, n_genes=100)
    with pytest.raises(StdistillError, match="microns_per_pixel"):
        simulated(n_sections=1, microns_per_pixel=0)


def test_other_resolution():
    a = simulated(n_sections=1, microns_per_pixel=2.0, **SMALL)
    assert io.microns_per_pixel(a) == 2.0
    assert a.uns["spatial"]["sim0"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(27.5)
    xy_um = io.spatial_um(a)
    d = NearestNeighbors(n_neighbors=2).fit(xy_um).kneighbors(xy_um)[0][:, 1]
    assert np.allclose(d, 100.0, atol=1.0)


def _digest(adata) -> dict[str, str]:
    """sha256 (first 16 hex digits) of the counts, obs, obsm and every section's image."""
    import hashlib

    def h(*arrays) -> str:
        m = hashlib.sha256()
        for a in arrays:
            a = np.ascontiguousarray(a)
            m.update(f"{a.dtype}{a.shape}".encode())
            m.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
        return m.hexdigest()[:16]

    X = adata.X
    out = {"X": h(X.data, X.indices, X.indptr, np.array(X.shape))}
    out["obs"] = h(*(np.asarray(adata.obs[c].astype(str)) for c in adata.obs.columns), np.asarray(adata.obs_names))
    out["obsm"] = h(adata.obsm["spatial"], adata.obsm["celltype_props"].to_numpy())
    for s in io.sections(adata):
        out[f"image/{s}"] = h(adata.uns["spatial"][s]["images"]["fullres"])
    return out


# Digests recorded before the simulator was split into named steps. They change when its random
# streams or arithmetic change (and with them every simulated number in the docs), or when the
# libraries its arithmetic runs through change: they are checked only with the releases below.
_RECORDED_WITH = {"numpy": "2.4", "scipy": "1.17", "PIL": "13.0", "skimage": "0.26"}
_DIGESTS = {
    "seed0": (
        dict(n_sections=2, n_patients=2, seed=0, spots_per_section=40, n_genes=500),
        {"X": "a2e689ffce0e080e", "obs": "3917b70a4d16d6e3", "obsm": "fb9e6e077a2b163b",
         "image/sim0": "7c1997e6dd987372", "image/sim1": "002b7781e74b0680"},
    ),
    "seed5": (
        dict(n_sections=3, n_patients=1, seed=5, spots_per_section=30, n_genes=600, microns_per_pixel=2.0,
             label_noise=0.3, niche_scale_um=250.0),
        {"X": "dd510f8e13db28d8", "obs": "adad74e84405e46b", "obsm": "d30295337a9b2e86",
         "image/sim0": "b730b62833d31697", "image/sim1": "d6c9d1bfa09d89a2", "image/sim2": "e7a49b787b6326e4"},
    ),
}


@pytest.mark.parametrize("name", sorted(_DIGESTS))
def test_simulated_is_bit_identical_to_its_recorded_digest(name):
    import importlib

    found = {m: ".".join(importlib.import_module(m).__version__.split(".")[:2]) for m in _RECORDED_WITH}
    if found != _RECORDED_WITH:
        pytest.skip(f"digests were recorded with {_RECORDED_WITH}; this environment has {found}")
    kwargs, expected = _DIGESTS[name]
    assert _digest(simulated(**kwargs)) == expected
