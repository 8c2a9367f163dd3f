"""Transfer settings (stain normalisation, views, context) chosen on validation patients inside the
training patients, recorded in the bundle and used at prediction."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

pytest.importorskip("torchstain")

from conftest import TINY_VIT  # noqa: E402

import stdistill as sd  # noqa: E402
from stdistill import StdistillError  # noqa: E402
from stdistill.recipes import niches  # noqa: E402
from stdistill.students.niche import NicheStudent  # noqa: E402

KEY = f"X_{TINY_VIT}"
FAST = {"max_epochs": 3, "min_epochs": 1, "patience": 2, "refine_grid": []}


@pytest.fixture(scope="module")
def sim(tmp_path_factory, tiny_encoders):
    """3 simulated patients (one section each) with teacher probabilities and plain tiny-ViT features."""
    a = sd.datasets.simulated(n_sections=3, n_patients=3, spots_per_section=50, n_genes=500, seed=0)
    codes = a.obs["niche_true"].astype("category").cat.codes.to_numpy()
    k = int(codes.max()) + 1
    a.obsm["niche_probs"] = (0.8 * np.eye(k)[codes] + 0.2 / k).astype(np.float32)
    cache = tmp_path_factory.mktemp("cache")
    sd.features.extract(a, TINY_VIT, size_um=32, px=32, device="cpu", precision="fp32", cache_dir=cache)
    return a, cache


def _patients(x) -> set[str]:
    return set(x.obs["patient"].astype(str))


def test_recipe_chooses_transfer_on_training_patients_only(sim, monkeypatch):
    a, cache = sim
    seen: list[set[str]] = []  # patients of every AnnData extracted or trained on while choosing
    choosing = []
    fx = importlib.import_module("stdistill.features.extract")  # the module (the package exports the function)

    real_run, real_prepare, real_fit = fx._run, NicheStudent._prepare, niches.fit_transfer

    def spy_run(adata, *args, **kw):
        if choosing:
            seen.append(_patients(adata))
        return real_run(adata, *args, **kw)

    def spy_prepare(self, adata, probs):
        seen.append(_patients(adata))
        return real_prepare(self, adata, probs)

    def spy_fit(train, *args, **kw):
        choosing.append(1)
        seen.clear()
        try:
            st = real_fit(train, *args, **kw)
        finally:
            choosing.clear()
        test_patient = _patients(a) - _patients(train)
        assert len(test_patient) == 1 and seen and all(s <= _patients(train) for s in seen), (test_patient, seen)
        folds.append((test_patient, st.info_["transfer"]))
        return st

    folds: list = []
    monkeypatch.setattr(fx, "_run", spy_run)
    monkeypatch.setattr(NicheStudent, "_prepare", spy_prepare)
    monkeypatch.setattr(importlib.import_module("stdistill.recipes._niches_folds"), "fit_transfer", spy_fit)  # the fold's fit
    grid = [{"stain_norm": "macenko", "context": True}, {}, {"views": True}]
    df, _ = niches.run(a.copy(), KEY, 3, seed=0, student_kwargs=FAST, figures=False, verbose=False, label_key=None,
                       transfer=grid, transfer_kwargs={"cache_dir": cache, "n_views": 1})
    assert len(folds) == 3 and {p for t, _ in folds for p in t} == {"simP0", "simP1", "simP2"}
    for _, tr in folds:
        # simplest first (ties go to it); every candidate scored on the validation patient
        assert [(s["stain_norm"], s["views"], s["context"]) for s in tr["selection"]] == [
            (None, False, False), (None, True, False), ("macenko", False, True)]
        assert tr["chosen"] in [{k: s[k] for k in ("stain_norm", "views", "context")} for s in tr["selection"]]
        best = max(s["val_score"] for s in tr["selection"])
        first_best = next(s for s in tr["selection"] if s["val_score"] >= best - 1e-9)
        assert tr["chosen"] == {k: first_best[k] for k in ("stain_norm", "views", "context")}
    assert set(df.attrs["transfer"]) == {"simP0", "simP1", "simP2"}
    st = df[df["method"] == "student"]
    assert np.isfinite(st["ari"]).all() and st["note"].str.contains("transfer").all()
    with pytest.raises(StdistillError, match="cannot be combined"):
        niches.run(a.copy(), KEY, 3, student_kwargs=FAST, figures=False, verbose=False, transfer="auto",
                   student_candidates=[{"radius_um": 200}])


def test_chosen_transfer_is_saved_and_used_at_prediction(sim, tmp_path):
    a, cache = sim
    train = sd.io.subset_sections(a, ["sim0", "sim1"])
    test = sd.io.subset_sections(a, ["sim2"])
    del test.obsm[KEY]  # H&E only: the student extracts what it needs
    st = niches.fit_transfer(train, KEY, [{"stain_norm": "macenko", "context": True}], student_kwargs=FAST,
                             cache_dir=cache)
    tr = st.info_["transfer"]
    assert tr["chosen"] == {"stain_norm": "macenko", "views": False, "context": True}
    assert tr["stain_reference_section"] == "sim0" and tr["context_um"] == 64.0 and tr["val_patients"] == ["simP0"]
    assert st.config.feature_key == f"{KEY}_macenko" and st.config.context_key == f"{KEY}_macenko_ctx"
    st.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["bundle"]["training"]["transfer"]["chosen"] == tr["chosen"]
    loaded = sd.bundle.load_bundle(tmp_path / "m").model
    assert loaded.info_["transfer"] == cfg["info"]["transfer"]
    p1 = st.predict_proba(test.copy())
    p2 = loaded.predict(test, inplace=False)
    np.testing.assert_allclose(p1, p2, atol=1e-6)
    made = test.uns["features"]
    ref = st.info_["features"]["stain"]["reference"]
    assert made[f"{KEY}_macenko"]["stain"]["reference"] == ref and made[f"{KEY}_macenko"]["size_um"] == 32
    assert made[f"{KEY}_macenko_ctx"]["size_um"] == 64 and made[f"{KEY}_macenko_ctx"]["stain"]["method"] == "macenko"
    # features made another way (plain, under the chosen key) are refused
    bad = sd.io.subset_sections(a, ["sim2"])
    bad.obsm[f"{KEY}_macenko"] = bad.obsm[KEY]
    bad.uns["features"][f"{KEY}_macenko"] = bad.uns["features"][KEY]
    with pytest.raises(StdistillError, match="stain normalisation none but the student was trained on macenko"):
        loaded.predict_proba(bad)
    with pytest.raises(StdistillError, match="unknown switches"):
        niches.transfer_grid([{"stain": "macenko"}])


def test_cli_distill_chooses_transfer_and_predict_uses_it(sim, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stdistill.cli import app

    a, cache = sim
    monkeypatch.setenv("STDISTILL_CACHE", str(cache.parent / "cli-cache"))
    train, test = tmp_path / "train.h5ad", tmp_path / "test.h5ad"
    sd.io.write_h5ad(sd.io.subset_sections(a, ["sim0", "sim1"]), train)
    t = sd.io.subset_sections(a, ["sim2"])
    del t.obsm[KEY]
    sd.io.write_h5ad(t, test)
    run = CliRunner()
    res = run.invoke(app, ["niches", "distill", str(train), "-m", str(tmp_path / "m"), "--features", KEY, "--max-epochs", "2",
                           "--transfer", "macenko+context,plain"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "transfer chosen: " in res.output and "plain " in res.output and "macenko+context " in res.output
    res = run.invoke(app, ["niches", "predict", str(test), "-m", str(tmp_path / "m"), "-o", str(tmp_path / "p.h5ad")],
                     terminal_width=200)
    assert res.exit_code == 0, res.output
    out = sd.io.read_h5ad(tmp_path / "p.h5ad")
    chosen = json.loads((tmp_path / "m" / "config.json").read_text())["bundle"]["training"]["transfer"]["chosen"]
    key = KEY if chosen["stain_norm"] is None else f"{KEY}_macenko"
    assert key in out.obsm and out.obs["niche_pred"].notna().all()
    assert (f"{KEY}_macenko_ctx" in out.obsm) == chosen["context"]
    res = run.invoke(app, ["niches", "distill", str(train), "-m", str(tmp_path / "m2"), "--features", KEY,
                           "--transfer", "macenko+blur"], terminal_width=200)
    assert isinstance(res.exception, StdistillError) and "unknown switch 'blur'" in str(res.exception)


def test_slide_prediction_uses_recorded_stain_and_context_chunk_by_chunk(sim, tmp_path):
    """The slide path extracts the chosen stain-normalised features and the 2x context per chunk,
    with one stain estimate and one set of statistics for the whole slide: the same niches as
    predicting on all tiles at once."""
    pytest.importorskip("tiffslide")
    from _slide_helpers import he_image, write_pyramid

    from stdistill.io._image import open_image

    a, cache = sim
    st = niches.fit_transfer(sd.io.subset_sections(a, ["sim0", "sim1"]), KEY, [{"stain_norm": "macenko", "context": True}],
                             student_kwargs=FAST, cache_dir=cache)
    sd.bundle.save_bundle(st, tmp_path / "m")
    path = write_pyramid(tmp_path / "slide.tif", he_image(w=384, h=288), mpp=1.0)
    r = sd.slide.predict_slide(path, tmp_path / "m", tmp_path / "out", chunk_tiles=20, quiet=True)
    assert r.n_tiles > 2 * 20  # 3 chunks or more
    got = sd.io.read_h5ad(r.h5ad).obsm["niche_pred_probs"]
    tiles = sd.pp.tile(open_image(path), size_um=32, px=32, microns_per_pixel=1.0, section="slide", min_tissue=0.5)
    want = sd.bundle.load_bundle(tmp_path / "m").model.predict_proba(tiles)  # whole slide, extracted as recorded
    assert tiles.uns["features"][f"{KEY}_macenko_ctx"]["size_um"] == 64
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(StdistillError, match="context_stats"):
        st.predict_proba(tiles, stats=(np.zeros(192, np.float32), np.ones(192, np.float32)))


def test_candidates_refit_with_the_winners_views_not_the_last_candidates(sim):
    a, _ = sim
    train = sd.io.subset_sections(a, ["sim0", "sim1"])
    test = sd.io.subset_sections(a, ["sim2"])
    rng = np.random.default_rng(0)
    f = train.obsm[KEY]
    train.obsm[f"{KEY}_views"] = (f[:, None] + rng.normal(0, 2 * f.std(), (len(f), 2, f.shape[1]))).astype(np.float32)
    kw = dict(feature_key=KEY, seed=0, **FAST)
    for order in ([{"views": True}, {"views": False}], [{"views": False}, {"views": True}]):
        st = NicheStudent(**kw).fit(train, candidates=order)
        direct = NicheStudent(**{**kw, **st.info_["chosen"]}).fit(train)
        np.testing.assert_allclose(st.predict_proba(test), direct.predict_proba(test), atol=1e-5)
