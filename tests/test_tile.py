"""stdistill.pp.tile: H&E-only slides -> tissue tiles in the spot data layout."""

import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image

from stdistill import StdistillError, io
from stdistill.io._image import ArrayImage
from stdistill.pp import PatchDataset, patches, tile


def _slide(w=600, h=480, box=(150, 120, 450, 360), seed=0) -> np.ndarray:
    """Glass (near-white, noisy) with one stained rectangle of tissue [x0, y0, x1, y1) holding a white hole."""
    from skimage.color import hed2rgb

    rng = np.random.default_rng(seed)
    img = np.clip(250 + rng.normal(0, 2, (h, w, 3)), 0, 255)
    x0, y0, x1, y1 = box
    hed = np.zeros((y1 - y0, x1 - x0, 3))
    hed[..., 0] = 0.02 + 0.1 * (rng.random((y1 - y0, x1 - x0)) < 0.1)  # scattered nuclei
    hed[..., 1] = 0.03 + 0.01 * rng.random((y1 - y0, x1 - x0))
    img[y0:y1, x0:x1] = hed2rgb(hed) * 255
    img[y0 + 90 : y0 + 130, x0 + 130 : x0 + 170] = 245  # a fat-cell-like hole inside the tissue
    return img.astype(np.uint8)


def test_keeps_tissue_drops_glass():
    img = _slide()
    t = tile(img, size_um=30, px=32, microns_per_pixel=1.0)
    # grid of 20 x 16 tiles of 30 px; the tissue box covers columns 5..14, rows 4..11
    rows, cols = t.obs["tile_row"].to_numpy(), t.obs["tile_col"].to_numpy()
    inside = {(r, c) for r in range(4, 12) for c in range(5, 15)}
    assert set(zip(rows, cols)) == inside
    assert (t.obs["tissue_fraction"] >= 0.5).all()
    # centres are tile centres in full-resolution pixels
    assert np.allclose(t.obsm["spatial"], np.c_[(cols + 0.5) * 30, (rows + 0.5) * 30])
    # a lower threshold admits nothing from the plain glass
    loose = tile(img, size_um=30, px=32, microns_per_pixel=1.0, min_tissue=0.05)
    assert loose.n_obs == len(inside)


def test_same_layout_as_spot_data(tmp_path):
    img = _slide()
    path = tmp_path / "slide.png"
    Image.fromarray(img).save(path)
    t = tile(path, size_um=60, px=64, microns_per_pixel=0.5, section="s1", patient="p7")
    assert sp.issparse(t.X) and t.X.shape == (t.n_obs, 0)
    assert list(t.obs["section"].cat.categories) == ["s1"] and list(t.obs["patient"].cat.categories) == ["p7"]
    assert t.obsm["spatial"].shape == (t.n_obs, 2) and t.obsm["spatial"].dtype == np.float64
    lib = t.uns["spatial"]["s1"]
    assert lib["scalefactors"]["microns_per_pixel"] == 0.5
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(120.0)  # a tile's side in px
    assert lib["metadata"]["source_image_path"] == str(path.resolve())
    assert lib["metadata"]["tile_size_um"] == 60 and lib["metadata"]["tile_px"] == 64
    assert io.microns_per_pixel(t) == 0.5 and io.has_image(t)
    assert t.obs_names.is_unique
    # patient defaults to the section; a reader is accepted as well as a path or an array
    t2 = tile(ArrayImage(img), size_um=60, microns_per_pixel=0.5, section="s2")
    assert list(t2.obs["patient"].cat.categories) == ["s2"]
    both = io.concat([t, t2])
    assert both.shape == (t.n_obs + t2.n_obs, 0) and set(io.sections(both)) == {"s1", "s2"}


def test_patches_work_on_tiles():
    img = _slide()
    t = tile(img, size_um=30, px=30, microns_per_pixel=1.0)
    ds = patches(t, size_um=30, px=30)
    assert not ds.padded.any() and not t.obs["patch_padded"].any()
    batch, idx = next(iter(ds.loader(batch_size=8)))
    assert batch.shape == (8, 3, 30, 30) and batch.dtype.__str__() == "torch.uint8"
    # at px == tile side in pixels the patch is exactly the tile
    r, c = int(t.obs["tile_row"].iloc[0]), int(t.obs["tile_col"].iloc[0])
    assert np.array_equal(ds.read(0), img[r * 30 : (r + 1) * 30, c * 30 : (c + 1) * 30])
    # every tile patch is tissue, not glass
    sats = [np.ptp(ds.read(i).astype(int), axis=-1).mean() for i in range(len(ds))]
    assert min(sats) > 20
    assert PatchDataset(t, size_um=30, px=16)[3][0].shape == (3, 16, 16)


def test_tiles_on_simulated_section():
    from scipy.spatial import cKDTree

    from stdistill.datasets import simulated

    a = simulated(n_sections=1, spots_per_section=60, n_genes=500)
    img = io.image(a)
    mpp = io.microns_per_pixel(a)
    t = tile(img, size_um=112, microns_per_pixel=mpp)
    side = 112.0 / mpp
    w, h = img.size
    nx, ny = int(w // side), int(h // side)
    x0, y0 = (w - nx * side) / 2, (h - ny * side) / 2
    kept = set(zip(t.obs["tile_row"], t.obs["tile_col"]))
    # ground truth from the spots (100 um apart, all on tissue): distance of each tile corner to the nearest spot
    tree = cKDTree(a.obsm["spatial"] * mpp)
    interior, glass = set(), set()
    for r in range(ny):
        for c in range(nx):
            corners = [(x0 + (c + i) * side, y0 + (r + j) * side) for i in (0, 1) for j in (0, 1)]
            d = tree.query(np.array(corners) * mpp)[0]
            if (d < 55).all():
                interior.add((r, c))
            if (d > 170).all():
                glass.add((r, c))
    assert len(interior) > 5 and len(glass) >= 2
    assert interior <= kept
    assert not (glass & kept)


def test_bad_input(tmp_path):
    img = _slide()
    with pytest.raises(StdistillError, match="microns_per_pixel="):
        tile(img)
    with pytest.raises(StdistillError, match="min_tissue"):
        tile(img, microns_per_pixel=1.0, min_tissue=1.5)
    with pytest.raises(StdistillError, match="smaller than one"):
        tile(img, microns_per_pixel=1.0, size_um=1000)
    with pytest.raises(StdistillError, match="no tissue found"):
        tile(np.full((300, 300, 3), 250, np.uint8), size_um=30, microns_per_pixel=1.0)
    with pytest.raises(StdistillError, match="does not exist"):
        tile(tmp_path / "missing.png", microns_per_pixel=1.0)
    with pytest.raises(StdistillError, match="must be a path"):
        tile(123, microns_per_pixel=1.0)


def test_new_section_without_transcriptome_is_explicit():
    xy = np.array([[5.0, 5.0], [15.0, 5.0]])
    a = io.new_section(None, genes=[], spots=["a", "b"], xy_px=xy, section="s", patient="p",
                       microns_per_pixel=1.0, spot_diameter_um=10)
    assert a.X.shape == (2, 0)
    with pytest.raises(StdistillError, match="no counts"):
        io.new_section(None, genes=["G1"], spots=["a", "b"], xy_px=xy, section="s", patient="p",
                       microns_per_pixel=1.0, spot_diameter_um=10)
    # real counts still need genes
    with pytest.raises(StdistillError, match="no genes"):
        io.new_section(np.zeros((2, 0)), genes=[], spots=["a", "b"], xy_px=xy, section="s", patient="p",
                       microns_per_pixel=1.0, spot_diameter_um=10)


def test_pale_fat_inside_tissue_is_kept_and_glass_left_out():
    from _slide_helpers import fat_slide

    img = fat_slide()
    hole = {(r, c) for r in range(10, 14) for c in range(12, 16)}  # 50 um tiles wholly inside the fat patch

    def tiles(**kw):
        t = tile(img, size_um=50, px=32, microns_per_pixel=1.0, **kw)
        xy = t.obsm["spatial"]
        on_glass = (xy[:, 0] < 400) | (xy[:, 0] > 1000) | (xy[:, 1] < 400) | (xy[:, 1] > 800)
        return set(zip(t.obs["tile_row"].tolist(), t.obs["tile_col"].tolist())), int(on_glass.sum())

    kept, glass = tiles()
    assert hole <= kept and glass == 0  # the fat is tissue, the glass around is not
    before, glass = tiles(pale=False)  # the detector without pale-fat growth drops the fat
    assert not (hole & before) and glass == 0 and before < kept
