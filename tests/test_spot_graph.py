"""One spot graph: pp.spot_graph reads obsp (squidpy's layout) and builds a graph at most once per
radius; the niche recipe, its baselines, the student and its refinement read it; a graph the user
supplied under connectivity_key is used as given; a graph of another radius is never reused."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from test_niches import toy

import stdistill.pp.neighbors as nb
from stdistill import pp


@pytest.fixture
def builds(monkeypatch):
    """Every radius graph built: (the AnnData, its spot ids, radius)."""
    seen = []
    real = nb.radius_graph

    def spy(adata, radius_um, *a, **k):
        seen.append((adata, tuple(adata.obs_names), float(radius_um)))  # (holding the AnnData: ids stay unique)
        return real(adata, radius_um, *a, **k)

    monkeypatch.setattr(nb, "radius_graph", spy)
    return seen


def test_spot_graph_is_built_once_per_radius_and_kept_in_obsp(builds):
    a = toy(n_patients=2, grid=5)
    g = pp.spot_graph(a, 450.0)
    assert len(builds) == 1 and a.uns["spatial_neighbors"]["params"]["radius_um"] == 450.0  # squidpy's layout
    assert (a.obsp["spatial_connectivities"] != (g > 0)).nnz == 0
    assert (pp.spot_graph(a, 450.0) != g).nnz == 0 and len(builds) == 1  # read back, not rebuilt
    sub = a[a.obs["patient"] == "P0"].copy()  # a subset inherits it: a radius graph restricted to some spots is theirs
    assert (pp.spot_graph(sub, 450.0) != nb.radius_graph(sub, 450.0)).nnz == 0 and len(builds) == 2
    g2 = pp.spot_graph(a, 250.0)  # another radius: never the stored graph; built once, kept beside it
    assert (g2 != nb.radius_graph(a, 250.0)).nnz == 0 and g2.nnz < g.nnz
    n = len(builds)
    assert pp.radius_key("spatial_connectivities", 250.0) in a.obsp and a.uns["spatial_neighbors"]["params"]["radius_um"] == 450.0
    assert (pp.spot_graph(a, 250.0) != g2).nnz == 0 and len(builds) == n
    pp.spatial_neighbors(a, radius_um=250.0)  # the user's own call rewrites the main key
    assert (pp.spot_graph(a, 250.0) != g2).nnz == 0 and len(builds) == n + 1


def test_a_graph_supplied_by_the_user_is_used_as_given(builds):
    from stdistill.recipes.niches import kmeans_niches
    from stdistill.students import NicheStudent, refine_niches
    from stdistill.teachers import NicheTeacher

    a = toy(n_patients=2, grid=6)
    NicheTeacher(3, seed=0).fit_predict(a)
    a.obsp["spatial_connectivities"] = sp.csr_matrix((a.n_obs, a.n_obs))  # e.g. squidpy's; here: no edges at all
    n = len(builds)
    with pytest.warns(UserWarning, match="records no radius"):
        nbr = kmeans_niches(a, "X_toy", 3, radius_um=450.0, seed=0, inplace=False)
    np.testing.assert_array_equal(nbr, kmeans_niches(a, "X_toy", 3, seed=0, inplace=False))  # no neighbours: own features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        s = NicheStudent(feature_key="X_toy", radius_um=450.0, max_epochs=1, val_patients=None, refine_grid=[]).fit(a)
        assert s.info_["max_neighbors"] == 0  # the centre token only: the graph has no edges
        refine_niches(a, "niche_probs", method="propagate", alpha=0.5, key_added="ref")
    np.testing.assert_allclose(a.obsm["ref_probs"], a.obsm["niche_probs"] / a.obsm["niche_probs"].sum(1, keepdims=True),
                               atol=1e-6)  # propagation without edges changes nothing
    assert len(builds) == n  # nothing was built


def test_the_niche_recipe_builds_each_graph_once(builds):
    from stdistill.recipes import niches

    a = toy(n_patients=3, grid=6, seed=2)
    niches.run(a, "X_toy", 3, seed=0, student_kwargs={"max_epochs": 2, "refine_grid": [{"method": "none"},
               {"method": "gmm", "weight": 4.0, "feature_radius_um": "student"}, {"method": "propagate"}]},
               refine=True, figures=False, verbose=False, label_key=None)
    made = [(id(x), r) for x, _, r in builds]
    assert len(made) == len(set(made))  # no AnnData built a graph of one radius twice
    r_nbr = a.uns["spatial_neighbors"]["params"]["radius_um"]  # the neighbourhood's graph, built on every spot
    assert [(x, r) for x, _, r in builds if r == r_nbr] == [(a, r_nbr)]  # once: baselines, students, refinements read it
    # on every spot: the neighbourhood's graph and the teacher's rings (its own radius, read from obsp
    # when there), each once; the refinement's first ring (6 neighbours) is its own radius, built once
    # on each AnnData it refines
    on_a = [r for x, _, r in builds if x is a]
    assert len(on_a) == len(set(on_a)) == 2 and r_nbr in on_a
    assert any(x is not a for x, _, r in builds if r not in on_a)


def test_the_niche_teacher_reads_its_rings_from_obsp(builds):
    from stdistill.teachers import NicheTeacher

    a = toy(n_patients=2, grid=5)
    t = NicheTeacher(3, method="aggregate", seed=0)
    t.fit(a)
    r = t.state_["radius_um"]
    assert [x is a for x, _, rr in builds if rr == r] == [True] and not len(a.obsp)  # built once, nothing written
    pp.spatial_neighbors(a, radius_um=r)  # the user's graph of that radius, squidpy's layout
    n = len(builds)
    t2 = NicheTeacher(3, method="aggregate", seed=0)
    t2.fit(a)
    assert len(builds) == n  # read from obsp, not rebuilt
    np.testing.assert_allclose(t2.fit_probs_, t.fit_probs_)
