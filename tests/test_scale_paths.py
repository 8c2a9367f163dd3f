"""The memory-saving code paths (in place, sparse, by section) give the same numbers as the plain
formulas they replace: the docs' benchmark numbers stay valid (docs/scale.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from test_niches import toy

from stdistill.students import NicheStudent
from stdistill.students.niche import normalise_features
from stdistill.teachers import NicheTeacher
from stdistill.teachers.niche import _log_norm, _standardize_by


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
    np.testing.assert_array_equal(e, ((z - t.state_["pca_mean"]) @ t.state_["pca_components"].T).astype(np.float32))


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
    np.testing.assert_array_equal(zp, ((zs - s.info_["pca_mean"]) @ s.info_["pca_components"].T).astype(np.float32))
