import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stdistill import StdistillError
from stdistill.io import has_image, image, microns_per_pixel, read_visium


def test_reads_scanpy_subset_with_its_image(visium_dir):
    a = read_visium(visium_dir, library_id="heart", patient="p1")
    assert a.shape == (100, 100)
    assert list(a.obs["section"].unique()) == ["heart"] and list(a.obs["patient"].unique()) == ["p1"]
    assert a.var_names.is_unique and "gene_ids" in a.var
    assert (a.obs["in_tissue"] == 1).all()
    assert has_image(a)
    # the hires PNG of this fixture is a blank placeholder: the lowres one (600 px) is attached
    meta = a.uns["spatial"]["heart"]["metadata"]
    assert meta["image_frame"] == "lowres" and image(a).size == (600, 600)
    sf = json.loads((visium_dir / "spatial" / "scalefactors_json.json").read_text())
    lowres = sf["tissue_lowres_scalef"]
    # obsm["spatial"] is in the attached image's pixels; full-res coordinates are kept
    np.testing.assert_allclose(a.obsm["spatial"], a.obsm["spatial_fullres"] * lowres)
    # 55 um spots span spot_diameter_fullres full-res pixels
    assert microns_per_pixel(a) == pytest.approx(55.0 / sf["spot_diameter_fullres"] / lowres)
    xy = a.obsm["spatial"]
    assert (xy >= 0).all() and (xy < 600).all()
    # spot centres match the positions file
    pos = pd.read_csv(visium_dir / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    np.testing.assert_allclose(a.obsm["spatial_fullres"][:, 0], pos.loc[a.obs_names, 5].to_numpy())


def _copy(visium_dir, tmp_path):
    dst = tmp_path / "outs"
    shutil.copytree(visium_dir, dst)
    return dst


def test_spaceranger2_positions_with_header_and_a_real_hires(visium_dir, tmp_path):
    outs = _copy(visium_dir, tmp_path)
    sp_dir = outs / "spatial"
    pos = pd.read_csv(sp_dir / "tissue_positions_list.csv", header=None)
    pos.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    (sp_dir / "tissue_positions_list.csv").unlink()
    pos.to_csv(sp_dir / "tissue_positions.csv", index=False)
    low = Image.open(sp_dir / "tissue_lowres_image.png").convert("RGB")
    low.resize((2000, 2000)).save(sp_dir / "tissue_hires_image.png")
    a = read_visium(outs)
    lib = a.uns["spatial"][a.obs["section"].iloc[0]]
    assert lib["metadata"]["image_frame"] == "hires" and image(a).size == (2000, 2000)
    hires = json.loads((sp_dir / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    np.testing.assert_allclose(a.obsm["spatial"], a.obsm["spatial_fullres"] * hires)
    # section id defaults to the folder above outs/
    assert a.obs["section"].iloc[0] == tmp_path.name


def test_only_in_tissue_spots_are_kept(visium_dir, tmp_path):
    outs = _copy(visium_dir, tmp_path)
    f = outs / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(f, header=None)
    first = read_visium(visium_dir).obs_names[:7]
    pos.loc[pos[0].isin(first), 1] = 0
    pos.to_csv(f, header=False, index=False)
    a = read_visium(outs)
    assert a.n_obs == 93 and not set(first) & set(a.obs_names)


def test_given_full_resolution_image_and_mpp(visium_dir, tmp_path):
    outs = _copy(visium_dir, tmp_path)
    f = outs / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(f, header=None)
    pos[[4, 5]] = pos[[4, 5]] // 100  # a small stand-in for a full-resolution scan
    pos.to_csv(f, header=False, index=False)
    small = tmp_path / "tiny.png"
    Image.new("RGB", (40, 40), "white").save(small)
    # an image too small for the spots is refused, naming the image
    with pytest.raises(StdistillError, match="tiny.png.*outside"):
        read_visium(outs, source_image_path=small, microns_per_pixel=30.0)
    full = tmp_path / "full.png"
    Image.new("RGB", (160, 160), "white").save(full)
    a = read_visium(outs, source_image_path=full, microns_per_pixel=30.0)
    assert microns_per_pixel(a) == 30.0 and image(a).size == (160, 160)
    assert a.uns["spatial"][a.obs["section"].iloc[0]]["metadata"]["image_frame"] == "fullres"
    np.testing.assert_allclose(a.obsm["spatial"], a.obsm["spatial_fullres"])


def test_missing_count_matrix_is_refused(tmp_path):
    (tmp_path / "spatial").mkdir()
    with pytest.raises(StdistillError, match="filtered_feature_bc_matrix.h5"):
        read_visium(tmp_path)
