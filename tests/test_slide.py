"""Bundles, whole-slide prediction (tissue, streaming chunks, resume, outputs) and CLI usage errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import _cli
from _slide_helpers import PX, SIZE_UM, he_image, niche_bundle, write_pyramid
from conftest import TINY_EFF, TINY_VIT

import stdistill as sd
from stdistill import StdistillError

pytest.importorskip("tiffslide")
pytestmark = pytest.mark.usefixtures("tiny_encoders")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_encoders) -> Path:
    return niche_bundle(tmp_path_factory.mktemp("bundle") / "niches", TINY_EFF)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    img = he_image()
    return write_pyramid(tmp_path_factory.mktemp("slide") / "slide.tif", img, mpp=1.0), img


def _tiles_data(encoder=TINY_EFF):
    from _io_helpers import colour_sections

    a = colour_sections(2, 5, seed=3)
    sd.features.extract(a, encoder, size_um=SIZE_UM, px=PX, device="cpu", precision="fp32", cache_dir=False)
    return a


# ------------------------------------------------------------------ bundles
def test_bundle_round_trip(bundle):
    b = sd.bundle.load_bundle(bundle)
    cfg = json.loads((bundle / "config.json").read_text())
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors"]
    rec = cfg["bundle"]
    assert rec["schema"] == sd.bundle.SCHEMA and rec["recipe"] == "niches" and rec["stdistill_version"] == sd.__version__
    assert rec["encoder"]["name"] == TINY_EFF and len(rec["encoder"]["weights_digest"]) >= 16
    assert rec["patch"] == {"size_um": SIZE_UM, "px": PX} and rec["precision"] == "fp32"
    assert rec["feature_norm"] == "section" and rec["training"]["n_train_spots"] == 50
    names = rec["outputs"]["niches"]
    assert len(names) == 2 and all(n.split(":")[0] in "01" and "/" in n for n in names)  # numbers kept, marker genes
    assert b.size_um == SIZE_UM and b.px == PX and b.encoder == TINY_EFF
    a = _tiles_data()
    p1 = b.model.predict_proba(a, extract=False)
    p2 = sd.students.NicheStudent.load(bundle).predict_proba(a, extract=False)
    np.testing.assert_array_equal(p1, p2)
    b.model.predict(a)  # predictions go beside, never over, the teacher's labels
    assert "niche_pred" in a.obs and "niche" not in a.obs


@pytest.mark.parametrize("change", [{"encoder": TINY_VIT}, {"size_um": 64.0}, {"px": 64}, {"weights_digest": "0" * 32}])
def test_bundle_refuses_other_features_in_one_line(bundle, change):
    b = sd.bundle.load_bundle(bundle)
    a = _tiles_data()
    key = f"X_{TINY_EFF}"
    a.uns["features"][key] = {**a.uns["features"][key], **change}
    for call in (lambda: b.check_features(a, key), lambda: b.model.predict_proba(a, extract=False)):
        with pytest.raises(StdistillError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "trained on encoder 'test-tiny-effnet' at 32 um / 32 px" in msg


def test_peka_bundle_with_extra_genes(tmp_path):
    from _io_helpers import colour_sections

    a = colour_sections(2, 4, seed=1)
    T = np.random.default_rng(0).normal(size=(a.n_obs, 4)).astype(np.float32)
    m = sd.recipes.PEKA(TINY_VIT, adapter="lora", rank=2, max_epochs=1, batch_size=16, n_clusters=2, size_um=SIZE_UM,
                        px=PX, cache_dir=False).fit(a, T, ["G0", "G1"], extra_genes=["G9", "G1"])
    assert m.genes_ == ["G0", "G1", "G9"]
    with pytest.raises(StdistillError, match="not among the measured"):
        sd.recipes.PEKA(TINY_VIT, max_epochs=0, size_um=SIZE_UM, px=PX, cache_dir=False).fit(a, T, ["G0"], extra_genes=["ERBB2"])
    sd.bundle.save_bundle(m, tmp_path / "peka")
    b = sd.bundle.load_bundle(tmp_path / "peka")
    assert b.recipe == "peka" and b.outputs == {"genes": ["G0", "G1", "G9"]} and b.record["patch"]["size_um"] == SIZE_UM
    np.testing.assert_allclose(b.model.predict(a, inplace=False).to_numpy(), m.predict(a, inplace=False).to_numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(StdistillError, match="no such model bundle"):
        sd.bundle.load_bundle(tmp_path / "nothing")


# ------------------------------------------------------------------ tissue
def test_tissue_mask_drops_pen_and_smear():
    img = he_image()
    h, w = img.shape[:2]
    mask = sd.pp.tissue_mask(img, um_per_px=1.0, min_area_um2=2000)
    assert mask[h // 6 + 5: h * 2 // 3 - 5, w // 8 + 5: w * 7 // 8 - 5].mean() > 0.99  # both tissue textures
    assert not mask[20:32].any()  # green pen line
    assert not mask[h * 3 // 4: h - 10, 20: w // 3].any()  # pale pink smear on the glass
    assert sd.pp.tissue_mask(img, guard=False)[h * 3 // 4 + 5: h - 15, 25: w // 3 - 5].all()  # caught without the guard


# ------------------------------------------------------------------ predict
def _check_outputs(out: Path, img: np.ndarray) -> None:
    import anndata as ad

    h, w = img.shape[:2]
    a = ad.read_h5ad(out / "slide.h5ad")
    assert a.n_obs > 50 and a.obsm["niche_pred_probs"].shape == (a.n_obs, 2)
    np.testing.assert_allclose(a.obsm["niche_pred_probs"].sum(1), 1, rtol=1e-5)
    assert set(a.obs["niche_pred_name"].cat.categories) == {f"niche {n}" for n in
                                                               json.loads(a.uns["predict"]["bundle"])["outputs"]["niches"]}
    gj = json.loads((out / "slide.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == a.n_obs
    for f in gj["features"]:
        ring = np.array(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= w).all() and (ring[:, 1] >= 0).all() and (ring[:, 1] <= h).all()
        assert f["properties"]["classification"]["name"].startswith("niche ")
        assert len(f["properties"]["measurements"]) == 2
    xy = a.obsm["spatial"]
    assert not ((xy[:, 1] < 40) | (xy[:, 1] > h * 3 // 4)).any()  # no tile on the pen line or the smear
    assert (out / "maps" / "niches.png").stat().st_size > 1000


def test_predict_on_pyramidal_tiff(bundle, slide, tmp_path):
    path, img = slide
    r = sd.slide.predict_slide(path, bundle, tmp_path / "out", chunk_tiles=40, quiet=True)
    _check_outputs(tmp_path / "out", img)
    assert r.chunks_reused == 0 and r.maps == [tmp_path / "out" / "maps" / "niches.png"]
    again = sd.slide.predict_slide(path, bundle, tmp_path / "out", chunk_tiles=40, quiet=True)
    assert again.chunks_reused == 2 * len(range(0, r.n_tiles, 40))  # features + niches, all reused
    with pytest.raises(StdistillError, match="other inputs"):
        sd.slide.predict_slide(path, bundle, tmp_path / "out", chunk_tiles=30, quiet=True)


def test_predict_png_needs_mpp(bundle, tmp_path):
    from PIL import Image

    Image.fromarray(he_image()).save(tmp_path / "he.png")
    with pytest.raises(StdistillError, match="--mpp"):
        sd.slide.predict_slide(tmp_path / "he.png", bundle, tmp_path / "o", quiet=True)
    r = sd.slide.predict_slide(tmp_path / "he.png", bundle, tmp_path / "o", mpp=1.0, quiet=True)
    assert r.n_tiles > 50


# ------------------------------------------------------------------ the real entry point
def test_resume_after_kill_gives_identical_outputs(bundle, slide, tmp_path):
    path, img = slide
    args = [str(path), "--model", str(bundle), "--chunk-tiles", "16", "--quiet"]
    # uninterrupted, in the same kind of process (one thread: the same float reductions as the resumed run)
    full = _cli("predict", *args, "--out", str(tmp_path / "full"), tiny=True)
    assert full.returncode == 0, full.stderr
    proc = _cli("predict", *args, "--out", str(tmp_path / "killed"), env={"STDISTILL_CHUNK_PAUSE_S": "0.4"}, popen=True,
                tiny=True)
    chunks = tmp_path / "killed" / "chunks"
    t0 = time.time()
    while len(list(chunks.glob("*.npz"))) < 3 and time.time() - t0 < 90:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len(list(chunks.glob("*.npz")))
    assert proc.returncode != 0 and 3 <= done < 2 * 11 and not (tmp_path / "killed" / "slide.h5ad").exists()
    resumed = _cli("predict", *args, "--out", str(tmp_path / "killed"), tiny=True)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("slide.geojson", "maps/niches.png"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name
    import anndata as ad

    a, b = ad.read_h5ad(tmp_path / "full" / "slide.h5ad"), ad.read_h5ad(tmp_path / "killed" / "slide.h5ad")
    np.testing.assert_array_equal(a.obsm["niche_pred_probs"], b.obsm["niche_pred_probs"])
    assert a.obs.equals(b.obs)
    _check_outputs(tmp_path / "killed", img)


@pytest.mark.parametrize("args, expect", [
    (["nichs"], "No such command"),
    (["predict", "x.tif"], "Missing option '--model'"),
    (["predict", "x.tif", "-m", "m", "-o", "o", "--plt"], "No such option: --plt"),
    (["predict", "x.tif", "-m", "m", "-o", "o", "--min-tissue", "2"], "--min-tissue"),
    (["predict", "/no/such.tif", "-m", "/no/bundle", "-o", "o"], "no such model bundle"),
])
def test_usage_errors_print_one_line_and_exit_2(args, expect):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr


def test_version():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"stdistill {sd.__version__}"


def test_predict_writes_a_spatialdata_store(bundle, slide, tmp_path, monkeypatch):
    import importlib.util

    path, _ = slide
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "spatialdata" else real(n, *a))
    with pytest.raises(StdistillError, match=r"stdistill\[spatialdata\]"):  # refused before any work
        sd.slide.predict_slide(path, bundle, tmp_path / "no", zarr=True, quiet=True)
    assert not (tmp_path / "no").exists()
    monkeypatch.undo()
    spatialdata = pytest.importorskip("spatialdata")
    r = sd.slide.predict_slide(path, bundle, tmp_path / "out", chunk_tiles=80, zarr=True, quiet=True)
    assert r.zarr == tmp_path / "out" / f"{path.stem}.zarr" and not list((tmp_path / "out").glob(".*.tmp"))
    sdata = spatialdata.read_zarr(r.zarr)
    table = sdata.tables["table"]
    assert table.n_obs == r.n_tiles and "niche_pred" in table.obs and "niche_pred_probs" in table.obsm
    assert set(sdata.shapes) == {f"{path.stem}_spots"}
