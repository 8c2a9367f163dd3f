"""stdistill.pp.patches / PatchDataset: physical size whatever the resolution, padding, streaming."""

import numpy as np
import pytest
import torch
from PIL import Image

from stdistill import StdistillError, io
from stdistill.io._image import ArrayImage
from stdistill.pp import PatchDataset, patches


def _section(img, xy_px, mpp, name="s", counts=None):
    n = len(xy_px)
    return io.new_section(
        counts, genes=[] if counts is None else [f"G{i}" for i in range(counts.shape[1])],
        spots=[f"{name}_{i}" for i in range(n)], xy_px=np.asarray(xy_px, float), section=name, patient="p",
        microns_per_pixel=mpp, spot_diameter_um=55, image=img,
    )


@pytest.fixture(scope="module")
def tissue():
    """A simulated H&E image at 1 um/px and spot centres (um) well inside it."""
    from stdistill.datasets import simulated

    a = simulated(n_sections=1, spots_per_section=40, n_genes=500)
    img = io.image(a).array
    return img, a.obsm["spatial"] * io.microns_per_pixel(a)


def test_physical_size_whatever_the_resolution(tissue):
    img1, xy_um = tissue
    h, w = img1.shape[:2]
    img2 = np.asarray(Image.fromarray(img1).resize((w // 2, h // 2), Image.BOX))  # same tissue at 2 um/px
    hi = _section(img1, xy_um / 1.0, 1.0, "hi")
    lo = _section(img2, xy_um / 2.0, 2.0, "lo")
    both = io.concat([hi, lo])  # one dataset over sections of different resolutions
    ds = PatchDataset(both, size_um=64, px=16)
    n = len(xy_um)
    a = np.stack([ds.read(i) for i in range(n)]).astype(float)
    b = np.stack([ds.read(n + i) for i in range(n)]).astype(float)
    diff = np.abs(a - b).mean()
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert diff < 5 and corr > 0.97, (diff, corr)
    # control: the 2 um/px image mislabelled as 1 um/px covers twice the tissue -> clearly different
    wrong = PatchDataset(_section(img2, xy_um / 2.0, 1.0, "wrong"), size_um=64, px=16)
    c = np.stack([wrong.read(i) for i in range(n)]).astype(float)
    assert np.abs(a - c).mean() > 3 * diff


def test_exact_crop_and_centring():
    img = np.full((400, 300, 3), 255, np.uint8)
    img[200, 150] = 0  # one dark pixel at the spot centre
    for mpp in (0.5, 0.69, 1.0, 3.2):
        ds = PatchDataset(_section(img, [[150.0, 200.0]], mpp), size_um=40, px=41)
        patch = ds.read(0).astype(float).mean(-1)
        yy, xx = np.nonzero(patch < patch.max())
        wts = (patch.max() - patch[yy, xx])
        cy, cx = (yy * wts).sum() / wts.sum(), (xx * wts).sum() / wts.sum()
        # centred to within half a source pixel (crop origins are whole pixels) plus output rounding
        tol = 0.5 * 41 / (40 / mpp) + 0.6
        assert abs(cy - 20) <= tol and abs(cx - 20) <= tol, (mpp, cy, cx)
    # at px == side in pixels a patch is exactly the image crop (HEST: 112 um = 224 px at 0.5 um/px)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (500, 500, 3), dtype=np.uint8)
    ds = PatchDataset(_section(noise, [[250.0, 250.0]], 0.5), size_um=112, px=224)
    assert np.array_equal(ds.read(0), noise[138:362, 138:362])


def test_edges_are_padded_white_and_flagged():
    img = np.zeros((100, 100, 3), np.uint8)
    a = _section(img, [[2.0, 2.0], [50.0, 50.0], [97.0, 60.0]], 1.0)
    ds = patches(a, size_um=40, px=40)
    assert ds.padded.tolist() == [True, False, True]
    assert a.obs["patch_padded"].tolist() == [True, False, True]
    corner = ds.read(0)
    assert (corner[:18, :18] == 255).all() and (corner[25:, 25:] == 0).all()
    assert (ds.read(1) == 0).all()
    b = _section(img, [[50.0, 50.0]], 1.0, "b")
    patches(b, key_added=None)
    assert "patch_padded" not in b.obs


def test_batches_stream(monkeypatch):
    calls = []
    orig = ArrayImage.read_region

    def counting(self, *args):
        calls.append(args)
        return orig(self, *args)

    monkeypatch.setattr(ArrayImage, "read_region", counting)
    img = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    xy = np.c_[np.linspace(20, 180, 10), np.full(10, 100.0)]
    ds = PatchDataset(_section(img, xy, 0.5), size_um=16, px=24)
    assert calls == []  # nothing read up front
    it = iter(ds.loader(batch_size=4))
    batch, idx = next(it)
    assert len(calls) == 4  # only the first batch was read
    assert batch.shape == (4, 3, 24, 24) and batch.dtype == torch.uint8 and idx.tolist() == [0, 1, 2, 3]
    rest = list(it)
    assert [len(i) for _, i in rest] == [4, 2]
    assert torch.cat([i for _, i in rest]).tolist() == list(range(4, 10))
    sub = list(ds.loader(batch_size=8, indices=[7, 2]))
    assert sub[0][1].tolist() == [7, 2]
    assert torch.equal(sub[0][0][0], torch.from_numpy(ds.read(7).transpose(2, 0, 1).copy()))


def test_bad_input():
    img = np.zeros((50, 50, 3), np.uint8)
    a = _section(img, [[25.0, 25.0]], 1.0)
    with pytest.raises(StdistillError, match="positive"):
        PatchDataset(a, size_um=0)
    no_image = io.new_section(np.ones((1, 2)), genes=["A", "B"], spots=["x"], xy_px=[[1.0, 1.0]], section="n",
                              patient="p", microns_per_pixel=1.0, spot_diameter_um=55)
    with pytest.raises(StdistillError, match="without an H&E image"):
        patches(no_image)
