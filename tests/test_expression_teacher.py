"""ExpressionTeacher: PCA teacher, batch standardisation, plug-in interface, scVI error path, KD targets."""

import builtins
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from stdistill import StdistillError
from stdistill.io import concat, new_section
from stdistill.teachers import ExpressionTeacher, register_embedder
from stdistill.teachers.expression import _REGISTRY, teacher_targets


def _cohort(n=40, g=60, seed=0, offset=2.0):
    """Two sections sharing two spot states; section S1's counts are scaled up (a batch effect)."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(g)]
    prog = rng.gamma(1.0, 1.0, size=(2, g))
    secs, states = [], []
    for k in range(2):
        st = rng.integers(0, 2, size=n)
        lam = prog[st] * 3 * (offset if k == 1 else 1.0)
        lam[:, :10] *= (1 + 3 * k)  # a section-specific gene block
        c = rng.poisson(lam)
        secs.append(new_section(c, genes=genes, spots=[f"s{i}" for i in range(n)], xy_px=rng.uniform(0, 100, (n, 2)),
                                section=f"S{k}", patient=f"P{k}", microns_per_pixel=1.0, spot_diameter_um=100))
        states.append(st)
    return concat(secs), np.concatenate(states)


def test_pca_teacher_shapes_and_batch_standardisation():
    a, state = _cohort()
    t = ExpressionTeacher("pca", n_components=5, n_top_genes=30)
    assert t.fit_transform(a, key_added="X_t") is None
    Z = a.obsm["X_t"]
    assert Z.shape == (80, 5) and Z.dtype == np.float32
    assert len(t.genes_) == 30 and t.dim == 5
    # per-section standardisation: the first component separates the spot states, not the sections
    sec = a.obs["section"].cat.codes.to_numpy()
    r_state = abs(np.corrcoef(Z[:, 0], state)[0, 1])
    r_sec = abs(np.corrcoef(Z[:, 0], sec)[0, 1])
    assert r_state > 0.8 and r_sec < 0.2
    g = ExpressionTeacher("pca", n_components=5, n_top_genes=30, standardize="global").fit_transform(a, inplace=False)
    assert abs(np.corrcoef(g[:, 0], sec)[0, 1]) > r_sec  # global scaling keeps the section effect


def test_teacher_save_load(tmp_path):
    a, _ = _cohort()
    t = ExpressionTeacher("pca", n_components=4, n_top_genes=None, standardize="global").fit(a)
    t.save(tmp_path / "t")
    u = ExpressionTeacher.load(tmp_path / "t")
    np.testing.assert_array_equal(u.transform(a), t.transform(a))  # bit-identical


def test_unfitted_and_bad_input():
    a, _ = _cohort()
    with pytest.raises(StdistillError, match="not fitted"):
        ExpressionTeacher().transform(a)
    with pytest.raises(StdistillError, match="unknown teacher method"):
        ExpressionTeacher("nope")
    t = ExpressionTeacher(n_components=3, n_top_genes=None).fit(a)
    b = a[:, :5].copy()
    with pytest.raises(StdistillError, match="gene panel"):
        t.transform(b)


class DummyFM:
    """A stand-in for a single-cell foundation model: counts + gene symbols -> embeddings."""

    dim = 3

    def __init__(self, scale=1.0):
        self.scale, self.seen_genes, self.fitted = scale, None, False

    def fit(self, counts, genes):
        self.fitted = True

    def __call__(self, counts, genes):
        assert sp.issparse(counts) and counts.shape[1] == len(genes)
        self.seen_genes = list(genes)
        x = np.log1p(counts.toarray())
        return self.scale * np.c_[x[:, :10].sum(1), x[:, 10:20].sum(1), x.sum(1)]


def test_plugin_interface_registry_and_object():
    a, _ = _cohort()
    register_embedder("dummy-fm", DummyFM, overwrite=True)
    try:
        t = ExpressionTeacher("dummy-fm", embedder_kwargs={"scale": 2.0}, standardize=None).fit(a)
        Z = t.transform(a)
        assert Z.shape == (80, 3) and t.dim == 3
        assert t._plugin().fitted and t._plugin().seen_genes == list(a.var_names)
        # gene symbols are matched by name: a shuffled gene order gives the same embeddings
        b = a[:, np.random.default_rng(0).permutation(a.n_vars)].copy()
        np.testing.assert_allclose(t.transform(b), Z, rtol=1e-6)
        with pytest.raises(StdistillError, match="already registered"):
            register_embedder("dummy-fm", DummyFM)
        with pytest.raises(StdistillError, match="built-in"):
            register_embedder("pca", DummyFM)
    finally:
        _REGISTRY.pop("dummy-fm", None)
    obj = DummyFM()
    Zb = ExpressionTeacher(obj, standardize="batch").fit(a).transform(a)
    for s in ("S0", "S1"):
        m = (a.obs["section"] == s).to_numpy()
        np.testing.assert_allclose(Zb[m].mean(0), 0, atol=1e-5)
    bad = ExpressionTeacher(lambda c, g: np.zeros((3, 2)), standardize=None)
    with pytest.raises(StdistillError, match="shape"):
        bad.fit(a)


def test_scvi_missing_gives_clear_error(monkeypatch):
    a, _ = _cohort()
    real_import = builtins.__import__

    def no_scvi(name, *args, **kw):
        if name == "scvi" or name.startswith("scvi."):
            raise ImportError("No module named 'scvi'", name="scvi")
        return real_import(name, *args, **kw)

    monkeypatch.delitem(sys.modules, "scvi", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_scvi)
    with pytest.raises(StdistillError, match=r"stdistill\[scvi\]"):
        ExpressionTeacher("scvi", n_components=4, n_top_genes=20).fit(a)


def test_kd_targets():
    rng = np.random.default_rng(0)
    E = np.r_[rng.normal(0, 0.3, (40, 4)), rng.normal(3, 0.3, (40, 4)), rng.normal(-3, 0.3, (40, 4))]
    W, b, P, lab = teacher_targets(E, n_clusters=3, seed=0)
    assert W.shape == (3, 4) and b.shape == (3,) and P.shape == (120, 3)
    np.testing.assert_allclose(P.sum(1), 1, rtol=1e-5)
    assert (P.argmax(1) == lab).mean() > 0.95  # the classifier reproduces the k-means groups
    assert len(set(lab[:40])) == 1 and len(set(lab)) == 3
    W2, b2, P2, _ = teacher_targets(E[:80], n_clusters=2, seed=0)  # binary case
    assert W2.shape == (2, 4) and (P2.argmax(1) == np.r_[np.zeros(40), np.ones(40)]).mean() in (0.0, 1.0)
