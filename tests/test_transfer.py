"""Patient-shift helpers of the niche student: one-patient spatial validation block, augmented
views sampled per epoch, test-time refinement that never reads counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from test_niches import _split, toy

from stdistill import StdistillError
from stdistill.students import NicheStudent, gmm_refine, propagate_labels, refine_niches
from stdistill.students._views import spatial_block
from stdistill.teachers import NicheTeacher


@pytest.fixture(scope="module")
def taught():
    a = toy()
    NicheTeacher(3).fit_predict(a)
    return a


def test_one_training_patient_warns_and_holds_out_a_spatial_block(taught):
    one = _split(taught, "P0")[1]  # patient P0 only
    s = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=6, patience=2, seed=0)
    with pytest.warns(UserWarning, match="one training patient .* spatial block"):
        s.fit(one)
    n = one.n_obs
    assert s.info_["val_patients"] == [] and s.info_["val_block_spots"] == round(0.2 * n)
    assert 1 <= s.info_["best_epoch"] <= 6 and len(s.info_["val_loss_history"]) >= 1
    # the block is one contiguous band along the longer axis
    blk = spatial_block(one, np.ones(n, bool), 0.2)
    x = one.obsm["spatial"][:, int(np.argmax(np.ptp(one.obsm["spatial"], 0)))]
    assert blk.sum() == round(0.2 * n) and x[blk].max() <= x[~blk].min()
    with pytest.warns(UserWarning, match="no early stopping"):
        NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=2, val_block=0).fit(one)
    with pytest.raises(StdistillError, match="val_block must be in"):
        spatial_block(one, np.ones(n, bool), 1.5)


def test_student_samples_augmented_views(taught):
    tr, te = _split(taught)
    rng = np.random.default_rng(0)
    tr.obsm["X_toy_views"] = tr.obsm["X_toy"][:, None, :] + rng.normal(0, 0.3, (tr.n_obs, 2, tr.obsm["X_toy"].shape[1])).astype(np.float32)
    kw = dict(feature_key="X_toy", radius_um=450, max_epochs=4, patience=2, seed=0)
    p1 = NicheStudent(views=True, **kw).fit(tr).predict_proba(te)
    p2 = NicheStudent(views=True, **kw).fit(tr).predict_proba(te)
    np.testing.assert_allclose(p1, p2, atol=1e-6)  # seeded
    assert not np.allclose(p1, NicheStudent(**kw).fit(tr).predict_proba(te), atol=1e-4)
    del tr.obsm["X_toy_views"]
    with pytest.raises(StdistillError, match="X_toy_views"):
        NicheStudent(views=True, **kw).fit(tr)


def test_propagate_labels_smooths_and_keeps_isolated_spots():
    adj = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], float))
    p = np.array([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    q = propagate_labels(adj, p, alpha=0.5)
    np.testing.assert_allclose(q.sum(1), 1)
    np.testing.assert_allclose(q[2], p[2])
    assert 0.5 < q[0, 0] < 1 and 0.5 < q[1, 1] < 1
    np.testing.assert_allclose(propagate_labels(adj, p, alpha=0.0), p)


def _no_counts(a: ad.AnnData, X) -> ad.AnnData:
    """The same spots with ``X`` replaced (None: absent; or garbage)."""
    return ad.AnnData(X=X, obs=a.obs[["section", "patient"]].copy(), obsm={k: a.obsm[k] for k in ("spatial", "X_toy", "pred_probs")},
                      uns={"spatial": a.uns["spatial"]})


@pytest.mark.parametrize("method", ["propagate", "gmm", "both"])
def test_refinement_never_reads_counts(taught, method, monkeypatch):
    tr, te = _split(taught)
    s = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=4, patience=2, seed=0).fit(tr)
    s.predict(te, key_added="pred")
    raw = te.obsm["pred_probs"].copy()
    outs = []
    for X in (None, np.full((te.n_obs, 5), np.nan, np.float32), sp.random(te.n_obs, 7, density=0.3, random_state=1, format="csr")):
        b = _no_counts(te, X)
        refine_niches(b, "pred_probs", method=method, feature_key="X_toy", key_added="ref")
        outs.append(b.obsm["ref_probs"])
        np.testing.assert_array_equal(b.obsm["pred_probs"], raw)  # raw stays
        assert b.uns["ref"]["params"]["method"] == method and list(b.obs["ref"].cat.categories) == ["0", "1", "2"]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    assert np.allclose(outs[0].sum(1), 1, atol=1e-5) and not np.allclose(outs[0], raw)

    # and X is never touched: reading it raises
    def boom(self, *args):
        raise AssertionError("refinement read adata.X")

    b = _no_counts(te, None)
    monkeypatch.setattr(ad.AnnData, "X", property(boom, boom))
    refine_niches(b, "pred_probs", method=method, feature_key="X_toy", key_added="ref")
    np.testing.assert_array_equal(b.obsm["ref_probs"], outs[0])


def test_student_predict_writes_refined_beside_raw(taught):
    tr, te = _split(taught)
    s = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=4, patience=2, seed=0).fit(tr)
    raw = s.predict(te, inplace=False)
    s.predict(te, key_added="pred", refine="both")
    np.testing.assert_array_equal(te.obsm["pred_probs"], raw)
    assert te.obsm["pred_refined_probs"].shape == raw.shape and "pred_refined" in te.obs
    with pytest.raises(StdistillError, match="refinement method"):
        s.predict(te, refine="crf")
    del te.obsm["X_toy"]
    with pytest.raises(StdistillError, match="patch features"):
        refine_niches(te, "pred_probs", method="gmm", feature_key="X_toy")


def test_cli_one_patient_block_and_refine(tmp_path, taught):
    from typer.testing import CliRunner

    from stdistill.cli import app

    src = tmp_path / "t.h5ad"
    taught.write_h5ad(src)
    r = CliRunner()
    with pytest.warns(UserWarning, match="spatial block"):
        res = r.invoke(app, ["niches", "distill", str(src), "-m", str(tmp_path / "s"), "--features", "X_toy",
                             "--train-patients", "P1", "--max-epochs", "3"])
    assert res.exit_code == 0, res.output
    assert "early stopping on a spatial block of" in res.output
    res_distill = res.output
    res = r.invoke(app, ["niches", "predict", str(src), "-m", str(tmp_path / "s"), "-o", str(tmp_path / "p.h5ad"),
                         "--refine", "propagate"])
    assert res.exit_code == 0, res.output
    assert "spots per niche (niche_pred_refined)" in res.output
    out = ad.read_h5ad(tmp_path / "p.h5ad")
    assert out.obsm["niche_pred_refined_probs"].shape == out.obsm["niche_pred_probs"].shape
    np.testing.assert_array_equal(out.obsm["niche_probs"], taught.obsm["niche_probs"])  # the teacher's labels stay
    assert "refinement chosen there: {'method'" in res_distill
    res = r.invoke(app, ["niches", "predict", str(src), "-m", str(tmp_path / "s"), "-o", str(tmp_path / "q.h5ad"),
                         "--refine", "auto"])
    assert res.exit_code == 0, res.output
    chosen = NicheStudent.load(tmp_path / "s").info_["refine"]["method"]
    assert ad.read_h5ad(tmp_path / "q.h5ad").uns["niche_pred_refined"]["params"]["method"] == chosen


def test_gmm_refinement_keeps_the_student_as_prior():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (50, 4)), rng.normal(4, 1, (50, 4))])
    p = np.full((100, 2), 0.5)
    p[:50] = [0.7, 0.3]
    np.testing.assert_allclose(gmm_refine(x, p, weight=0.0), p)  # weight 0: the student unchanged
    q = gmm_refine(x, p, n_iter=3, weight=4.0)
    assert (q[:50, 0] > 0.7).mean() > 0.9 and (q[50:, 1] > 0.5).mean() > 0.9  # the features re-weight
    p[:, 1] = 1e-12
    p[:, 0] = 1.0
    assert np.all(gmm_refine(x, p, n_iter=20, weight=4.0)[:, 0] > 0.999)  # a niche the student rules out stays out
    with pytest.raises(StdistillError, match="weight"):
        gmm_refine(x, p, weight=-1)


def test_refinement_is_chosen_on_the_validation_patient_not_the_test(taught, tmp_path, monkeypatch):
    import stdistill.students._refine as rf

    seen = []
    orig = rf.choose_refinement

    def spy(adata, probs, teacher, rows, *a, **k):
        seen.append(sorted(set(adata.obs["patient"].astype(str)[rows])))
        return orig(adata, probs, teacher, rows, *a, **k)

    monkeypatch.setattr(rf, "choose_refinement", spy)
    tr, te = _split(taught)  # test patient P0 is never given to fit
    grid = [{"method": "none"}, {"method": "propagate", "alpha": 0.3}, {"method": "gmm", "weight": 2.0}]
    s = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=4, patience=2, seed=0, refine_grid=grid).fit(tr)
    assert seen == [s.info_["val_patients"]] and "P0" not in seen[0]
    ref = s.refine_selection_  # a stdistill.select.Selection: one split (the validation spots), ARI per entry
    assert s.info_["refine"] in grid and ref.candidates == grid and ref.criterion.metric == "val_ari"
    scores = ref.scores()["score"].tolist()
    assert all(np.isfinite(v) and -1 <= v <= 1 for v in scores)  # an ARI per candidate, on the validation patient
    assert ref.choice["settings"] == s.info_["refine"] and ref.choice["score"] == max(scores)  # the best validation ARI wins
    s.predict(te, key_added="pred", refine="auto")
    assert te.uns["pred_refined"]["params"]["method"] == s.info_["refine"]["method"]
    s2 = NicheStudent.load(s.save(tmp_path / "st"))
    assert s2.info_["refine"] == s.info_["refine"] and s2.bundle_record()["training"]["refine"] == s.info_["refine"]
    off = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=2, seed=0, refine_grid=[]).fit(tr)
    assert off.info_["refine"] == {"method": "none"}
    off.predict(te, key_added="q", refine="auto")
    np.testing.assert_allclose(te.obsm["q_refined_probs"], te.obsm["q_probs"], atol=1e-6)


def test_student_context_token(taught, tmp_path):
    tr, te = _split(taught)
    rng = np.random.default_rng(1)
    for a in (tr, te):  # a "larger field of view": the patch feature plus noise
        a.obsm["X_ctx"] = (a.obsm["X_toy"] + rng.normal(0, 0.5, a.obsm["X_toy"].shape)).astype(np.float32)
    kw = dict(feature_key="X_toy", radius_um=450, max_epochs=3, patience=2, seed=0, refine_grid=[])
    s = NicheStudent(context_key="X_ctx", **kw).fit(tr)
    p = s.predict_proba(te)
    assert p.shape == (te.n_obs, 3) and np.allclose(p.sum(1), 1, atol=1e-5) and "ctx_feat_mean" not in s.info_
    assert not np.allclose(p, NicheStudent(**kw).fit(tr).predict_proba(te), atol=1e-4)
    np.testing.assert_allclose(NicheStudent.load(s.save(tmp_path / "c")).predict_proba(te), p, atol=1e-5)
    del te.obsm["X_ctx"]
    with pytest.raises(StdistillError, match="X_ctx"):
        s.predict_proba(te)


def test_refinement_feature_radius_student(taught, tmp_path):
    from stdistill.students._refine import resolve_refinement

    tr, te = _split(taught)
    grid = [{"method": "gmm", "weight": 64.0, "feature_radius_um": "student"}]
    s = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=2, seed=0, refine_grid=grid).fit(tr)
    assert s.info_["refine"] == grid[0]  # stored symbolically, resolved when applied
    s.predict(te, key_added="pred", refine="auto")
    assert te.uns["pred_refined"]["params"]["feature_radius_um"] == pytest.approx(450.0)
    wide = te.obsm["pred_refined_probs"].copy()
    s.predict(te, key_added="pred", refine="gmm", refine_kwargs={"weight": 64.0})  # first ring only
    assert te.uns["pred_refined"]["params"]["feature_radius_um"] < 450.0
    assert not np.allclose(wide, te.obsm["pred_refined_probs"], atol=1e-4)
    with pytest.raises(StdistillError, match="student's radius"):
        resolve_refinement(grid[0], None)
    assert NicheStudent.load(s.save(tmp_path / "r")).info_["refine"] == grid[0]
