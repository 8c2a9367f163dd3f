"""The conventions every public function shares: the key table, the return rule, renamed keywords."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from _io_helpers import colour_sections

import stdistill as sd
from stdistill import StdistillError
from stdistill._api import deliver, renamed_kwargs
from stdistill.keys import Key


def test_key_table_documents_every_key():
    """Each constant of :class:`Key` appears in the table of the module docstring (they cannot drift)."""
    import stdistill._keys as keys

    table = keys.__doc__
    for slot in ("obs", "obsm", "obsp", "uns", "layers", "varm"):
        values = [v for k, v in vars(getattr(Key, slot)).items() if not k.startswith("_") and isinstance(v, str)]
        assert values, slot
        missing = [v for v in values if f"``{v}``" not in table]
        assert not missing, f"Key.{slot} names keys the table does not list: {missing}"
    assert Key.obsm.features("uni") == "X_uni" and Key.obsm.probs("niche") == Key.obsm.niche_probs
    assert Key.obsp.connectivities() == Key.obsp.spatial_connectivities == "spatial_connectivities"
    assert Key.uns.neighbors() == Key.uns.spatial_neighbors
    assert sd.keys.Key is Key


def test_deliver_follows_the_return_rule():
    a = colour_sections(1, 2)

    def write(target):
        target.obs["x"] = np.arange(target.n_obs)

    assert deliver(a, "value", write, inplace=False) == "value" and "x" not in a.obs
    b = deliver(a, "value", write, copy=True)
    assert b is not a and "x" in b.obs and "x" not in a.obs
    assert deliver(a, "value", write) is None and "x" in a.obs
    with pytest.raises(StdistillError, match="pass one of them"):
        deliver(a, "value", write, copy=True, inplace=False)


def test_renamed_kwargs_warns_and_refuses_both():
    @renamed_kwargs(old_name="new_name")
    def f(x, new_name=None):
        return new_name

    with pytest.warns(DeprecationWarning, match=r"f\(old_name=\.\.\.\) is now f\(new_name=\.\.\.\)") as rec:
        assert f(1, old_name=5) == 5
    assert rec[0].filename == __file__  # points at the caller, not at the helper
    with pytest.raises(StdistillError, match="got both old_name= and new_name="):
        f(1, old_name=5, new_name=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(1, new_name=7) == 7


def test_niche_teacher_use_rep_is_feature_key():
    from stdistill.teachers import NicheTeacher

    with pytest.warns(DeprecationWarning, match=r"NicheTeacher\(use_rep=\.\.\.\) is now NicheTeacher\(feature_key=\.\.\.\)"):
        t = NicheTeacher(3, use_rep="X_e")
    assert t.params["feature_key"] == "X_e" and "use_rep" not in t.params


def test_aggregate_neighbors_use_rep_is_feature_key():
    a = colour_sections(1, 3, feature_key="X_e")
    new = sd.pp.aggregate_neighbors(a, "X_e", radius_um=1e6, mode="mean", copy=True)
    with pytest.warns(DeprecationWarning, match="aggregate_neighbors"):
        old = sd.pp.aggregate_neighbors(a, use_rep="X_e", radius_um=1e6, mode="mean", copy=True)
    np.testing.assert_array_equal(old.obsm["X_e_agg"], new.obsm["X_e_agg"])


def test_cohort_from_tiles_features_key_is_feature_key():
    from stdistill.recipes import cohort_from_tiles

    tiles = colour_sections(2, 2, feature_key="X_a")
    tiles.obsm["X_b"] = np.zeros((tiles.n_obs, 2), np.float32)
    table = pd.DataFrame({"time": [1.0, 2.0], "event": [1, 0]}, index=sorted(tiles.obs["patient"].astype(str).unique()))
    with pytest.warns(DeprecationWarning, match="cohort_from_tiles"):
        c = cohort_from_tiles(tiles, table, features_key="X_b")
    assert c.meta["feature_key"] == "X_b" and all((b == 0).all() for b in c.bags.values())


def test_expression_teacher_fit_transform_key_added_none_is_inplace_false():
    from stdistill.teachers import ExpressionTeacher

    a = colour_sections(2, 4)
    with pytest.warns(DeprecationWarning, match=r"fit_transform\(key_added=None\) is now .*inplace=False"):
        old = ExpressionTeacher("pca", n_components=2, n_top_genes=None).fit_transform(a, key_added=None)
    assert "X_teacher" not in a.obsm
    new = ExpressionTeacher("pca", n_components=2, n_top_genes=None).fit_transform(a, inplace=False)
    np.testing.assert_array_equal(old, new)
    b = ExpressionTeacher("pca", n_components=2, n_top_genes=None).fit_transform(a, copy=True)
    np.testing.assert_array_equal(b.obsm["X_teacher"], new)
