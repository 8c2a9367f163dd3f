"""Expression probe inputs: several feature keys (patch + context) and augmented views as training rows."""

import warnings

import numpy as np
import pytest
from test_expression_bench import _section

import stdistill as sd
from stdistill import StdistillError
from stdistill.bench import HestRidge, choose_alpha_cv, with_views
from stdistill.io import concat


def _cohort(n_patients=3, n=40, n_genes=6, k_views=2, seed=0):
    """Patients whose genes depend on 4 patch columns and 2 context columns; views = patch + noise."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    W = rng.normal(size=(6, n_genes)) * 0.5
    feats = [(rng.normal(size=(n, 4)), rng.normal(size=(n, 2))) for _ in range(n_patients)]
    secs = [_section(rng.poisson(np.exp(0.5 + np.c_[X, ctx] @ W)), genes, f"S{p}", f"P{p}", X)
            for p, (X, ctx) in enumerate(feats)]
    a = concat(secs)
    a.obsm["X_f_ctx"] = np.concatenate([ctx for _, ctx in feats])
    a.obsm["X_f_views"] = a.obsm["X_f"][:, None] + 0.3 * rng.normal(size=(a.n_obs, k_views, 4))
    return a, genes


def _bench(a, key, genes, **kw):
    return sd.bench.expression(a, key, genes=genes, key_added=None, **kw)


def test_several_feature_keys_are_concatenated_per_spot():
    a, genes = _cohort()
    a.obsm["X_both"] = np.c_[a.obsm["X_f"], a.obsm["X_f_ctx"]]
    two = _bench(a, ["X_f", "X_f_ctx"], genes)
    one = _bench(a, "X_both", genes)
    np.testing.assert_allclose(two.per_fold["pearson_mean"], one.per_fold["pearson_mean"], rtol=1e-10)
    assert (two.per_fold["pca_dim"] == 6).all()
    assert two.params["feature_key"] == ["X_f", "X_f_ctx"]
    assert two.mean > _bench(a, "X_f", genes).mean  # the context columns carry part of the signal here
    with pytest.raises(StdistillError, match="X_f_missing"):
        _bench(a, ["X_f", "X_f_missing"], genes)
    with pytest.raises(StdistillError, match="twice"):
        _bench(a, ["X_f", "X_f"], genes)


def test_with_views_stacks_rows_and_checks_shape():
    X, Y = np.arange(6.0).reshape(3, 2), np.ones((3, 1))
    V = np.stack([X + 10, X + 20], axis=1)  # (3, 2, 2)
    Xs, Ys = with_views(X, Y, V)
    assert Xs.shape == (9, 2) and Ys.shape == (9, 1)
    np.testing.assert_array_equal(Xs[3:6], X + 10)
    np.testing.assert_array_equal(Xs[6:], X + 20)
    with pytest.raises(StdistillError, match="views must be"):
        with_views(X, Y, V[:2])
    rng = np.random.default_rng(0)
    Xr, Yr, Vr = rng.normal(size=(30, 5)), rng.normal(size=(30, 2)), rng.normal(size=(30, 3, 5))
    p = HestRidge(latent_dim=4).fit(Xr, Yr, views=Vr)
    q = HestRidge(latent_dim=4).fit(*with_views(Xr, Yr, Vr))
    np.testing.assert_allclose(p.predict(Xr), q.predict(Xr), rtol=1e-10)
    assert p.scaler_.n_samples_seen_ == 120


def test_views_are_training_rows_only():
    a, genes = _cohort()
    base = _bench(a, "X_f", genes, views=True, svd_solver="randomized")
    assert (base.per_fold["n_train_rows"] == 3 * base.per_fold["n_train"]).all()
    assert base.params["views"] == 2
    # the held-out patient's views are never read: replacing them changes nothing in its fold
    b = a.copy()
    is_p0 = (b.obs["patient"] == "P0").to_numpy()
    b.obsm["X_f_views"][is_p0] = 1e3
    other = _bench(b, "X_f", genes, views=True, svd_solver="randomized")
    p0 = base.per_fold["test_patients"] == "P0"
    np.testing.assert_array_equal(base.predictions["P0"].to_numpy(), other.predictions["P0"].to_numpy())
    # ... while in the folds that train on P0 they are training rows
    assert not np.allclose(base.per_fold.loc[~p0, "pearson_mean"], other.per_fold.loc[~p0, "pearson_mean"])
    # without views the training rows differ, so the probe does too
    assert not np.allclose(_bench(a, "X_f", genes).per_fold["pearson_mean"], base.per_fold["pearson_mean"])
    # seeded: the same inputs give the same numbers
    again = _bench(a, "X_f", genes, views=True, svd_solver="randomized")
    np.testing.assert_array_equal(again.per_fold["pearson_mean"], base.per_fold["pearson_mean"])


def test_views_with_a_context_key_repeat_its_clean_features():
    a, genes = _cohort()
    res = _bench(a, ["X_f", "X_f_ctx"], genes, views=True)
    b = a.copy()
    b.obsm["X_f_ctx_views"] = np.repeat(b.obsm["X_f_ctx"][:, None], 2, axis=1)
    explicit = _bench(b, ["X_f", "X_f_ctx"], genes, views=True)
    np.testing.assert_allclose(res.per_fold["pearson_mean"], explicit.per_fold["pearson_mean"], rtol=1e-10)
    b.obsm["X_f_ctx_views"] = np.repeat(b.obsm["X_f_ctx"][:, None], 3, axis=1)
    with pytest.raises(StdistillError, match="differ in number"):
        _bench(b, ["X_f", "X_f_ctx"], genes, views=True)
    with pytest.raises(StdistillError, match="X_f_ctx_views"):
        _bench(a, "X_f_ctx", genes, views=True)


def test_alpha_cv_with_views_validates_on_clean_features():
    a, genes = _cohort()
    with warnings.catch_warnings():  # a choice on the edge of this short grid is warned about
        warnings.simplefilter("ignore", UserWarning)
        res = _bench(a, "X_f", genes, views=True, alpha="cv", alphas=(0.01, 1.0, 100.0))
    assert len(res.per_fold) == 3 and np.isfinite(res.per_fold["pearson_mean"]).all()
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    groups = np.repeat(["A", "B"], 20)
    V = rng.normal(size=(40, 2, 3))
    _, s1 = choose_alpha_cv(X, Y, groups, (0.1, 10.0), latent_dim=None, views=V)
    _, s0 = choose_alpha_cv(X, Y, groups, (0.1, 10.0), latent_dim=None)
    assert not np.allclose(s1.to_numpy(), s0.to_numpy())
