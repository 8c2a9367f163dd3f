import builtins

import numpy as np
import pandas as pd
import pytest
from _io_helpers import legacy_st

from stdistill import StdistillError
from stdistill.io import concat, image, read_h5ad, read_legacy_st, to_spatialdata, validate, write_h5ad


def _two_sections(tmp_path):
    parts = []
    for i, s in enumerate(["S1", "S2"]):
        d = tmp_path / s
        d.mkdir()
        a = read_legacy_st(**legacy_st(d), microns_per_pixel=2.0, section=s, patient=f"P{i}", affine=np.eye(2, 3))
        a.obs["pathology"] = pd.Categorical(["tumour", None, "stroma", "tumour"])
        a.obsm["celltype_props"] = pd.DataFrame(np.full((4, 2), 0.5), index=a.obs_names, columns=["T-cells", "CAFs"])
        parts.append(a)
    return concat(parts)


def test_round_trip_keeps_the_layout(tmp_path):
    a = _two_sections(tmp_path)
    a.uns["misc"] = {1: (1, 2), "none": None}
    path = write_h5ad(a, tmp_path / "out" / "two.h5ad")
    assert a.uns["misc"] == {1: (1, 2), "none": None}  # the caller's object is untouched
    b = read_h5ad(path)
    assert b.shape == a.shape and (a.X != b.X).nnz == 0
    assert list(b.obs_names) == list(a.obs_names)
    np.testing.assert_array_equal(b.obsm["spatial"], a.obsm["spatial"])
    pd.testing.assert_frame_equal(b.obsm["celltype_props"], a.obsm["celltype_props"])
    assert list(b.obs["section"].cat.categories) == ["S1", "S2"]
    assert b.obs["pathology"].isna().sum() == 2
    lib = b.uns["spatial"]["S2"]
    assert lib["scalefactors"]["microns_per_pixel"] == 2.0
    assert lib["metadata"]["image_size"] == [64, 48]
    assert image(b, "S2").size == (64, 48)
    np.testing.assert_array_equal(lib["metadata"]["coordinate_affine"], np.eye(2, 3))
    assert np.asarray(b.uns["misc"]["1"]).tolist() == [1, 2]


def test_validate_accepts_a_fresh_section(tmp_path):
    a = _two_sections(tmp_path)
    assert validate(a) is a


def test_write_refuses_invalid_data_and_writes_nothing(tmp_path):
    a = _two_sections(tmp_path)
    del a.obs["patient"]
    target = tmp_path / "bad.h5ad"
    with pytest.raises(StdistillError, match='obs\\["patient"\\]'):
        write_h5ad(a, target)
    assert list(tmp_path.glob("*.h5ad")) == [] and list(tmp_path.glob(".bad.h5ad*")) == []


def test_to_spatialdata_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    a = _two_sections(tmp_path)
    real = builtins.__import__

    def no_spatialdata(name, *args, **kwargs):
        if name == "spatialdata" or name.startswith("spatialdata."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spatialdata)
    with pytest.raises(StdistillError, match=r"pip install 'stdistill\[spatialdata\]'"):
        to_spatialdata(a)


def test_to_spatialdata(tmp_path):
    pytest.importorskip("spatialdata")
    a = _two_sections(tmp_path)
    sdata = to_spatialdata(a)
    assert set(sdata.shapes) == {"S1_spots", "S2_spots"}
    assert set(sdata.images) == {"S1_hires", "S2_hires"}
    assert sdata.tables["table"].n_obs == 8
    np.testing.assert_allclose(sdata.shapes["S1_spots"]["radius"], 25.0)
