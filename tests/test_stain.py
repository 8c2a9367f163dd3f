"""Stain normalisation (Macenko, Reinhard) and augmented views: synthetic H&E, cache keys, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchstain")

from conftest import TINY_VIT  # noqa: E402

import stdistill as sd  # noqa: E402
from stdistill import StdistillError  # noqa: E402
from stdistill.pp import PatchAugment, StainNormalizer, estimate_stain  # noqa: E402

IO = 240.0
# optical-density stain matrices (columns: haematoxylin, eosin), made unit length below
HE_A = [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]
HE_B = [[0.55, 0.20], [0.75, 0.85], [0.37, 0.48]]
#: largest allowed |estimated - true| entry of a unit-column stain matrix
TOL_HE = 0.02
#: largest allowed |normalised - reference| LAB mean / sd (L in 0-100)
TOL_LAB = 0.5


def synthetic_he(he, h: int = 64, w: int = 64, seed: int = 0, max_c=(1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Beer-Lambert H&E: I = Io exp(-HE C) with pure-H, pure-E, mixed and background pixels.

    Returns the uint8 (h, w, 3) image and the unit-column (3, 2) stain matrix."""
    rng = np.random.default_rng(seed)
    he = np.asarray(he, float)
    he = he / np.linalg.norm(he, axis=0)
    kind = rng.integers(0, 4, h * w)
    c = np.zeros((2, h * w))
    c[0, kind == 0] = rng.gamma(4, 0.3 * max_c[0], (kind == 0).sum())
    c[1, kind == 1] = rng.gamma(4, 0.25 * max_c[1], (kind == 1).sum())
    m = kind == 2
    c[:, m] = rng.gamma(4, 0.2, (2, m.sum())) * np.asarray(max_c)[:, None]
    img = np.clip(np.round(IO * np.exp(-(he @ c))), 0, 255).astype(np.uint8)
    return img.reshape(3, h, w).transpose(1, 2, 0), he


def test_macenko_recovers_a_known_stain_matrix():
    img, he = synthetic_he(HE_A)
    est = np.asarray(estimate_stain(img, "macenko")["he"])
    assert est.shape == (3, 2)
    assert np.abs(est - he).max() < TOL_HE


def test_macenko_maps_onto_the_reference_stain():
    src, _ = synthetic_he(HE_A, seed=1, max_c=(0.8, 1.2))  # another stain intensity too
    ref, he_ref = synthetic_he(HE_B, seed=2)
    sn = StainNormalizer("macenko").fit(ref)
    out = sn.transform(torch.from_numpy(src.transpose(2, 0, 1).copy()), sn.estimate(src))
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    after = estimate_stain(out, "macenko")
    assert np.abs(np.asarray(after["he"]) - he_ref).max() < TOL_HE
    np.testing.assert_allclose(after["max_c"], sn.reference["max_c"], rtol=0.05)


def test_reinhard_maps_lab_statistics_onto_the_reference():
    src, _ = synthetic_he(HE_A, seed=3)
    ref, _ = synthetic_he(HE_B, seed=4)
    sn = StainNormalizer("reinhard").fit(ref)
    out = sn.transform(torch.from_numpy(src.transpose(2, 0, 1).copy()), sn.estimate(src))
    assert out.shape == (3, 64, 64)
    after = estimate_stain(out, "reinhard")
    assert np.abs(np.subtract(after["mean"], sn.reference["mean"])).max() < TOL_LAB
    assert np.abs(np.subtract(after["std"], sn.reference["std"])).max() < TOL_LAB


def test_stain_state_round_trips_and_bad_input_is_one_error():
    ref, _ = synthetic_he(HE_B)
    sn = StainNormalizer("reinhard").fit(ref)
    assert StainNormalizer.from_state(sn.state()).reference == sn.reference
    with pytest.raises(StdistillError, match="stain_norm must be one of"):
        StainNormalizer("vahadane")
    with pytest.raises(StdistillError, match="not fitted"):
        StainNormalizer("macenko").transform(torch.zeros(3, 4, 4, dtype=torch.uint8), {})


# --------------------------------------------------------------------------- through extract
def he_sections(n_spots: int = 12):
    """Two sections (patients p0, p1) whose images are synthetic H&E of different stains."""
    parts = []
    for k, he in enumerate((HE_A, HE_B)):
        img, _ = synthetic_he(he, h=120, w=120, seed=10 + k)
        rng = np.random.default_rng(k)
        parts.append(sd.io.new_section(
            rng.poisson(2, (n_spots, 3)), genes=["g0", "g1", "g2"], spots=[f"s{i}" for i in range(n_spots)],
            xy_px=rng.uniform(20, 100, (n_spots, 2)), section=f"sec{k}", patient=f"p{k}", microns_per_pixel=1.0,
            spot_diameter_um=55.0, image=img))
    return sd.io.concat(parts)


def _run(a, cache, **kw):
    kw = {"size_um": 32, "px": 32, "batch_size": 8, "device": "cpu", "precision": "fp32", "cache_dir": cache, **kw}
    return sd.features.run_extraction(a, TINY_VIT, **kw)


def test_stain_normalisation_is_part_of_the_cache_key(tmp_path, tiny_encoders):
    a = he_sections()
    key = f"X_{TINY_VIT}"
    assert {s.status for s in _run(a, tmp_path).sections} == {"computed"}
    plain = a.obsm[key].copy()
    for method in ("macenko", "reinhard"):
        assert {s.status for s in _run(a, tmp_path, stain_norm=method).sections} == {"computed"}  # re-extracts
        assert not np.allclose(a.obsm[key], plain)
        rec = a.uns["features"][key]["stain"]
        assert rec["method"] == method and rec["reference_section"] == "sec0" and set(rec["sections"]) == {"sec0", "sec1"}
        assert {s.status for s in _run(a, tmp_path, stain_norm=method).sections} == {"cache hit"}
    # another reference section: another key
    assert {s.status for s in _run(a, tmp_path, stain_norm="macenko", stain_reference="sec1").sections} == {"computed"}
    # the stored state normalises a new slide exactly as before (same key: cache hit, same numbers)
    state = dict(a.uns["features"][key]["stain"])
    b = sd.io.subset_sections(a, ["sec1"])
    assert [s.status for s in _run(b, tmp_path, stain_norm="macenko", stain_reference=state).sections] == ["cache hit"]
    assert {s.status for s in _run(a, tmp_path).sections} == {"cache hit"}  # no stain: the first entries
    with pytest.raises(StdistillError, match="not an imaged section"):
        _run(a, tmp_path, stain_norm="macenko", stain_reference="nope")
    with pytest.raises(StdistillError, match="fitted with 'macenko'"):
        _run(a, tmp_path, stain_norm="reinhard", stain_reference=state)


def test_augmented_views_are_reproducible_with_a_seed(tmp_path, tiny_encoders):
    a = he_sections(8)
    key = f"X_{TINY_VIT}"
    rep = _run(a, False, views=2, view_seed=3)
    v1 = a.obsm[f"{key}_views"].copy()
    assert v1.shape == (16, 2, 192) and np.isfinite(v1).all() and rep.views == 2 and rep.seconds_views > 0
    assert not np.allclose(v1[:, 0], v1[:, 1]) and not np.allclose(v1[:, 0], a.obsm[key])
    _run(a, False, views=2, view_seed=3, batch_size=3)  # other batches: same views
    np.testing.assert_array_equal(a.obsm[f"{key}_views"], v1)
    _run(a, False, views=2, view_seed=4)
    assert not np.allclose(a.obsm[f"{key}_views"], v1)
    # views are cached under their own keys, with the stain transform applied first
    assert {s.status for s in _run(a, tmp_path, views=1, stain_norm="reinhard").sections} == {"computed"}
    rep = _run(a, tmp_path, views=1, stain_norm="reinhard")
    assert {s.status for s in rep.sections} == {"cache hit"} and rep.patches_computed == 0
    assert a.uns["features"][key]["views"]["augment"] == PatchAugment().params()


def test_patch_augment_same_generator_same_patch():
    x = torch.from_numpy(synthetic_he(HE_A, h=32, w=32)[0].transpose(2, 0, 1).copy())
    aug = PatchAugment()
    g = sd.pp._augment.view_generator
    assert torch.equal(aug(x, g(0, "s1", 0)), aug(x, g(0, "s1", 0)))
    assert not torch.equal(aug(x, g(0, "s1", 0)), aug(x, g(0, "s1", 1)))
    assert torch.equal(PatchAugment(hed=0, brightness=0, contrast=0, dihedral=False, scale=0)(x, g(0, "s", 0)), x)
    with pytest.raises(StdistillError, match="must be in"):
        PatchAugment(scale=1.5)


def test_features_cli_stain_and_views(tmp_path, tiny_encoders):
    from typer.testing import CliRunner

    from stdistill.cli import app

    src = tmp_path / "in.h5ad"
    sd.io.write_h5ad(he_sections(6), src)
    out = tmp_path / "out.h5ad"
    args = ["features", str(src), "--encoder", TINY_VIT, "--px", "32", "--size-um", "32", "--device", "cpu",
            "--precision", "fp32", "--cache-dir", str(tmp_path / "c"), "--stain-norm", "reinhard"]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--views", "1"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "augmented views: 1 views x 12 spots" in res.output
    a = sd.io.read_h5ad(out)
    assert a.obsm[f"X_{TINY_VIT}_views"].shape == (12, 1, 192) and a.uns["features"][f"X_{TINY_VIT}"]["stain"]["method"] == "reinhard"
    # a new run with the training file's stored reference: same normalisation, so the cache answers
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o2.h5ad"), "--stain-reference", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "2 cache hits, 0 patches computed" in res.output


def test_features_cli_context_key(tmp_path, tiny_encoders):
    from typer.testing import CliRunner

    from stdistill.cli import app

    src = tmp_path / "in.h5ad"
    sd.io.write_h5ad(he_sections(6), src)
    out = tmp_path / "ctx.h5ad"
    res = CliRunner().invoke(app, ["features", str(src), "--encoder", TINY_VIT, "--px", "32", "--size-um", "64",
                                   "--device", "cpu", "--precision", "fp32", "--cache-dir", str(tmp_path / "c"),
                                   "--key-added", "X_ctx", "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    a = sd.io.read_h5ad(out)
    assert a.obsm["X_ctx"].shape == (12, 192) and a.uns["features"]["X_ctx"]["size_um"] == 64.0


def test_stain_norm_auto_uses_the_encoders_registry_choice(tmp_path, tiny_encoders):
    a = he_sections(6)
    key = f"X_{TINY_VIT}"
    spec = sd.encoders.get_spec(TINY_VIT)
    assert spec.stain_norm is None and sd.encoders.get_spec("uni").stain_norm is None
    assert sd.encoders.get_spec("effnet-lite0-imagenet").stain_norm == "macenko"
    assert sd.encoders.list_encoders().loc["effnet-lite0-imagenet", "stain_norm"] == "macenko"
    assert {s.status for s in _run(a, tmp_path).sections} == {"computed"}
    plain = a.obsm[key].copy()
    # the tiny encoder asks for none: "auto" is the plain extraction (same cache entries)
    assert {s.status for s in _run(a, tmp_path, stain_norm="auto").sections} == {"cache hit"}
    assert "stain" not in a.uns["features"][key]
    with pytest.raises(StdistillError, match="resolves to None"):
        _run(a, tmp_path, stain_norm="auto", stain_reference="sec0")
    # a spec asking for Reinhard: "auto" normalises, sharing the entries of an explicit "reinhard"
    sd.encoders.register(spec.replace(stain_norm="reinhard"), overwrite=True)
    try:
        assert {s.status for s in _run(a, tmp_path, stain_norm="auto").sections} == {"computed"}
        assert a.uns["features"][key]["stain"]["method"] == "reinhard" and not np.allclose(a.obsm[key], plain)
        assert {s.status for s in _run(a, tmp_path, stain_norm="reinhard").sections} == {"cache hit"}
    finally:
        sd.encoders.register(spec, overwrite=True)
    with pytest.raises(StdistillError, match="stain_norm must be None or one of"):
        spec.replace(stain_norm="vahadane")
