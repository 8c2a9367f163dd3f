"""bench.expression with feature candidates: the choice is made inside each fold's training patients."""

import anndata as ad
import numpy as np
import pytest
from test_expression_bench import tiny  # noqa: F401 (fixture)
from test_expression_probe_inputs import _cohort

import stdistill as sd
from stdistill import StdistillError


def _with_noise(a, seed=7):
    a.obsm["X_noise"] = np.random.default_rng(seed).normal(size=(a.n_obs, 4))
    return a


def _bench(a, key, genes, **kw):
    return sd.bench.expression(a, key, genes=genes, **kw)


def test_candidate_with_signal_is_chosen_over_noise(tmp_path):
    a, genes = _cohort()
    _with_noise(a)
    cands = {"noise": "X_noise", "signal": "X_f", "signal+views": {"key": "X_f", "views": True}}
    res = _bench(a, cands, genes)
    assert "noise" not in set(res.per_fold["chosen"])
    assert list(res.selection.columns) == list(cands) and list(res.selection.index) == ["P0", "P1", "P2"]
    assert (res.selection[["signal", "signal+views"]].min(axis=1) > res.selection["noise"] + 0.2).all()
    assert list(res.per_fold["chosen"]) == list(res.selection.idxmax(axis=1))
    np.testing.assert_array_equal(res.per_fold["inner_pearson"], res.selection.max(axis=1))
    # the chosen candidate is then fitted on all training patients and scored as a single key would be
    single = {"signal": _bench(a, "X_f", genes, key_added=None), "signal+views": _bench(a, "X_f", genes, views=True, key_added=None)}
    expected = [single[c].per_fold["pearson_mean"][i] for i, c in enumerate(res.per_fold["chosen"])]
    np.testing.assert_array_equal(res.per_fold["pearson_mean"], expected)
    assert res.params["views"] == {"noise": 0, "signal": 0, "signal+views": 2}
    uns = a.uns["bench_expression"]
    assert list(uns["per_fold"]["chosen"]) == list(res.per_fold["chosen"])
    np.testing.assert_array_equal(uns["selection"]["inner_pearson"]["noise"], res.selection["noise"])
    a.write_h5ad(tmp_path / "a.h5ad")  # the record is h5ad-writable
    assert list(ad.read_h5ad(tmp_path / "a.h5ad").uns["bench_expression"]["selection"]["folds"]) == ["P0", "P1", "P2"]


def test_choice_never_reads_the_test_patient():
    a, genes = _cohort()
    _with_noise(a)
    fold = sd.pp.folds(a)[0]  # test patient P0
    assert fold.patients_of("test") == ["P0"]
    cands = {"noise": "X_noise", "signal": "X_f"}
    res = _bench(a, cands, None, n_genes=4, min_frac=0.0, folds=[fold], key_added=None)
    # poison the test patient: its features and counts would change every inner score that read them
    b = a.copy()
    te = (b.obs["patient"] == "P0").to_numpy()
    rng = np.random.default_rng(1)
    for k in ("X_noise", "X_f"):
        b.obsm[k][te] = 50 * rng.normal(size=(te.sum(), 4))
    X = np.asarray(b.X.todense() if hasattr(b.X, "todense") else b.X).copy()
    X[te] = rng.permutation(X[te])[:, ::-1] * 7
    b.X = X
    poisoned = _bench(b, cands, None, n_genes=4, min_frac=0.0, folds=[fold], key_added=None)
    np.testing.assert_array_equal(poisoned.selection.to_numpy(), res.selection.to_numpy())
    assert list(poisoned.per_fold["chosen"]) == list(res.per_fold["chosen"]) == ["signal"]
    assert poisoned.per_fold["pearson_mean"][0] != res.per_fold["pearson_mean"][0]  # the held-out score did read them


def test_single_key_and_single_candidate_agree(tiny):  # noqa: F811
    one = sd.bench.expression(tiny, "X_f", genes=["g1", "g2"], key_added=None)
    assert one.selection is None and "chosen" not in one.per_fold
    assert "selection" not in one.to_uns()
    with pytest.raises(StdistillError, match="at least 2 training patients"):  # 2 patients: 1 per training side
        sd.bench.expression(tiny, {"f": "X_f"}, genes=["g1", "g2"], key_added=None)
    a, genes = _cohort()
    single = _bench(a, "X_f", genes, key_added=None)
    cand = _bench(a, {"f": "X_f"}, genes, key_added=None)
    np.testing.assert_array_equal(cand.per_fold["pearson_mean"], single.per_fold["pearson_mean"])
    assert list(cand.per_fold["chosen"]) == ["f"] * 3
    with pytest.raises(StdistillError, match="at least 3 training patients.*alpha=cv"):  # cv nests inside the inner folds
        _bench(a, {"f": "X_f"}, genes, alpha="cv", key_added=None)


@pytest.mark.parametrize("cands, match", [
    ({}, "empty dict"),
    ({"a": "X_f", "b": "X_missing"}, "'b'.*X_missing"),
    ({"a": ["X_f", "X_f"]}, "'a'.*twice"),
    ({"a": {"keys": "X_f"}}, "'a' must be a key"),
    ({"a": {"key": "X_f_ctx", "views": True}}, "X_f_ctx_views"),
])
def test_bad_candidates_are_one_clear_error(cands, match):
    a, genes = _cohort(n=10)
    with pytest.raises(StdistillError, match=match):
        _bench(a, cands, genes, key_added=None)


def test_each_fold_keeps_its_selection_and_the_scores_recorded_before_the_engine():
    """Inner scores recorded by benchmarks/checks/select_parity.py on the code before the selection
    engine: the same choices, the same scores (to rounding; the same machine gives the same bits)."""
    a, genes = _cohort()
    _with_noise(a)
    cands = {"noise": "X_noise", "signal": "X_f", "signal+views": {"key": "X_f", "views": True}}
    res = _bench(a, cands, genes, key_added=None)
    recorded = {"noise": ["-0x1.0a5bb1fcdb0acp-3", "-0x1.74c22be1eafbep-9", "-0x1.93bbe793ac3d3p-7"],
                "signal": ["0x1.0c7f97098f7acp-1", "0x1.3c0bae9268e06p-1", "0x1.187aa3475e2edp-1"],
                "signal+views": ["0x1.0ab9d14743aeep-1", "0x1.3a796c7089252p-1", "0x1.19f9f91a2563ap-1"]}
    for c, v in recorded.items():
        np.testing.assert_allclose(res.selection[c], [float.fromhex(x) for x in v], rtol=1e-12)
    assert list(res.per_fold["chosen"]) == ["signal", "signal", "signal+views"]
    for fold, sel in res.selections.items():
        assert fold not in set(sel.table["split"]) and sel.table["split"].nunique() == 2  # the test patient never validates
        assert sel.choice["settings"]["features"] == res.per_fold.set_index("fold").loc[fold, "chosen"]
        assert sel.scores()["score"].tolist() == res.selection.loc[fold].tolist()
