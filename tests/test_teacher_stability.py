"""Niche teacher stability: consensus teacher, K chosen by stability, stability on common spots,
and the report of which patients hold each niche."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_niches import toy

from stdistill import StdistillError, metrics
from stdistill.teachers import NicheTeacher


@pytest.fixture(scope="module")
def data():
    return toy(grid=10)


def test_consensus_teacher_identical_for_the_same_seed_set_and_not_otherwise(data):
    from stdistill.teachers._consensus import ConsensusMixture, member_seeds

    a = data.copy()
    t1 = NicheTeacher(3, consensus=4, seed=0).fit(a)
    t2 = NicheTeacher(3, consensus=4, seed=0).fit(a)
    assert isinstance(t1.state_["gmm"], ConsensusMixture) and t1.state_["gmm"].seeds == [0, 1, 2, 3]
    np.testing.assert_array_equal(t1.fit_probs_, t2.fit_probs_)
    np.testing.assert_array_equal(t1.state_["pca_components"], t2.state_["pca_components"])
    assert t1.state_["pca_components"].shape[0] == 4 * t1.state_["embed_width"]  # one PCA per member
    t3 = NicheTeacher(3, consensus=4, seed=1).fit(a)
    assert t3.state_["gmm"].seeds == [4, 5, 6, 7] and not set(member_seeds(1, 4)) & set(member_seeds(0, 4))
    assert not np.array_equal(t1.fit_probs_, t3.fit_probs_)
    assert not np.array_equal(t1.state_["pca_components"], t3.state_["pca_components"])
    # soft labels: rows sum to 1, argmax is the niche, the consensus finds the toy's niches
    np.testing.assert_allclose(t1.fit_probs_.sum(1), 1, atol=1e-5)
    assert metrics.ari(a.obs["niche_true"], t1.fit_probs_.argmax(1)) > 0.6


def test_consensus_teacher_agreement_predict_and_save_load(tmp_path, data):
    a = data.copy()
    t = NicheTeacher(3, consensus=4, seed=0)
    t.fit_predict(a, key_added="niche")
    p = a.obsm["niche_probs"]
    agree = a.obs["niche_agreement"].to_numpy()
    assert agree.shape == (a.n_obs,) and ((agree >= 0) & (agree <= 1)).all() and agree.mean() > 0.5
    np.testing.assert_allclose(t.state_["gmm"].agreement(t._aggregate(a, t._embed(a, fit=False))), agree, atol=1e-6)
    np.testing.assert_allclose(t.predict_proba(a), p, atol=1e-5)  # new data go through the same members
    t.save(tmp_path / "t")
    t2 = NicheTeacher.load(tmp_path / "t")
    assert t2.params["consensus"] == 4 and t2.state_["gmm"].seeds == [0, 1, 2, 3]
    np.testing.assert_allclose(t2.predict_proba(a), p, atol=1e-5)


def test_stability_is_computed_on_common_spots():
    from stdistill.teachers._stability import pair_ari

    a = pd.Series([0, 0, 1, 1, 2, 2], index=list("abcdef"))
    b = pd.Series([5, 5, 7, 7, 9, 9, 0, 1], index=list("abcdxyzw")[:4] + ["x", "y", "z", "w"])
    v, n = pair_ari(a, b)
    assert n == 4 and v == pytest.approx(1.0)  # a-d agree exactly; e, f and x-w are not compared
    b.loc["c"] = 5
    v2, _ = pair_ari(a, b)
    assert v2 == pytest.approx(metrics.ari([0, 0, 1, 1], [5, 5, 5, 7]))
    with pytest.raises(StdistillError, match="fewer than 2"):
        pair_ari(a, pd.Series([1], index=["q"]))


def test_teacher_stability_pairs_and_subsamples(data):
    from stdistill.teachers._consensus import member_rows
    from stdistill.teachers import spot_agreement, summarise_stability, teacher_stability
    from stdistill.teachers._stability import fit_labels

    a = data.copy()
    pairs, runs = teacher_stability(a, NicheTeacher(3), ks=[2, 3], seeds=(0, 1), n_subsamples=2)
    assert set(pairs["perturbation"]) == {"seed", "solver", "subsample"}
    sub = pairs[pairs["perturbation"] == "subsample"].iloc[0]
    r0, r1 = (set(member_rows(a.n_obs, 10_000 + i, 0.9)) for i in (0, 1))
    assert sub["n_common"] == len(r0 & r1) < a.n_obs  # only the spots both subsamples hold
    assert len(runs["subsample0"][3]) == len(r0)
    assert (pairs.loc[pairs["perturbation"] != "subsample", "n_common"] == a.n_obs).all()
    s = summarise_stability(pairs)
    assert s.set_index(["k", "perturbation"]).loc[(3, "seed"), "n_pairs"] == 1
    # the K loop on one embedding gives NicheTeacher(K)'s own labels
    t = NicheTeacher(3, seed=1, pca_solver="randomized").fit(a)
    np.testing.assert_array_equal(fit_labels(a, NicheTeacher(3), [2, 3], seed=1, pca_solver="randomized")[3].to_numpy(),
                                  t.fit_probs_.argmax(1))
    ref = runs["seed0"][3]
    perm = ref.map({0: 2, 1: 0, 2: 1})  # the same partition under other ids agrees everywhere
    assert (spot_agreement(ref, [perm, runs["subsample0"][3]]).loc[runs["subsample1"][3].index.difference(
        runs["subsample0"][3].index)] == 1).all()


def test_auto_k_in_range_curve_recorded_and_saved(tmp_path, data):
    a = data.copy()
    t = NicheTeacher((2, 5), consensus=4, seed=0)
    t.fit_predict(a, key_added="niche")
    p = a.obsm["niche_probs"]
    st = a.uns["niche_stability"]
    assert list(st["k"]) == [2, 3, 4, 5] and 2 <= t.n_niches <= 5 and p.shape == (a.n_obs, t.n_niches)
    assert st["chosen"] == t.n_niches == st["k"][int(np.argmax(st["score"]))]
    assert ((np.asarray(st["ari_mean"]) <= 1) & (np.asarray(st["n_pairs"]) == 6)).all()
    np.testing.assert_array_equal(st["score"], st["split_mean"])  # a consensus scores its halves' agreement
    t.save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["n_niches"] == t.n_niches and cfg["stability"]["chosen"] == t.n_niches
    assert NicheTeacher.load(tmp_path / "t").n_niches == t.n_niches
    single = NicheTeacher("auto")  # no consensus: the curve from bagged fits on the one embedding
    assert single.params["n_niches"] == list(range(3, 11))
    single.fit(a.copy())
    st1 = single.state_["stability"]
    assert st1["n_repeats"] == 10 and single.n_niches in range(3, 11) and st1["score"] == st1["ari_mean"]


def test_teacher_options_bad_input():
    for kw, msg in [(dict(n_niches="six"), "n_niches"), (dict(n_niches=(1, 4)), ">= 2"), (dict(consensus=0), "consensus"),
                    (dict(method="nolan", consensus=3), "nolan"), (dict(pca_solver="arpack"), "pca_solver")]:
        with pytest.raises(StdistillError, match=msg):
            NicheTeacher(**{"n_niches": 3, **kw})


def test_niche_patients_counts_patients_holding_each_niche():
    niches = ["0"] * 50 + ["1"] * 50 + ["0"] * 99 + ["2"] * 1 + ["1"] * 10 + ["3"] * 90
    pats = ["A"] * 100 + ["B"] * 100 + ["C"] * 100
    held = metrics.niche_patients(niches, pats, categories=["0", "1", "2", "3", "4"])
    assert held.loc["0", ["A", "B", "C"]].tolist() == [50, 99, 0]
    assert held["n_patients"].to_dict() == {"0": 2, "1": 2, "2": 0, "3": 1, "4": 0}  # 1 of B's 100 spots < 2%
    assert held.loc["1", "patients"] == "A,C" and held.loc["3", "patients"] == "C"
    mask = metrics.shared_niche_mask(["0", "1", "3", "2"], niches[:200], pats[:200])
    assert mask.tolist() == [True, True, False, False]  # 3 is C's alone; 2 is 1% of B


def test_cli_teacher_auto_k(tmp_path, data):
    from _cli_helpers import _cli
    from typer.testing import CliRunner

    import stdistill.io as sio
    from stdistill.cli import app

    sio.write_h5ad(data, tmp_path / "toy.h5ad")
    r = CliRunner().invoke(app, ["niches", "teacher", str(tmp_path / "toy.h5ad"), "-o", str(tmp_path / "out.h5ad"),
                                 "-k", "2-4", "--consensus", "3"])
    assert r.exit_code == 0, r.output
    assert "K chosen by stability" in r.output
    out = sio.read_h5ad(tmp_path / "out.h5ad")
    assert list(out.uns["niche_stability"]["k"]) == [2, 3, 4] and "niche_agreement" in out.obs
    bad = _cli("niches", "teacher", str(tmp_path / "toy.h5ad"), "-o", str(tmp_path / "o2.h5ad"), "-k", "lots")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "-k" in bad.stderr


def test_member_pcas_exact_removes_left_out_rows_from_the_full_scatter():
    from stdistill._pca import fit_pca
    from stdistill.teachers._consensus import fit_member_pcas, member_rows

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, 8)) * np.arange(1, 9)).astype(np.float32)

    def blocks(rows):
        rows = np.arange(len(x)) if rows is None else rows
        return [(rows[i:i + 64], x[rows[i:i + 64]]) for i in range(0, len(rows), 64)]

    _, comps = fit_member_pcas(blocks, 300, 8, 3, "exact", [5, 6])
    for r, s in enumerate([5, 6]):
        rows = member_rows(300, s)
        _, ref = fit_pca([(rows, x[rows])], 3)
        np.testing.assert_allclose(comps[3 * r:3 * r + 3], ref, atol=1e-5)
    _, rnd = fit_member_pcas(blocks, 300, 8, 3, "randomized", [5, 6])
    assert rnd.shape == (6, 8) and np.allclose(np.abs(rnd[:3] @ comps[:3].T), np.eye(3), atol=1e-2)
