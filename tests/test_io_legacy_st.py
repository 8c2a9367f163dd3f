import numpy as np
import pytest
import scipy.sparse as sp
from _io_helpers import legacy_st

from stdistill import StdistillError
from stdistill.io import has_image, image, microns_per_pixel, read_legacy_st
from stdistill.io.legacy_st import apply_affine, fit_affine


def test_reads_counts_positions_and_image(tmp_path):
    f = legacy_st(tmp_path)
    a = read_legacy_st(**f, microns_per_pixel=2.0, section="S1", patient="P1")
    assert a.shape == (4, 3)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype.kind == "i"
    assert list(a.obs_names) == ["1x1", "2x1", "1x2", "2x2"]
    assert a.X[2, 0] == 5 and a.X[3, 2] == 7
    np.testing.assert_allclose(a.obsm["spatial"][1], [25.0, 13.0])
    assert list(a.obs["section"].unique()) == ["S1"] and list(a.obs["patient"].unique()) == ["P1"]
    assert list(a.obs["array_x"]) == [1, 2, 1, 2]
    assert microns_per_pixel(a) == 2.0
    # 100 um spots at 2 um/px
    assert a.uns["spatial"]["S1"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(50.0)
    assert has_image(a) and image(a).size == (64, 48)


def test_rows_are_joined_by_id_not_by_order(tmp_path):
    counts = np.array([[0, 0, 7], [5, 1, 0], [0, 2, 0], [1, 0, 3]])
    f = legacy_st(tmp_path, counts=counts, ids=["2x2", "1x2", "2x1", "1x1"])
    a = read_legacy_st(**f, microns_per_pixel=1.0, section="S", patient="P")
    xy = dict(zip(a.obs_names, map(tuple, a.obsm["spatial"])))
    assert xy["2x2"] == (25.0, 23.0) and xy["1x1"] == (15.0, 13.0)
    assert a["2x2"].X[0, 2] == 7


def test_pitch_gives_microns_per_pixel(tmp_path):
    # 10 px per array step and 200 um per step -> 20 um/px
    f = legacy_st(tmp_path, image=False)
    a = read_legacy_st(**f, microns_per_pixel="pitch", section="S", patient="P")
    assert microns_per_pixel(a) == pytest.approx(20.0, rel=0.01)
    assert not has_image(a)


def test_scale_and_affine(tmp_path):
    f = legacy_st(tmp_path, image=False)
    theta = np.deg2rad(5.0)
    A = np.array([[np.cos(theta), -np.sin(theta), 3.0], [np.sin(theta), np.cos(theta), -2.0]])
    plain = read_legacy_st(**f, microns_per_pixel="pitch", section="S", patient="P")
    moved = read_legacy_st(**f, microns_per_pixel="pitch", section="S", patient="P", scale=0.5, affine=A)
    np.testing.assert_allclose(moved.obsm["spatial"], 0.5 * apply_affine(plain.obsm["spatial"], A))
    # a rigid map keeps distances: the pitch-derived um/px doubles when pixels are halved
    assert microns_per_pixel(moved) == pytest.approx(2 * microns_per_pixel(plain), rel=1e-3)


def test_fit_affine_recovers_a_rigid_map():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 1000, (20, 2))
    A = np.array([[0.99, -0.1, 12.0], [0.1, 0.99, -30.0]])
    got, resid = fit_affine(src, apply_affine(src, A))
    np.testing.assert_allclose(got, A, atol=1e-9)
    assert resid < 1e-6


def test_positions_without_counts_can_be_dropped(tmp_path):
    f = legacy_st(tmp_path, counts=np.array([[1, 0, 3], [0, 2, 0], [5, 1, 0]]), ids=["1x1", "2x1", "1x2"])
    with pytest.raises(StdistillError, match="position but no counts"):
        read_legacy_st(**f, microns_per_pixel=1.0, section="S", patient="P")
    a = read_legacy_st(**f, microns_per_pixel=1.0, section="S", patient="P", positions_without_counts="drop")
    assert a.n_obs == 3
    assert a.uns["spatial"]["S"]["metadata"]["positions_without_counts_dropped"] == 1


def test_unselected_spots_are_ignored(tmp_path):
    pos = {
        "x": [1, 2, 1, 2, 3],
        "y": [1, 1, 2, 2, 3],
        "pixel_x": [15.0, 25, 15, 25, 35],
        "pixel_y": [13.0, 13, 23, 23, 33],
        "selected": [1, 1, 1, 1, 0],
    }
    f = legacy_st(tmp_path, positions=pos)
    a = read_legacy_st(**f, microns_per_pixel=1.0, section="S", patient="P")
    assert a.n_obs == 4


def test_parsed_counts_cache_gives_the_same_section(tmp_path):
    f = legacy_st(tmp_path, image=False)
    cache = tmp_path / "cache"
    a = read_legacy_st(**f, microns_per_pixel=1.0, section="S", patient="P", cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    b = read_legacy_st(**f, microns_per_pixel=1.0, section="S", patient="P", cache_dir=cache)
    assert (a.X != b.X).nnz == 0 and list(a.var_names) == list(b.var_names)
