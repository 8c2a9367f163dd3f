"""What ``stdistill.slide.predict_slide`` accepts besides a path (an open reader, a TiffSlide, an
array, a LazySlide WSIData) and how it reads tiles (worker processes, folded batch norms): the
predictions are the same every way."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from _slide_helpers import PX, SIZE_UM, he_image, write_pyramid
from conftest import TINY_EFF

import stdistill as sd

tiffslide = pytest.importorskip("tiffslide")
pytestmark = pytest.mark.usefixtures("tiny_encoders")


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("slide") / "slide.tif", he_image(), mpp=1.0)


@pytest.fixture(scope="module")
def ref_dir(slide, slide_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    sd.slide.predict_slide(slide, slide_bundle, out, chunk_tiles=64, quiet=True)
    return out


@pytest.fixture(scope="module")
def reference(ref_dir) -> ad.AnnData:
    return ad.read_h5ad(ref_dir / "slide.h5ad")


def _same(a: ad.AnnData, ref: ad.AnnData) -> None:
    assert list(a.obs_names.str.split("_t").str[1]) == list(ref.obs_names.str.split("_t").str[1])
    np.testing.assert_array_equal(a.obsm["niche_pred_probs"], ref.obsm["niche_pred_probs"])


def test_worker_processes_give_the_same_outputs(slide, slide_bundle, reference, ref_dir, tmp_path):
    r = sd.slide.predict_slide(slide, slide_bundle, tmp_path / "w2", chunk_tiles=64, num_workers=2, quiet=True)
    _same(ad.read_h5ad(r.h5ad), reference)
    assert r.geojson.read_bytes() == (ref_dir / "slide.geojson").read_bytes()


def test_open_readers_and_arrays_are_accepted(slide, slide_bundle, reference, tmp_path):
    runs = {
        "reader": sd.io.open_image(slide),
        "tiffslide": tiffslide.TiffSlide(str(slide)),
        "array": he_image(),
    }
    for kind, obj in runs.items():
        kw = {"mpp": 1.0} if kind == "array" else {}
        r = sd.slide.predict_slide(obj, slide_bundle, tmp_path / kind, chunk_tiles=64, num_workers=1, quiet=True, **kw)
        _same(ad.read_h5ad(r.h5ad), reference)
        assert r.h5ad.name == "slide.h5ad"  # the file's stem, or "slide" for an array


def test_stream_features_match_feature_extraction(slide, tmp_path):
    """The tiles' features as the slide run makes them (reading in workers, batch norms folded)
    equal ``features.extract`` on the same tiles, within float rounding."""
    from stdistill.encoders import load
    from stdistill.slide._tiles import TilePatches, View, encode_chunks, inference_encoder

    tiles = sd.pp.tile(slide, size_um=SIZE_UM, px=PX, section="slide")
    want = sd.features.extract(tiles, TINY_EFF, size_um=SIZE_UM, px=PX, device="cpu", precision="fp32",
                               cache_dir=False, copy=True).obsm[f"X_{TINY_EFF}"]
    enc = load(TINY_EFF)
    fast = inference_encoder(enc)
    assert fast is not enc  # the tiny EfficientNet has batch norms to fold
    chunks = [(0, 50), (50, 100), (100, tiles.n_obs)]
    got = {}
    ds = TilePatches(tiles, sd.io.open_image(slide), [(SIZE_UM, PX, None)])
    encode_chunks(ds, [View("f", SIZE_UM, PX, None, fast)], chunks, [0, 1, 2], lambda i, b: got.update({i: b}),
                  batch_size=16, num_workers=2, device="cpu")
    feats = np.concatenate([got[i]["f"] for i in range(3)])
    assert all(got[i]["ok"].all() for i in range(3))
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_wsidata_gets_the_predictions(slide, slide_bundle, reference, tmp_path):
    wsidata = pytest.importorskip("wsidata")
    wsi = wsidata.open_wsi(slide, reader="tiffslide", store=str(tmp_path / "slide.zarr"))
    r = sd.slide.predict_slide(wsi, slide_bundle, tmp_path / "out", chunk_tiles=64, num_workers=1, quiet=True)
    assert r.wsi_tables == ["niches_stdistill_tiles"]
    shapes = wsi.shapes["stdistill_tiles"]
    table = wsi.tables["niches_stdistill_tiles"]
    assert len(shapes) == table.n_obs == reference.n_obs
    np.testing.assert_array_equal(table.X, reference.obsm["niche_pred_probs"])
    assert list(table.var_names) == list(reference.obs["niche_pred_name"].cat.categories)
    side = SIZE_UM / 1.0
    np.testing.assert_allclose(shapes.geometry.centroid.x, reference.obsm["spatial"][:, 0], atol=1)
    np.testing.assert_allclose(shapes.geometry.area, side**2, rtol=0.05)
    assert table.uns["spatialdata_attrs"]["region"] == "stdistill_tiles"
    wsi.write()
    again = wsidata.open_wsi(slide, store=str(tmp_path / "slide.zarr"))
    np.testing.assert_array_equal(again.tables["niches_stdistill_tiles"].X, table.X)
