"""Niche distillation: neighbours (um), teacher, student, metrics, baselines, plots, recipe, CLI.

Tiny synthetic sections: three patients on a legacy-ST hex grid (200 um pitch) with three
spatial niches that shift expression (plus a strong patient effect) and the patch features.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import stdistill.io as sio
from stdistill import StdistillError, metrics, pp


def toy(n_patients=3, secs=1, grid=9, n_genes=40, k=3, d=12, mpp=2.0, seed=0, image=False, patient_eff=2.0, noise=1.0):
    rng = np.random.default_rng(seed)
    niche_expr = rng.normal(0, 1.2, (k, n_genes))
    niche_feat = rng.normal(0, 1.5, (k, d))
    base = rng.normal(1.0, 0.5, n_genes)
    out = []
    for p in range(n_patients):
        pe = rng.normal(0, patient_eff, n_genes)
        pf = rng.normal(0, 0.5, d)
        for s in range(secs):
            ii, jj = np.meshgrid(np.arange(grid), np.arange(grid))
            x = ((ii + 0.5 * (jj % 2)) * 200.0 + 300).ravel()
            y = (jj * 173.2 + 300).ravel()
            niche = np.minimum((x - 300) // (grid * 200 / k), k - 1).astype(int)  # vertical bands
            lam = np.exp(np.clip(base + niche_expr[niche] + pe, -3, 5))
            counts = rng.poisson(lam)
            img = None
            if image:
                w, h = int((x.max() + 300) / mpp), int((y.max() + 300) / mpp)
                img = np.full((h, w, 3), 220, np.uint8)
            a = sio.new_section(counts, genes=[f"g{i}" for i in range(n_genes)], spots=[f"s{i}" for i in range(len(x))],
                                xy_px=np.c_[x, y] / mpp, section=f"P{p}S{s}", patient=f"P{p}", microns_per_pixel=mpp,
                                spot_diameter_um=100.0, image=img)
            a.obs["niche_true"] = niche.astype(str)
            a.obsm["X_toy"] = (niche_feat[niche] + pf + rng.normal(0, noise, (len(x), d))).astype(np.float32)
            out.append(a)
    return sio.concat(out)


@pytest.fixture(scope="module")
def data():
    return toy()


# ----------------------------------------------------------------------------- neighbours
def test_spatial_neighbors_radius_in_um_and_per_section():
    a = toy(n_patients=1, secs=2, mpp=2.0)
    b = toy(n_patients=1, secs=2, mpp=0.5)  # same tissue geometry, other pixel size
    for x in (a, b):
        pp.spatial_neighbors(x, radius_um=210)
        conn = x.obsp["spatial_connectivities"]
        deg = np.asarray(conn.sum(1)).ravel()
        assert deg.max() == 6  # hex grid: 6 neighbours at 200 um
        assert conn.diagonal().sum() == 0
        d = x.obsp["spatial_distances"].data
        assert np.all((d > 199) & (d < 201))
        sec = x.obs["section"].to_numpy()
        r, c = conn.nonzero()
        assert np.all(sec[r] == sec[c])  # never across sections
        assert x.uns["spatial_neighbors"]["params"]["radius_um"] == 210
    assert (a.obsp["spatial_connectivities"] != b.obsp["spatial_connectivities"]).nnz == 0
    with pytest.raises(StdistillError, match="radius_um"):
        pp.spatial_neighbors(a, radius_um=-1)


def test_neighbor_tokens_sorted_padded_and_valid_mask():
    a = toy(n_patients=1, grid=6)
    tok = pp.neighbor_tokens(a, radius_um=410, max_neighbors=10)
    assert tok.index.shape == (a.n_obs, 11) and tok.offset_um.shape == (a.n_obs, 11, 2)
    assert np.all(tok.index[:, 0] == np.arange(a.n_obs))
    dist = np.linalg.norm(tok.offset_um, axis=-1)
    assert np.all(dist[tok.mask] <= 410 + 1e-3)
    assert np.all(np.diff(np.where(tok.mask, dist, 1e9), axis=1)[:, :-1][tok.mask[:, 1:-1]] >= -1e-3)
    assert np.all(tok.index[~tok.mask] == -1)
    valid = np.ones(a.n_obs, bool)
    valid[:5] = False
    tok2 = pp.neighbor_tokens(a, radius_um=410, valid=valid)
    assert not np.isin(tok2.index[:, 1:], np.arange(5)).any()
    assert pp.neighbor_tokens(a, 0).index.shape == (a.n_obs, 1)


def test_aggregate_neighbors_concat_and_mean():
    a = toy(n_patients=1, grid=5)
    x = np.zeros((a.n_obs, 2), np.float32)
    x[0] = [6.0, 6.0]
    x[3] = np.nan  # a spot without features is neither used nor filled
    a.obsm["e"] = x
    pp.aggregate_neighbors(a, "e", radius_um=210, n_rings=2, key_added="cc")
    assert a.obsm["cc"].shape == (a.n_obs, 6)
    assert np.isnan(a.obsm["cc"][3]).all()
    pp.spatial_neighbors(a, radius_um=210)
    nb = a.obsp["spatial_connectivities"][0].indices
    ring1_of_nb = a.obsm["cc"][nb[nb != 3]][:, 2]
    assert np.all(ring1_of_nb > 0)  # spot 0 is in ring 1 of its neighbours
    pp.aggregate_neighbors(a, "e", radius_um=210, n_rings=1, mode="mean", key_added="m")
    assert a.obsm["m"].shape == (a.n_obs, 2)
    assert a.obsm["m"][0, 0] == pytest.approx(6.0 / (1 + len(nb[nb != 3])))


# ----------------------------------------------------------------------------- metrics
def test_niche_metrics():
    t = np.array([0, 0, 1, 1, 2, 2])
    assert metrics.ari(t, [5, 5, 7, 7, 9, 9]) == pytest.approx(1.0)
    assert metrics.niche_id_accuracy(t, [5, 5, 7, 7, 9, 9]) == 0.0  # identities matter
    assert metrics.niche_id_accuracy(t, t) == 1.0
    assert metrics.seen_niche_share([0, 1, 3, 3], [0, 1, 2]) == 0.5
    assert metrics.majority_map([0, 0, 0, 1], ["a", "a", "b", "c"]) == {"0": "a", "1": "c"}
    assert list(metrics.apply_map([0, 1, 4], {"0": "a", "1": "c"}, default="z")) == ["a", "c", "z"]
    lab, f1 = metrics.trivial_macro_f1(["inv"] * 8 + ["stroma"] * 2)
    assert lab == "inv" and f1 == pytest.approx((2 * 0.8 / 1.8) / 2)
    assert metrics.hungarian_match([0, 0, 1, 1], [1, 1, 0, 2]) == {"1": "0", "0": "1", "2": "+2"}
    sizes = metrics.niche_sizes([0, 0, 1], ["A", "B", "B"], categories=[0, 1, 2])
    assert sizes.loc["B"].tolist() == [1, 1, 0]


# ----------------------------------------------------------------------------- teacher
def test_teacher_removes_patient_effect_and_finds_niches(data):
    from stdistill.teachers import NicheTeacher

    a = data.copy()
    assert NicheTeacher(3, batch_correction=None).fit_predict(a, key_added="bad") is None
    assert a.obsm["bad_probs"].shape == (a.n_obs, 3)
    d_bad = NicheTeacher(3).diagnostics(a, key="bad")
    assert d_bad["nmi_patient"] > 0.8  # globally scaled: one niche per patient
    t = NicheTeacher(3)
    probs = t.fit_predict(a, key_added="niche", inplace=False)
    assert "niche" not in a.obs  # inplace=False writes nothing
    assert t.fit_predict(a, key_added="niche") is None  # seeded: the same fit, now written
    np.testing.assert_array_equal(a.obsm["niche_probs"], probs)
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert list(a.obs["niche"].cat.categories) == ["0", "1", "2"]
    d = t.diagnostics(a)
    assert d["nmi_patient"] < 0.2 and d["single_niche_patients"] == []
    assert d["sizes"].shape == (3, 3)
    assert metrics.ari(a.obs["niche_true"], a.obs["niche"]) > 0.6


def test_teacher_nolan_and_save_load(tmp_path, data):
    from stdistill.teachers import NicheTeacher

    a = data.copy()
    t = NicheTeacher(3, method="nolan", n_steps=60, seed=1)
    t.fit_predict(a)
    p = a.obsm["niche_probs"]
    assert p.shape == (a.n_obs, 3) and np.isfinite(p).all()
    assert len(np.unique(p.argmax(1))) >= 2  # the balanced objective does not collapse
    assert metrics.nmi(a.obs["patient"], a.obs["niche"]) < 0.5
    t.save(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["params"]["method"] == "nolan"
    p2 = NicheTeacher.load(tmp_path / "t").predict_proba(a)
    np.testing.assert_allclose(p2, p, atol=1e-5)
    # the LightningModule is a module-level class: it pickles (a class made in a closure does not)
    m = pickle.loads(pickle.dumps(t._model))
    assert type(m).__module__ == "stdistill.teachers._nolan_modules" and m.hparams["n_niches"] == 3
    x, off, gmask, _ = t._views(a, t._embed(a, fit=False))
    np.testing.assert_array_equal(m.scores(*map(torch.from_numpy, (x, off, gmask))).detach().numpy(),
                                  t._model.scores(*map(torch.from_numpy, (x, off, gmask))).detach().numpy())
    g = NicheTeacher(3).fit(a)
    g.save(tmp_path / "g")
    np.testing.assert_allclose(NicheTeacher.load(tmp_path / "g").predict_proba(a), g.fit_probs_, atol=1e-5)


def test_teacher_bad_input(tmp_path, data):
    from stdistill.teachers import NicheTeacher

    with pytest.raises(StdistillError, match="method"):
        NicheTeacher(3, method="leiden")
    with pytest.raises(StdistillError, match="batch_key"):
        NicheTeacher(3, batch_key="nope").fit(data)
    with pytest.raises(StdistillError, match="not fitted"):
        NicheTeacher(3).predict(data)
    with pytest.raises(StdistillError, match="not a model bundle"):
        NicheTeacher.load(tmp_path)
    import importlib.util

    if importlib.util.find_spec("scvi") is None:
        with pytest.raises(StdistillError, match=r"stdistill\[scvi\]"):
            NicheTeacher(3, batch_correction="scvi").fit(data)


# ----------------------------------------------------------------------------- student
def _split(a, test_patient="P0"):
    secs = sio.sections(a)
    tr = sio.subset_sections(a, [s for s in secs if not s.startswith(test_patient)])
    te = sio.subset_sections(a, [s for s in secs if s.startswith(test_patient)])
    return tr, te


def test_student_learns_from_soft_labels_and_roundtrips(tmp_path, data):
    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = data.copy()
    NicheTeacher(3).fit_predict(a)
    tr, te = _split(a)
    s = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=25, patience=6, seed=0)
    s.fit(tr)
    assert s.info_["val_patients"] == ["P1"] and s.info_["train_patients"] == ["P1", "P2"]
    assert s.predict(te, key_added="pred") is None  # writes, returns None (the return rule)
    probs = te.obsm["pred_probs"]
    assert probs.shape == (te.n_obs, 3) and np.allclose(probs.sum(1), 1, atol=1e-4)
    np.testing.assert_array_equal(s.predict(te, inplace=False), probs)
    b = s.predict(te, key_added="other", copy=True)
    assert "other" in b.obs and "other" not in te.obs
    assert "pred_probs" in te.obsm and list(te.obs["pred"].cat.categories) == ["0", "1", "2"]
    assert metrics.niche_id_accuracy(te.obs["niche"], te.obs["pred"]) > 0.6
    s.save(tmp_path / "s")
    assert {p.name for p in (tmp_path / "s").iterdir()} == {"config.json", "model.safetensors"}
    np.testing.assert_allclose(NicheStudent.load(tmp_path / "s").predict_proba(te), probs, atol=1e-5)
    # same seed -> same numbers
    s2 = NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=25, patience=6, seed=0).fit(tr)
    np.testing.assert_allclose(s2.predict_proba(te), probs, atol=1e-6)


def test_student_candidates_chosen_on_validation_patient(data):
    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = data.copy()
    NicheTeacher(3).fit_predict(a)
    tr, te = _split(a)
    s = NicheStudent(feature_key="X_toy", max_epochs=8, patience=3)
    s.fit(tr, candidates=[{"radius_um": 0.0}, {"radius_um": 450.0}])
    sel = s.selection_  # a stdistill.select.Selection, kept as JSON in info_ and the bundle
    assert sel.to_dict() == s.info_["selection"] and sel.criterion.metric == "val_ari" and sel.criterion.maximize
    scores = sel.scores()
    assert scores["radius_um"].tolist() == [0.0, 450.0]
    best = scores.loc[scores["score"].idxmax()]  # validation ARI; ties: the first listed
    assert s.config.radius_um == best["radius_um"] == s.info_["chosen"]["radius_um"]
    assert s.info_["best_val"] == -best["score"]  # the monitored value (-ARI) at the chosen epoch
    assert s.bundle_record()["training"]["selection"] == s.info_["selection"]
    with pytest.raises(StdistillError, match="cannot be chosen"):
        NicheStudent(feature_key="X_toy").fit(tr, candidates=[{"lr_typo": 1}])


def test_student_candidates_scored_with_each_training_patient_validating(data):
    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = data.copy()
    NicheTeacher(3).fit_predict(a)
    tr, _ = _split(a)
    cands = [{"radius_um": 0.0}, {"radius_um": 450.0}]
    one = NicheStudent(feature_key="X_toy", max_epochs=6, patience=3).fit(tr, candidates=cands)
    each = NicheStudent(feature_key="X_toy", max_epochs=6, patience=3, val_patients="each").fit(tr, candidates=cands)
    first, second = one.info_["val_patients"][0], [q for q in one.info_["train_patients"] if q not in one.info_["val_patients"]]
    assert each.info_["val_patients"] == [first, *second]  # the default patient first, then the others in turn
    s1, se = one.selection_, each.selection_
    assert list(se.table["split"].unique()) == each.info_["val_patients"] and list(s1.table["split"].unique()) == [first]
    per_split = se.summary()[each.info_["val_patients"]]  # each split's best validation ARI over epochs
    np.testing.assert_array_equal(per_split[first], s1.summary()[first])  # the first turn is the default's run
    np.testing.assert_allclose(se.scores()["score"], per_split.mean(axis=1))
    best = se.scores().loc[se.choice["candidate"]]
    assert best["score"] == se.scores()["score"].max()
    assert each.config.radius_um == best["radius_um"] == each.info_["chosen"]["radius_um"]


def test_student_predicts_on_tiles_without_genes(data):
    """An H&E-only AnnData (like pp.tile output: X with 0 genes) gets niches from features alone."""
    import anndata as ad
    import scipy.sparse as sp

    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = data.copy()
    NicheTeacher(3).fit_predict(a)
    tr, te = _split(a)
    s = NicheStudent(feature_key="X_toy", radius_um=300, max_epochs=5, val_patients=None).fit(tr)
    tiles = ad.AnnData(X=sp.csr_matrix((te.n_obs, 0), dtype=np.float32), obs=te.obs[["section", "patient"]].copy(),
                       obsm={"spatial": te.obsm["spatial"], "X_toy": te.obsm["X_toy"]}, uns={"spatial": te.uns["spatial"]})
    tiles.obsm["X_toy"][:2] = np.nan  # tiles without features get no niche
    s.predict(tiles)
    assert tiles.obs["niche_pred"].isna().sum() == 2 and np.isnan(tiles.obsm["niche_pred_probs"][:2]).all()
    del tiles.obsm["X_toy"]
    with pytest.raises(StdistillError, match="patch features"):
        s.predict(tiles, extract=False)


def test_student_bad_input(tmp_path, data):
    from stdistill.students import NicheStudent

    with pytest.raises(StdistillError, match="niche_probs"):
        NicheStudent(feature_key="X_toy").fit(data)
    with pytest.raises(StdistillError, match="not fitted"):
        NicheStudent(feature_key="X_toy").predict(data)
    with pytest.raises(StdistillError, match="feature_norm"):
        NicheStudent(feature_norm="none")
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(StdistillError, match="config.json is unreadable"):
        NicheStudent.load(tmp_path)


# ----------------------------------------------------------------------------- baselines, plots
def test_kmeans_baselines():
    from stdistill.recipes.niches import kmeans_niches

    a = toy(noise=3.0)
    own = kmeans_niches(a, "X_toy", 3, seed=0, inplace=False)
    assert kmeans_niches(a, "X_toy", 3, radius_um=450, seed=0, key_added="kmn") is None
    nbr = a.obs["kmn"].astype(int).to_numpy()
    assert "niche_kmeans" not in a.obs  # inplace=False wrote nothing
    assert set(np.unique(own)) == {0, 1, 2}
    assert metrics.ari(a.obs["niche_true"], nbr) > metrics.ari(a.obs["niche_true"], own)


def test_plot_matches_colours(tmp_path):
    from stdistill import pl
    from stdistill.pl._niches import _matched_colours

    a = toy(n_patients=1, image=True)
    a.obs["ref"] = a.obs["niche_true"]
    a.obs["perm"] = a.obs["niche_true"].map({"0": "2", "1": "0", "2": "1"})
    cm = _matched_colours(a.obs["ref"].astype(str).to_numpy(), a.obs["perm"].astype(str).to_numpy(), ["0", "1", "2"], 3)
    assert cm == {"2": 0, "0": 1, "1": 2}
    fig = pl.niches(a, ["ref", "perm"], path=tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 1000 and len(fig.axes) == 2
    with pytest.raises(StdistillError, match="obs"):
        pl.niches(a, ["missing"])


def test_student_config_old_keywords_and_saved_params(tmp_path, data):
    """NicheStudent(config) and the keyword form are one model; ``device`` and ``params`` still work
    for one release (deprecated); bundles saved with ``device`` load."""
    import json
    import warnings

    from stdistill.students import NicheStudent, NicheStudentConfig
    from stdistill.teachers import NicheTeacher

    a = data.copy()
    NicheTeacher(3).fit_predict(a)
    tr, te = _split(a)
    cfg = NicheStudentConfig(feature_key="X_toy", radius_um=450, max_epochs=2, seed=0, refine_grid=[])
    s1, s2 = NicheStudent(cfg), NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=2, seed=0, refine_grid=[])
    assert s1.config == s2.config and s1.config is not cfg and s1.config.radius_um == 450.0
    assert NicheStudent(cfg, seed=1).config.seed == 1 and cfg.seed == 0
    np.testing.assert_array_equal(s1.fit(tr).predict_proba(te), s2.fit(tr).predict_proba(te))
    with pytest.warns(DeprecationWarning, match=r"NicheStudent\(device=\.\.\.\) is now NicheStudent\(accelerator=\.\.\.\)"):
        assert NicheStudent(device="cpu").config.accelerator == "cpu"
    with pytest.warns(DeprecationWarning, match="params is now NicheStudent.config"):
        p = s1.params
    assert p["radius_um"] == 450.0 and p["device"] == "cpu"
    with pytest.raises(TypeError):
        p["radius_um"] = 1.0  # a read-only view
    with pytest.raises(StdistillError, match="feature_norm"):
        NicheStudentConfig(feature_norm="batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s1.save(tmp_path / "m")
        cfg_file = tmp_path / "m" / "config.json"
        saved = json.loads(cfg_file.read_text())
        params = saved["params"]
        params["device"] = params.pop("accelerator")  # as an older version wrote it
        params.pop("connectivity_key")
        cfg_file.write_text(json.dumps(saved))
        old = NicheStudent.load(tmp_path / "m")
    np.testing.assert_array_equal(old.predict_proba(te), s1.predict_proba(te))
