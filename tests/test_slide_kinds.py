"""``stdistill predict`` for every bundle kind beyond niche students: the frozen probe, GenST
(uncertainty and windows to sequence next) and survival students (risk, group from the stored
cut, attention; Kaplan-Meier of a cohort's groups); bundles it must refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _cli_helpers import _cli
from _slide_helpers import PX, SIZE_UM, he_image, write_pyramid
from conftest import TINY_VIT

import stdistill as sd
from stdistill import StdistillError

pytest.importorskip("tiffslide")
pytestmark = pytest.mark.usefixtures("tiny_encoders")
KEY = f"X_{TINY_VIT}"


def _train_tiles(n_patients: int, side: int, seed: int = 0) -> ad.AnnData:
    from _io_helpers import colour_sections

    a = colour_sections(n_patients, side, seed=seed)
    sd.features.extract(a, TINY_VIT, size_um=SIZE_UM, px=PX, device="cpu", precision="fp32", cache_dir=False)
    return a


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("slide") / "slide.tif", he_image(), mpp=1.0)


@pytest.fixture(scope="module")
def probe_bundle(tmp_path_factory, tiny_encoders) -> Path:
    from stdistill.bench import HestRidge

    a = _train_tiles(2, 5)
    Y = np.log1p(np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, dtype=np.float64))
    m = HestRidge(latent_dim=8).fit(a.obsm[KEY], Y, list(a.var_names), features=a.uns["features"][KEY])
    return sd.bundle.save_bundle(m, tmp_path_factory.mktemp("probe") / "probe")


@pytest.fixture(scope="module")
def genst_bundle(tmp_path_factory, tiny_encoders) -> Path:
    pytest.importorskip("vector_quantize_pytorch")
    from stdistill.recipes import GenST, GenstConfig

    a = _train_tiles(3, 6)
    cfg = GenstConfig(codebook_size=8, hist_codebook_size=8, expr_epochs=5, max_epochs=2, batch_size=32)
    m = GenST(cfg, feature_key=KEY).fit(a, list(a.var_names))
    return sd.bundle.save_bundle(m, tmp_path_factory.mktemp("genst") / "genst")


@pytest.fixture(scope="module")
def survival_bundle(tmp_path_factory, tiny_encoders) -> Path:
    pytest.importorskip("torchsurv")
    from stdistill.recipes import SurvivalModel, cohort_from_tiles

    a = _train_tiles(8, 4, seed=1)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"time": rng.uniform(1, 10, 8), "event": [1, 0] * 4}, index=[f"P{i}" for i in range(8)])
    m = SurvivalModel(kind="abmil", max_epochs=2, dim=8, batch_size=4).fit(cohort_from_tiles(a, table, feature_key=KEY))
    return sd.bundle.save_bundle(m, tmp_path_factory.mktemp("survival") / "survival")


def _slide_features(slide: Path, model) -> tuple[ad.AnnData, np.ndarray]:
    """The slide's tiles and their features made with the ordinary feature extraction."""
    tiles = sd.pp.tile(slide, size_um=SIZE_UM, px=PX, section="slide")
    sd.features.extract(tiles, TINY_VIT, size_um=SIZE_UM, px=PX, device="cpu", precision="fp32", cache_dir=False)
    return tiles, tiles.obsm[KEY]


def _measurements(path: Path) -> dict:
    return json.loads(path.read_text())["features"][0]["properties"]["measurements"]


def test_probe_maps_equal_the_probe_on_extracted_features(probe_bundle, slide, tmp_path):
    r = sd.slide.predict_slide(slide, probe_bundle, tmp_path / "out", chunk_tiles=64, quiet=True)
    a = ad.read_h5ad(r.h5ad)
    probe = sd.bundle.load_bundle(probe_bundle).model
    tiles, X = _slide_features(slide, probe)
    assert list(a.obs_names) == list(tiles.obs_names)
    np.testing.assert_allclose(a.obsm["genes_pred"].to_numpy(), np.maximum(probe.predict(X), 0), atol=1e-4)
    assert [p.name for p in r.maps] == ["G0.png", "G1.png", "G2.png", "G3.png"]
    assert set(_measurements(r.geojson)) == {f"G{i}" for i in range(12)}
    assert set(r.summary) == {f"mean G{i}" for i in range(12)}
    again = sd.slide.predict_slide(slide, probe_bundle, tmp_path / "out", chunk_tiles=64, quiet=True)
    assert again.chunks_reused == 2 * len(range(0, r.n_tiles, 64))  # features + probe, all reused


def test_genst_uncertainty_and_windows_to_sequence(genst_bundle, slide, tmp_path):
    r = sd.slide.predict_slide(slide, genst_bundle, tmp_path / "out", chunk_tiles=64, window_mm=0.1, quiet=True)
    a = ad.read_h5ad(r.h5ad)
    u = a.obsm["uncertainty_pred"]["uncertainty"].to_numpy()
    m = sd.bundle.load_bundle(genst_bundle).model
    tiles, X = _slide_features(slide, m)
    tiles.uns["features"] = {KEY: m.features_record_}
    m.predict(tiles)
    np.testing.assert_allclose(u, tiles.obsm["genst_sd"].to_numpy().mean(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.obsm["genes_pred"].to_numpy(), tiles.obsm["genst_pred"].to_numpy(), rtol=1e-4, atol=1e-5)
    win = pd.read_csv(tmp_path / "out" / "slide_windows.csv")
    assert len(win) > 1 and win["rank"].tolist() == list(range(1, len(win) + 1))
    assert (np.diff(win["mean_uncertainty"]) <= 1e-9).all()  # best first
    xy = a.obsm["spatial"]
    for w in win.itertuples():  # each window's score is the mean uncertainty of the tiles inside it
        inside = (xy[:, 0] > w.x0_px) & (xy[:, 0] < w.x1_px) & (xy[:, 1] > w.y0_px) & (xy[:, 1] < w.y1_px)
        assert inside.sum() == w.n_tiles
        assert u[inside].mean() == pytest.approx(w.mean_uncertainty, abs=1e-5)
        assert w.width_mm == pytest.approx(3 * SIZE_UM / 1000)  # 0.1 mm -> 3 tiles of 32 um
    boxes = win[["x0_px", "y0_px", "x1_px", "y1_px"]].to_numpy()
    for i in range(len(boxes)):  # no two windows overlap
        for j in range(i + 1, len(boxes)):
            ov = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]), min(boxes[i, 3], boxes[j, 3]) - max(
                boxes[i, 1], boxes[j, 1])
            assert min(ov) <= 1e-6
    gj = json.loads((tmp_path / "out" / "slide_windows.geojson").read_text())
    assert len(gj["features"]) == len(win)
    assert {"uncertainty.png", "windows.png"} <= {p.name for p in r.maps}
    assert "uncertainty" in _measurements(r.geojson) and "mean uncertainty" in r.summary


def test_windows_of_the_default_size_cover_a_small_slide(genst_bundle, slide, tmp_path):
    """A slide smaller than 6.5 mm gets one window as large as the slide, its real size in the table."""
    sd.slide.predict_slide(slide, genst_bundle, tmp_path / "out", chunk_tiles=64, quiet=True)
    win = pd.read_csv(tmp_path / "out" / "slide_windows.csv")
    assert len(win) == 1 and win["width_mm"].iloc[0] < 6.5


def _with_cut(bundle: Path, cut: float, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["risk_cut"] = cut
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_survival_risk_group_from_the_stored_cut(survival_bundle, slide, tmp_path):
    from stdistill.recipes import Cohort

    r = sd.slide.predict_slide(slide, survival_bundle, tmp_path / "out", chunk_tiles=64, quiet=True)
    m = sd.bundle.load_bundle(survival_bundle).model
    _, X = _slide_features(slide, m)
    c = Cohort(pd.DataFrame({"time": [1.0], "event": [0]}, index=["s"]), {"s": X}, {"s": "s"})
    assert r.summary["risk"] == pytest.approx(float(m.predict(c).iloc[0]), rel=1e-4, abs=1e-6)
    assert r.summary["risk_cut"] == m.risk_cut_
    a = ad.read_h5ad(r.h5ad)
    att = a.obsm["attention_pred"]["attention"].to_numpy()
    np.testing.assert_allclose(att, m.attention(c)["s"], rtol=1e-4, atol=1e-7)
    assert att.sum() == pytest.approx(1.0, abs=1e-4) and a.uns["predict"]["slide"]["risk_group"] == r.summary["risk_group"]
    assert "attention" in _measurements(r.geojson) and (tmp_path / "out" / "maps" / "attention.png").is_file()
    risk = r.summary["risk"]
    # one slide alone: a cut of the predicted cohort's median would put it in the low group every time
    for cut, group in ((risk - 1.0, "high risk"), (risk + 1.0, "low risk")):
        b = _with_cut(survival_bundle, cut, tmp_path / f"b{cut}")
        run = sd.slide.predict_cohort(slide.parent, b, tmp_path / f"cohort{cut}", quiet=True)
        row = pd.read_csv(run.summary).iloc[0]
        assert row["risk_group"] == group and row["risk"] == pytest.approx(risk, rel=1e-5)
    cli = _cli("predict", str(slide), "--model", str(survival_bundle), "--out", str(tmp_path / "cli"), "--num-workers", "0",
               tiny=True)
    assert cli.returncode == 0, cli.stderr
    assert f"{r.summary['risk_group']} (cut {m.risk_cut_:.4g}, stored in the model)" in cli.stdout
    assert _cli("report", str(tmp_path / "cli")).returncode == 0
    assert f"{r.summary['risk']:.4g}: {r.summary['risk_group']} (cut" in (tmp_path / "cli" / "report.html").read_text()


def test_cohort_kaplan_meier_of_predicted_groups(survival_bundle, tmp_path):
    pytest.importorskip("lifelines")
    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(4):
        write_pyramid(folder / f"s{i}.tif", he_image(seed=i, smear=False, pen=False), mpp=1.0)
    first = sd.slide.predict_cohort(folder, survival_bundle, tmp_path / "pre", quiet=True)
    risks = pd.read_csv(first.summary).set_index("slide_id")["risk"].sort_values()
    b = _with_cut(survival_bundle, float(risks.iloc[1:3].mean()), tmp_path / "b")  # two slides in each group
    clin = tmp_path / "clinical.csv"
    pd.DataFrame({"slide_id": risks.index, "time": [9.0, 8.0, 2.0, 1.0], "event": [0, 1, 1, 1]}).to_csv(clin, index=False)
    r = _cli("predict", str(folder), "--model", str(b), "--out", str(tmp_path / "out"), "--clinical", str(clin),
             "--num-workers", "0", tiny=True)
    assert r.returncode == 0, r.stderr
    km = json.loads((tmp_path / "out" / "km.json").read_text())
    assert {g: v["n"] for g, v in km["groups"].items()} == {"high risk": 2, "low risk": 2}
    assert km["groups"]["high risk"]["events"] == 2 and 0 < km["logrank_p"] < 1
    assert f"log-rank p = {km['logrank_p']}" in r.stdout and (tmp_path / "out" / "km.png").stat().st_size > 1000
    rep = _cli("report", str(tmp_path / "out"), tiny=True)
    assert rep.returncode == 0, rep.stderr


def test_refused_bundles_are_one_line(survival_bundle, probe_bundle, slide, tmp_path):
    crafted = shutil.copytree(probe_bundle, tmp_path / "crafted")
    cfg = json.loads((crafted / "config.json").read_text())
    cfg["format"] = "os.system"  # a module path: never imported
    (crafted / "config.json").write_text(json.dumps(cfg))
    r = _cli("predict", str(slide), "--model", str(crafted), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not a stdistill model bundle" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    nocut = _with_cut(survival_bundle, None, tmp_path / "nocut")
    with pytest.raises(StdistillError, match="no risk cut"):
        sd.slide.predict_slide(slide, nocut, tmp_path / "o2", quiet=True)
    unknown = shutil.copytree(probe_bundle, tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["bundle"]["features"], cfg["bundle"]["encoder"] = None, None
    (unknown / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StdistillError, match="records no encoder"):
        sd.slide.predict_slide(slide, unknown, tmp_path / "o3", quiet=True)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


@pytest.mark.parametrize("kind", ["probe", "genst", "survival"])
def test_spatialdata_store_for_each_kind(kind, request, slide, tmp_path):
    spatialdata = pytest.importorskip("spatialdata")
    bundle = request.getfixturevalue(f"{kind}_bundle")
    r = sd.slide.predict_slide(slide, bundle, tmp_path / "out", chunk_tiles=64, zarr=True, quiet=True)
    table = spatialdata.read_zarr(r.zarr).tables["table"]
    want = {"probe": ["genes_pred"], "genst": ["genes_pred", "uncertainty_pred"], "survival": ["attention_pred"]}[kind]
    assert table.n_obs == r.n_tiles and all(k in table.obsm for k in want)
