import numpy as np
import pytest
from _io_helpers import hest_folder

from stdistill import StdistillError
from stdistill.io import image, microns_per_pixel, read_hest


def test_reads_a_hest_sample(tmp_path):
    root = hest_folder(tmp_path)
    a = read_hest("TENX1", root)
    assert a.shape == (4, 4)  # the spot outside tissue is dropped
    assert a.X.dtype.kind == "i" and a.X.sum() == 1 + 2 + 3 + 1 + 4 + 5 + 6
    assert list(a.obs["section"].unique()) == ["TENX1"]
    assert list(a.obs["patient"].unique()) == ["P7"]
    assert microns_per_pixel(a) == 0.5  # the estimated pixel size wins over the embedded one
    assert image(a).size == (80, 60)
    np.testing.assert_allclose(a.obsm["spatial"][1], [30.0, 12.0])
    # Visium spots: 55 um at 0.5 um/px
    assert a.uns["spatial"]["TENX1"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)


def test_embedded_pixel_size_and_sample_id_as_patient(tmp_path):
    root = hest_folder(tmp_path, meta={"pixel_size_um_embedded": 0.25})
    a = read_hest("TENX1", root)
    assert microns_per_pixel(a) == 0.25
    assert list(a.obs["patient"].unique()) == ["TENX1"]


def test_missing_counts_file(tmp_path):
    root = hest_folder(tmp_path)
    with pytest.raises(StdistillError, match="NCBI9.h5ad"):
        read_hest("NCBI9", root)
