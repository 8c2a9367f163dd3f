"""HEST-Benchmark evaluator (stdistill.bench.expression) and HEST gene selection."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

import stdistill as sd
from stdistill import StdistillError
from stdistill.bench import DEFAULT_ALPHAS, HestRidge, choose_alpha_cv, hest_alpha
from stdistill.io import concat, new_section
from stdistill.pp import hest_genes, read_gene_list

# A fixed tiny dataset: 2 patients x 1 section x 8 spots, 3 feature columns, 2 genes.
F = np.array([[0.0, 0.3, -0.27], [-0.89, -0.45, -0.99], [0.06, 1.34, -0.49], [-0.62, 0.49, 0.36],
              [0.11, -0.93, -0.03], [0.7, -1.34, -0.46], [-1.9, -1.29, -1.84], [-0.24, -1.27, 0.27],
              [0.16, -0.19, -2.52], [-0.54, -0.05, 0.11], [-1.53, -0.48, -0.98], [-0.81, 1.06, -0.81],
              [-0.03, 0.88, -0.58], [-0.11, 0.11, 0.06], [-1.23, 0.08, 1.36], [-1.55, 0.86, 0.12]])
C = np.array([[3, 2], [6, 2], [4, 8], [2, 6], [0, 3], [2, 0], [0, 5], [3, 2], [5, 1], [4, 2], [3, 7],
              [5, 10], [1, 4], [5, 3], [1, 8], [0, 3]])

# Expected values, computed independently of stdistill with plain NumPy (not sklearn):
#   for each fold (train on one patient, test on the other):
#     Z = (X_tr - X_tr.mean(0)) / X_tr.std(0)            # StandardScaler (ddof=0)
#     PCA to min(256, 8, 3) = 3 components is a rotation of Z; ridge is rotation invariant,
#     so the no-intercept ridge on Z gives the same predictions:
#     a = 100 / (d * n_genes) = 100 / (3 * 2)
#     beta = np.linalg.lstsq(vstack([Z, sqrt(a) * I3]), vstack([log1p(C_tr), zeros((3, 2))]))
#     P = ((X_te - mean) / std) @ beta
#     r_j = np.corrcoef(log1p(C_te)[:, j], P[:, j])[0, 1]
#   fold score = mean_j r_j; benchmark = mean +- np.std (ddof=0) over the two folds.
EXPECTED_R_TEST_P1 = [-0.3007741140081584, 0.86669391658318]   # trained on P2, tested on P1
EXPECTED_R_TEST_P2 = [-0.3316078456910966, 0.6193219441701237]  # trained on P1, tested on P2
EXPECTED_MEAN, EXPECTED_STD = 0.21340847526351217, 0.06955142602399864


def _section(counts, genes, section, patient, feats=None):
    n = counts.shape[0]
    a = new_section(counts, genes=genes, spots=[f"s{i}" for i in range(n)], xy_px=np.c_[np.arange(n), np.zeros(n)] * 10.0,
                    section=section, patient=patient, microns_per_pixel=1.0, spot_diameter_um=100)
    if feats is not None:
        a.obsm["X_f"] = feats
    return a


@pytest.fixture
def tiny():
    a = _section(C[:8], ["g1", "g2"], "S1", "P1", F[:8])
    b = _section(C[8:], ["g1", "g2"], "S2", "P2", F[8:])
    return concat([a, b])


def test_evaluator_reproduces_independent_numbers(tiny):
    res = sd.bench.expression(tiny, "X_f", genes=["g1", "g2"])
    pf = res.per_fold.set_index("test_patients")
    assert list(pf["pca_dim"]) == [3, 3]
    assert pf["alpha"].iloc[0] == pytest.approx(100 / 6)
    np.testing.assert_allclose(res.per_gene.loc[["g1", "g2"], "P1"], EXPECTED_R_TEST_P1, atol=1e-6)
    np.testing.assert_allclose(res.per_gene.loc[["g1", "g2"], "P2"], EXPECTED_R_TEST_P2, atol=1e-6)
    assert res.mean == pytest.approx(EXPECTED_MEAN, abs=1e-6)
    assert res.std == pytest.approx(EXPECTED_STD, abs=1e-6)
    assert tiny.uns["bench_expression"]["pearson_mean"] == pytest.approx(EXPECTED_MEAN, abs=1e-6)
    # predictions are held-out spots only, aligned to obs names
    assert set(res.predictions["P1"].index) == set(tiny.obs_names[tiny.obs["patient"] == "P1"])


def test_hest_alpha_uses_ridge_input_width():
    assert hest_alpha(256, 50) == pytest.approx(100 / (256 * 50))
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(300, 40)), rng.normal(size=(300, 5))
    assert HestRidge(latent_dim=16).fit(X, Y).alpha_ == pytest.approx(100 / (16 * 5))
    assert HestRidge(latent_dim=None).fit(X, Y).alpha_ == pytest.approx(100 / (40 * 5))


def test_probe_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(50, 12)), rng.normal(size=(50, 3))
    p = HestRidge(latent_dim=8).fit(X, Y, genes=["a", "b", "c"])
    p.save(tmp_path / "probe")
    q = HestRidge.load(tmp_path / "probe")
    np.testing.assert_array_equal(q.predict(X), p.predict(X))  # bit-identical
    assert q.genes_ == ["a", "b", "c"]
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(StdistillError, match="bad.npz"):
        HestRidge.load(tmp_path / "bad.npz")


def test_clip_guards_against_a_feature_constant_on_training_spots(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 6))
    Y = X[:, :2] @ rng.normal(size=(2, 3)) + 0.1 * rng.normal(size=(60, 3))
    X[:, 5] = 1e-9 * rng.normal(size=60)  # (nearly) dead channel on the training spots
    Xt = rng.uniform(-1, 1, size=(20, 6))  # inside the training range
    Xt[:, 5] = 0.0
    Xt[0, 5] = 1.0  # alive on one new spot
    plain = HestRidge(latent_dim=None, alpha=1e-3).fit(X, Y)
    clipped = HestRidge(latent_dim=None, alpha=1e-3, clip=True).fit(X, Y)
    assert np.abs(plain.predict(Xt)[0]).max() > 1e3  # the one spot's prediction explodes
    np.testing.assert_allclose(clipped.predict(Xt[1:]), plain.predict(Xt[1:]), rtol=1e-6, atol=1e-6)
    assert np.abs(clipped.predict(Xt)[0]).max() < 20
    clipped.save(tmp_path / "c")
    np.testing.assert_array_equal(HestRidge.load(tmp_path / "c").predict(Xt), clipped.predict(Xt))


def test_leaky_split_refused(tiny):
    extra = _section(C[:8], ["g1", "g2"], "S1b", "P1", F[:8] + 0.1)
    both = concat([tiny, extra])
    with pytest.raises(StdistillError, match="share patients"):
        sd.bench.expression(both, "X_f", genes=["g1", "g2"], folds=[(["S1", "S2"], ["S1b"])])


def test_hest_split_csvs(tiny, tmp_path):
    d = tmp_path / "splits"
    d.mkdir()
    pd.DataFrame({"sample_id": ["S2"], "patches_path": ["x"], "expr_path": ["y"]}).to_csv(d / "train_0.csv", index=False)
    pd.DataFrame({"sample_id": ["S1"], "patches_path": ["x"], "expr_path": ["y"]}).to_csv(d / "test_0.csv", index=False)
    res = sd.bench.expression(tiny, "X_f", genes=["g1", "g2"], folds=d)
    assert res.mean == pytest.approx(np.mean(EXPECTED_R_TEST_P1), abs=1e-6)
    pd.DataFrame({"sample_id": ["S9"]}).to_csv(d / "test_0.csv", index=False)
    with pytest.raises(StdistillError, match="S9"):
        sd.bench.expression(tiny, "X_f", genes=["g1", "g2"], folds=d)


def test_gene_list_json(tiny, tmp_path):
    f = tmp_path / "var_50genes.json"
    f.write_text(json.dumps({"genes": ["g2", "g1"]}))
    assert read_gene_list(f) == ["g2", "g1"]
    res = sd.bench.expression(tiny, "X_f", genes=f)
    assert res.mean == pytest.approx(EXPECTED_MEAN, abs=1e-6)
    f.write_text(json.dumps({"genes": ["g1", "NOPE"]}))
    with pytest.raises(StdistillError, match="NOPE"):
        sd.bench.expression(tiny, "X_f", genes=f)


def _cohort(n_patients=3, n=60, n_genes=80, seed=0):
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    W = rng.normal(size=(6, n_genes)) * 0.6
    secs = []
    for p in range(n_patients):
        Fp = rng.normal(size=(n, 6))
        lam = np.exp(0.5 + Fp @ W * 0.5)
        counts = rng.poisson(lam)
        counts[:, -1] = 0  # never detected
        counts[: int(0.05 * n), -2] = 0
        counts[int(0.05 * n):, -2] = 0 if p == 0 else counts[int(0.05 * n):, -2]  # < 10% in patient 0 only
        secs.append(_section(counts, genes, f"S{p}", f"P{p}", np.c_[Fp, rng.normal(size=(n, 10))]))
    return concat(secs)


def test_hest_genes_filter_order_and_training_only():
    a = _cohort()
    g = hest_genes(a, 10, sections=["S0", "S1"])
    assert len(g) == 10 and g == sorted(g)
    assert "G079" not in g and "G078" not in g  # G078 is detected in < 10% of S0's spots
    # genes are chosen on the given sections only: the test section cannot change them
    b = a.copy()
    X = b.X.toarray()
    X[(b.obs["section"] == "S2").to_numpy()] = 0
    b.X = X
    assert hest_genes(b, 10, sections=["S0", "S1"]) == g
    with pytest.raises(StdistillError, match="only"):
        hest_genes(a, 79, sections=["S0", "S1"])


def test_hvg_per_fold_and_alpha_cv():
    a = _cohort()
    res = sd.bench.expression(a, "X_f", n_genes=20)
    assert len(res.per_fold) == 3 and res.per_fold["n_genes"].eq(20).all()
    assert res.mean > 0.2  # features carry signal
    cv = sd.bench.expression(a, "X_f", n_genes=20, alpha="cv", alphas=(0.01, 1.0, 1e5))
    assert set(cv.per_fold["alpha"]) <= {0.01, 1.0, 1e5, 100 / (16 * 20)}
    assert 1e5 not in set(cv.per_fold["alpha"])  # a penalty that large removes the signal
    assert "ERR" not in cv.per_gene.index
    with pytest.raises(StdistillError, match="gene"):
        res.gene("ERR")
    with pytest.raises(StdistillError, match="obsm"):
        sd.bench.expression(a, "X_missing")


def _wide_cohort(n_patients=3, n=300, d=400, n_genes=6, seed=0):
    """Patients with more training spots (2 x 300) than feature columns (400) and a flat spectrum:
    sklearn's PCA(256, svd_solver="auto") picks the randomized solver (256 < 0.8 * min(600, 400),
    600 < 10 * 400, max(600, 400) > 500), whose fit_transform differs from fit().transform()."""
    rng = np.random.default_rng(seed)
    genes = [f"W{i}" for i in range(n_genes)]
    W = rng.normal(size=(d, n_genes)) / np.sqrt(d)
    secs = []
    for p in range(n_patients):
        Fp = rng.normal(size=(n, d)) + 0.3 * rng.normal(size=d)
        secs.append(_section(rng.poisson(np.exp(1.0 + 0.8 * Fp @ W)), genes, f"S{p}", f"P{p}", Fp))
    return concat(secs), genes


def _hest_pipeline(X_tr, Y_tr, X_te, seed=1, fit_then_transform=False):
    """HEST's probe step by step with plain sklearn (hest/bench: Pipeline(StandardScaler, PCA(256)).fit_transform,
    then train_test_reg's Ridge); returns test predictions and the PCA solver sklearn used."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_tr)
    pca = PCA(n_components=256, random_state=seed)
    Z_tr = scaler.transform(X_tr)
    Z_tr = pca.fit(Z_tr).transform(Z_tr) if fit_then_transform else pca.fit_transform(Z_tr)
    Z_te = pca.transform(scaler.transform(X_te))
    ridge = Ridge(solver="lsqr", alpha=100 / (Z_tr.shape[1] * Y_tr.shape[1]), fit_intercept=False,
                  random_state=seed, max_iter=1000).fit(Z_tr, Y_tr)
    return ridge.predict(Z_te), pca._fit_svd_solver


def test_evaluator_matches_hest_pipeline_with_randomized_pca():
    from threadpoolctl import threadpool_limits

    a, genes = _wide_cohort()
    X = np.asarray(a.obsm["X_f"])
    Y = np.log1p(a[:, genes].X.toarray().astype(np.float32))
    with threadpool_limits(1):  # randomized SVD at this size: ~0.1 s on one BLAS thread, seconds on a busy many
        res = sd.bench.expression(a, "X_f", genes=genes, key_added=None)  # HEST defaults: svd_solver="auto", seed 1
        for p in ["P0", "P1", "P2"]:
            te = (a.obs["patient"] == p).to_numpy()
            P, solver = _hest_pipeline(X[~te], Y[~te], X[te])
            assert solver == "randomized"  # the case where fit_transform and fit().transform() differ
            r = [np.corrcoef(Y[te][:, j], P[:, j])[0, 1] for j in range(len(genes))]
            np.testing.assert_allclose(res.per_gene.loc[genes, p], r, atol=1e-5)
            # the test can tell: transforming the training spots after fitting is off by far more
            P_old, _ = _hest_pipeline(X[~te], Y[~te], X[te], fit_then_transform=True)
            r_old = [np.corrcoef(Y[te][:, j], P_old[:, j])[0, 1] for j in range(len(genes))]
            assert np.abs(np.subtract(r_old, r)).max() > 1e-4
    assert list(res.per_fold["pca_dim"]) == [256] * 3


def test_alpha_cv_flags_a_choice_on_the_edge_of_its_grid():
    a = _cohort()  # HEST's alpha here: 100 / (16 * 20) = 0.3125; the best alpha lies near 10
    for alphas, end in [((1e5, 1e6), "smallest"), ((1e-3, 1e-2), "largest")]:
        with pytest.warns(UserWarning) as rec:
            res = sd.bench.expression(a, "X_f", n_genes=20, alpha="cv", alphas=alphas, key_added=None)
        assert [str(w.message).split(", the")[0] for w in rec] == [f"fold P{i}: alpha='cv' chose 0.3125" for i in range(3)]
        assert all(f"the {end} value of its grid" in str(w.message) for w in rec)
        assert res.per_fold["alpha_on_edge"].all() and res.per_fold["alpha"].eq(0.3125).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an interior choice is not warned about
        mid = sd.bench.expression(a, "X_f", n_genes=20, alpha="cv", key_added=None)  # DEFAULT_ALPHAS
    assert not mid.per_fold["alpha_on_edge"].any()
    assert mid.per_fold["alpha"].between(min(DEFAULT_ALPHAS), max(DEFAULT_ALPHAS), inclusive="neither").all()
    assert "alpha_on_edge" not in sd.bench.expression(a, "X_f", n_genes=20, key_added=None).per_fold


def test_alpha_cv_inner_fits_use_the_given_svd_solver(monkeypatch):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(90, 40))
    Y = X[:, :3] @ rng.normal(size=(3, 4)) + rng.normal(size=(90, 4))
    groups = np.repeat(["A", "B", "C"], 30)
    alphas = (0.1, 10.0, 1e3)
    scores = {s: choose_alpha_cv(X, Y, groups, alphas, latent_dim=8, svd_solver=s)[1]
              for s in ("full", "covariance_eigh", "randomized")}
    np.testing.assert_allclose(scores["covariance_eigh"], scores["full"], atol=1e-8)  # both exact
    assert np.abs(scores["randomized"] - scores["full"]).max() > 1e-6  # approximate: the solver was used
    seen = []
    orig = HestRidge._reduce_fit

    def spy(self, X):
        seen.append(self.svd_solver)
        return orig(self, X)

    monkeypatch.setattr(HestRidge, "_reduce_fit", spy)
    sd.bench.expression(_cohort(), "X_f", n_genes=20, alpha="cv", alphas=(1.0, 10.0, 100.0),
                        svd_solver="covariance_eigh", key_added=None)
    assert seen == ["covariance_eigh"] * 9  # per fold: 2 inner fits and the probe


def test_missing_extra_gene_warns_and_is_left_out(tiny):
    with pytest.warns(UserWarning, match=r"extra_genes not in the data.*NOPE"):
        res = sd.bench.expression(tiny, "X_f", genes=["g1"], extra_genes=["g2", "NOPE"], key_added=None)
    assert "r_g2" in res.per_fold and "r_NOPE" not in res.per_fold
    assert "NOPE" not in res.per_gene.index and "g2" in res.per_gene.index
    assert res.mean == pytest.approx(sd.bench.expression(tiny, "X_f", genes=["g1"], key_added=None).mean)


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="the reset is to the core count: needs 2+ cores to show")
@pytest.mark.parametrize("call", ["sd.pp.hest_genes(a, 20)",
                                  "sd.teachers.ExpressionTeacher('pca', n_components=4, n_top_genes=100).fit(a)"])
def test_gene_selection_keeps_torch_threads(call):
    """scanpy's first parallel numba kernel (HVGs on sparse counts) resets torch's thread count to the
    core count in a fresh process; hest_genes and ExpressionTeacher keep the caller's count."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1)\nimport stdistill as sd\n"
            f"a = sd.datasets.simulated(2, 2, seed=0, spots_per_section=20)\ntorch.get_num_threads()\n{call}\n"
            "print(torch.get_num_threads())\n")  # (torch's pool in use before the call, as in a benchmark)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1"]
