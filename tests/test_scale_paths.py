"""The memory-saving code paths (in place, sparse, by section, streamed PCA) give the same numbers
as the plain formulas they replace (bit for bit, or within a stated tolerance where float64
moments or an exact eigendecomposition replace float32 sums or scikit-learn's PCA)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score
from test_niches import toy

from stdistill._errors import StdistillError
from stdistill._pca import fit_pca, project
from stdistill.students import NicheStudent
from stdistill.students.niche import normalise_features
from stdistill.teachers import NicheTeacher
from stdistill.teachers._embedding import _log_norm, _standardize_by


def _old_standardize(x: np.ndarray, groups: np.ndarray, clip: float = 10.0) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float32)
    for g in pd.unique(groups):
        m = groups == g
        mu, sd = x[m].mean(0), x[m].std(0)
        sd[sd < 1e-8] = np.inf
        out[m] = np.clip((x[m] - mu) / sd, -clip, clip)
    return out


def test_teacher_standardizes_sparse_by_section_as_the_dense_formula():
    a = toy(n_patients=3, grid=6, n_genes=20)
    logx = _log_norm(a)
    groups = a.obs["section"].astype(str).to_numpy()
    old = _old_standardize(logx.toarray(), groups)
    np.testing.assert_array_equal(_standardize_by(logx, groups), old)
    np.testing.assert_array_equal(_standardize_by(logx.toarray(), groups), old)
    assert sp.issparse(logx)
    t = NicheTeacher(3, seed=0).fit(a)
    e = t._embed(a, fit=False)
    z = _old_standardize(_log_norm(a, pd.Index(t.state_["genes"])).toarray(), groups)
    # float64 sparse moments vs float32 dense sums: z-scores agree to float32 rounding
    np.testing.assert_allclose(e, (z - t.state_["pca_mean"]) @ t.state_["pca_components"].T, atol=1e-5)


def test_student_normalises_in_place_as_the_plain_formula():
    a = toy(n_patients=3, grid=6, n_genes=20)
    f = np.asarray(a.obsm["X_toy"], dtype=np.float32).copy()
    f[3] = np.nan
    before = f.copy()
    sec = a.obs["section"].astype(str).to_numpy()
    ok = np.all(np.isfinite(f), axis=1)
    old = np.zeros_like(f)
    for s in pd.unique(sec):
        m = (sec == s) & ok
        mu, sd = f[m].mean(0), f[m].std(0)
        sd[sd < 1e-6] = 1.0
        old[m] = (f[m] - mu) / sd
    z, ok2 = normalise_features(a, f, "section")
    np.testing.assert_array_equal(z, np.clip(old, -10, 10))
    np.testing.assert_array_equal(ok2, ok)
    np.testing.assert_array_equal(f, before)  # the input is not changed
    NicheTeacher(3, seed=0).fit_predict(a)
    s = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=1, n_pcs=4, seed=0).fit(a)
    zp, _ = s._normalise(a, s._features(a), fit=False)
    zs, _ = normalise_features(a, s._features(a), "section")
    np.testing.assert_allclose(zp, (zs - s.info_["pca_mean"]) @ s.info_["pca_components"].T, atol=1e-5)


# ----------------------------------------------------------------------------- streamed PCA
# The old code paths the streamed PCA replaced (dense standardized matrix + scikit-learn PCA),
# kept here as references. Stated tolerance: embeddings agree to 1e-4 (float32 projections of
# z-scores clipped to +-10; components to 1e-4, eigenvectors being as exact as their eigenvalue
# gaps allow) and the fitted niches are the same partition (ARI 1).
def _old_teacher_pcs(self, logx, groups, fit):
    from sklearn.decomposition import PCA

    if self.params["batch_correction"] == "standardize":
        z = _old_standardize(logx.toarray(), groups)
    else:  # global moments, fitted once
        x = logx.toarray()
        if fit:
            sd = x.std(0)
            sd[sd < 1e-8] = np.inf
            self.state_["gene_mean"], self.state_["gene_sd"] = x.mean(0), sd
        z = np.clip((x - self.state_["gene_mean"]) / self.state_["gene_sd"], -10, 10)
    if fit:
        n_pcs = max(1, min(self.params["n_pcs"], z.shape[1], z.shape[0] - 1))
        pca = PCA(n_components=n_pcs, random_state=self.params["seed"], svd_solver="full").fit(z)
        self.state_["pca_components"] = pca.components_.astype(np.float32)
        self.state_["pca_mean"] = pca.mean_.astype(np.float32)
    return ((z - self.state_["pca_mean"]) @ self.state_["pca_components"].T).astype(np.float32)


def _old_student_normalise(self, adata, f, fit, stats=None):
    from sklearn.decomposition import PCA

    z, ok = normalise_features(adata, f, self.config.feature_norm)
    k = self.config.n_pcs
    if fit:
        pca = PCA(n_components=k, random_state=self.config.seed, svd_solver="full").fit(z[ok])
        self.info_["pca_mean"] = pca.mean_.astype(np.float32)
        self.info_["pca_components"] = pca.components_.astype(np.float32)
    z = ((z - self.info_["pca_mean"]) @ self.info_["pca_components"].T).astype(np.float32)
    z[~ok] = 0.0
    return z, ok


def test_streamed_pca_equals_sklearn_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((700, 30)) @ rng.standard_normal((30, 30)) + 50.0).astype(np.float32)  # large mean
    cuts = [0, 1, 250, 251, 700]  # uneven blocks, one of a single row
    blocks = [(np.arange(a, b), x[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    mean, comps = fit_pca(blocks, 5)
    ref = PCA(5, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-6)
    np.testing.assert_allclose(comps, ref.components_, atol=1e-5)  # same signs (svd_flip convention)
    e = project([(b[0], b[1].copy()) for b in blocks], mean, comps, len(x))
    np.testing.assert_allclose(e, ref.transform(x.astype(np.float64)), atol=1e-3)
    assert e.dtype == np.float32 and e.shape == (700, 5)


@pytest.mark.parametrize("correction", ["standardize", None])
def test_teacher_streamed_pca_matches_the_dense_sklearn_path(monkeypatch, correction):
    a = toy(n_patients=3, grid=8, n_genes=30)
    monkeypatch.setenv("STDISTILL_PCA_IN_MEMORY_MB", "0")  # stream at any size
    new = NicheTeacher(3, batch_correction=correction, seed=0).fit(a)
    monkeypatch.setattr(NicheTeacher, "_project_pcs", _old_teacher_pcs)
    old = NicheTeacher(3, batch_correction=correction, seed=0).fit(a)
    if correction is None:
        np.testing.assert_allclose(new.state_["gene_mean"], old.state_["gene_mean"], rtol=1e-6)
        np.testing.assert_allclose(new.state_["gene_sd"], old.state_["gene_sd"], rtol=1e-6)
    np.testing.assert_allclose(new.state_["pca_components"], old.state_["pca_components"], atol=1e-4)
    np.testing.assert_allclose(new._embed(a, fit=False), old._embed(a, fit=False), atol=1e-4)
    assert adjusted_rand_score(old.fit_probs_.argmax(1), new.fit_probs_.argmax(1)) == 1.0


def test_student_streamed_pca_matches_the_dense_sklearn_path(monkeypatch):
    a = toy(n_patients=3, grid=6, n_genes=20, d=24)
    a.obsm["X_toy"][5] = np.nan
    NicheTeacher(3, seed=0).fit_predict(a)
    kw = dict(feature_key="X_toy", radius_um=450, max_epochs=1, n_pcs=6, seed=0)
    monkeypatch.setenv("STDISTILL_PCA_IN_MEMORY_MB", "0")  # stream at any size
    new = NicheStudent(**kw).fit(a)
    zn, okn = new._normalise(a, new._features(a), fit=False)
    monkeypatch.setattr(NicheStudent, "_normalise", _old_student_normalise)
    old = NicheStudent(**kw).fit(a)
    zo, oko = old._normalise(a, old._features(a), fit=False)
    for k in ("pca_mean", "pca_components"):
        assert new.info_[k].dtype == old.info_[k].dtype and new.info_[k].shape == old.info_[k].shape
        np.testing.assert_allclose(new.info_[k], old.info_[k], atol=1e-4)
    np.testing.assert_array_equal(okn, oko)
    np.testing.assert_allclose(zn, zo, atol=1e-4)
    assert not zn[5].any()


def test_pca_streams_only_past_the_in_memory_limit(monkeypatch):
    import stdistill._pca as pca

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    calls = []
    real = pca.fit_pca
    monkeypatch.setattr(pca, "fit_pca", lambda *a, **k: calls.append(1) or real(*a, **k))
    blocks = lambda: iter([(np.arange(0, 100), x[:100].copy()), (np.arange(100, 300), x[100:].copy())])  # noqa: E731
    small = pca.fit_pca_auto(blocks, 300, 12, 4, seed=0)  # 14 KB: scikit-learn's PCA, as earlier releases
    assert calls == []
    monkeypatch.setenv("STDISTILL_PCA_IN_MEMORY_MB", "0.001")
    streamed = pca.fit_pca_auto(blocks, 300, 12, 4, seed=0)
    assert calls == [1]
    np.testing.assert_allclose(np.abs(streamed[1]), np.abs(small[1]), atol=1e-4)
    monkeypatch.setenv("STDISTILL_PCA_IN_MEMORY_MB", "lots")
    with pytest.raises(StdistillError, match="STDISTILL_PCA_IN_MEMORY_MB"):
        pca.fit_pca_auto(blocks, 300, 12, 4)


def test_teacher_fit_builds_the_ring_graph_once(monkeypatch):
    import stdistill.pp.neighbors as nb

    a = toy(n_patients=2, grid=6, n_genes=20)
    calls = []
    real = nb.radius_graph
    monkeypatch.setattr(nb, "radius_graph", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    t = NicheTeacher(3, seed=0).fit(a)
    assert len(calls) == 1
    np.testing.assert_allclose(t.predict_proba(a), t.fit_probs_, atol=1e-6)  # the fitted labels are the predicted ones


def _old_log_norm(adata, genes=None):
    X = sp.csr_matrix(adata.X)
    lib = np.asarray(X.sum(1)).ravel().astype(np.float64)
    lib[lib == 0] = 1.0
    sub = X.astype(np.float32)
    if genes is not None:
        sub = sp.csr_matrix(pd.DataFrame(sub.toarray(), columns=adata.var_names).reindex(columns=genes, fill_value=0.0)
                            .to_numpy(np.float32))
    out = (sp.diags((1e4 / lib).astype(np.float32)) @ sub).tocsr()
    out.data = np.log1p(out.data)
    return out


def test_log_norm_in_place_equals_the_plain_formula():
    a = toy(n_patients=2, grid=5, n_genes=20)
    x = np.asarray(a.X.toarray() if sp.issparse(a.X) else a.X, dtype=np.float32)
    x[0] = 0  # a spot without counts
    a.X = sp.csr_matrix(x)
    before = a.X.copy()
    genes = pd.Index(["g7", "nope", "g2", "g19"])  # another order, a gene the data lacks
    for g in (None, genes):
        new, old = _log_norm(a, g), _old_log_norm(a, g)
        assert sp.isspmatrix_csr(new) and new.dtype == np.float32
        np.testing.assert_array_equal(new.toarray(), old.toarray())
    assert (a.X != before).nnz == 0  # the counts are not changed


def test_memory_budgets_from_the_environment(monkeypatch):
    from stdistill._utils import env_bytes
    from stdistill.adapters._trunk import _LRU

    assert env_bytes("STDISTILL_TEST_UNSET_BUDGET", 4, 2**30) == 4 * 2**30
    monkeypatch.setenv("STDISTILL_TRUNK_MEMORY_GB", "0.5")
    assert _LRU.budget() == 2**29
    monkeypatch.setenv("STDISTILL_TRUNK_MEMORY_GB", "four")
    with pytest.raises(StdistillError, match="STDISTILL_TRUNK_MEMORY_GB"):
        _LRU.budget()
