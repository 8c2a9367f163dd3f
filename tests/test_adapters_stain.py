"""Stain normalisation in the adapted-encoder (PEKA, STAMP) patch pipeline: the trunk activations and
their cache key, the training reference saved with the model, the configs and the CLI option."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("torchstain")

from _io_helpers import colour_sections  # noqa: E402
from conftest import TINY_VIT  # noqa: E402
from test_stain import he_sections  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import stdistill as sd  # noqa: E402
from stdistill import StdistillError  # noqa: E402
from stdistill.adapters import (  # noqa: E402
    AdapterConfig,
    _trunk,
    clear_trunk_cache,
    parse_cut,
    trunk,
    trunk_activations,
)
from stdistill.cli import app  # noqa: E402
from stdistill.features import stain_estimates  # noqa: E402
from stdistill.pp import StainNormalizer  # noqa: E402
from stdistill.recipes import PEKA, PekaConfig, StampConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_encoders")
GEOM = {"size_um": 32, "px": 32}
#: float16 activations of a batch against the same patches encoded in another batch
TOL = {"rtol": 2e-3, "atol": 2e-3}


def _direct(enc, a, cfg, stain=None, source=None) -> torch.Tensor:
    """(n, ...) trunk activations of ``a``'s patches read one by one (mapped with ``source`` onto
    ``stain``'s reference when given), as float32."""
    ds = sd.pp.PatchDataset(a, **GEOM)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    if stain is not None:
        x = torch.stack([stain.transform(p, source) for p in x])
    return trunk(enc, parse_cut(enc.backbone, cfg.train_from), x).float()


def test_stain_off_reads_raw_patches_under_the_keys_from_before():
    a = he_sections(8)
    enc = sd.encoders.load(TINY_VIT).eval()
    cfg = AdapterConfig(**GEOM)
    assert "stain_norm" not in cfg.record() and "stain_reference" not in cfg.record()  # fingerprints as before
    clear_trunk_cache()
    h = trunk_activations(enc, a, cfg, cache_dir=False)
    torch.testing.assert_close(h[:, 0].float(), _direct(enc, a, cfg), **TOL)
    # the key of raw patches, as written before the stain option existed: old disk caches are read back
    b = colour_sections(1, 3, ["G0", "G1"], 0)
    stub = SimpleNamespace(spec=SimpleNamespace(name="enc"), weights_digest="w")
    assert _trunk._section_key(stub, b, "S0", np.arange(b.n_obs), "blocks.6.0.conv_pwl", cfg) == "ce3246d785e8a8788f0ace5b9b307193"


def test_stain_norm_changes_the_activations_and_is_part_of_the_cache_key(tmp_path, monkeypatch):
    a = he_sections(8)
    enc = sd.encoders.load(TINY_VIT).eval()
    cfg = AdapterConfig(**GEOM)
    est = stain_estimates(a, "macenko", **GEOM)
    onto0 = StainNormalizer("macenko", est["sec0"])
    computed = []
    compute = _trunk._compute
    monkeypatch.setattr(_trunk, "_compute", lambda *x, **k: computed.append(1) or compute(*x, **k))
    clear_trunk_cache()
    raw = trunk_activations(enc, a, cfg, cache_dir=tmp_path)
    mac = trunk_activations(enc, a, cfg, cache_dir=tmp_path, stain=onto0)
    assert len(computed) == 4 and len(list(tmp_path.glob("*.npy"))) == 4  # 2 sections x (raw, macenko)
    m1 = (a.obs["section"] == "sec1").to_numpy()
    assert (mac[m1].float() - raw[m1].float()).abs().max() > 0.05  # the other stain moved
    sec1 = sd.io.subset_sections(a, ["sec1"])  # its patches mapped with its own estimate onto sec0's stain
    torch.testing.assert_close(mac[m1, 0].float(), _direct(enc, sec1, cfg, onto0, est["sec1"]), **TOL)
    clear_trunk_cache()
    torch.testing.assert_close(trunk_activations(enc, a, cfg, cache_dir=tmp_path, stain=onto0), mac)  # read back
    assert len(computed) == 4
    reinhard = StainNormalizer("reinhard", stain_estimates(a, "reinhard", **GEOM)["sec0"])
    trunk_activations(enc, a, cfg, cache_dir=tmp_path, stain=reinhard)  # another method: computed
    trunk_activations(enc, a, cfg, cache_dir=tmp_path, stain=StainNormalizer("macenko", est["sec1"]))  # another reference
    assert len(computed) == 8


def test_peka_normalises_a_new_slide_onto_the_stored_training_reference(tmp_path):
    a = he_sections(12)
    tr, new = sd.io.subset_sections(a, ["sec0"]), sd.io.subset_sections(a, ["sec1"])
    T = np.random.default_rng(0).normal(size=(tr.n_obs, 4)).astype(np.float32)
    cfg = PekaConfig(adapter="lora", rank=4, lr=1e-2, max_epochs=1, batch_size=8, n_clusters=2, stain_norm="macenko", **GEOM)
    m = PEKA(TINY_VIT, cfg, cache_dir=tmp_path / "trunk").fit(tr, T, ["g0", "g1", "g2"])
    est = stain_estimates(a, "macenko", **GEOM)
    assert m.stain_["method"] == "macenko" and m.stain_["reference_section"] == "sec0"
    assert m.stain_["reference"] == est["sec0"]  # the training section's estimate
    pred = m.predict(new, inplace=False).to_numpy()
    again = PEKA.load(m.save(tmp_path / "peka"), cache_dir=False)
    assert again.stain_ == m.stain_ and again.config.stain_norm == "macenko"
    np.testing.assert_allclose(again.predict(new, inplace=False).to_numpy(), pred, rtol=1e-5, atol=1e-5)
    enc = again._frozen_encoder()
    onto_train = trunk_activations(enc, new, cfg, cache_dir=False, stain=StainNormalizer("macenko", est["sec0"]))
    onto_own = trunk_activations(enc, new, cfg, cache_dir=False, stain=StainNormalizer("macenko", est["sec1"]))
    h = again._activations(new)
    torch.testing.assert_close(h, onto_train)
    assert (h.float() - onto_own.float()).abs().max() > 0.05  # not the new section's own stain
    plain = PEKA(TINY_VIT, cfg, cache_dir=tmp_path / "trunk", stain_norm=None).fit(tr, T, ["g0", "g1", "g2"])
    assert plain.stain_ is None and not np.allclose(plain.predict(new, inplace=False).to_numpy(), pred, atol=1e-3)


def test_unknown_stain_method_and_bad_reference_are_one_clear_error(tmp_path):
    with pytest.raises(StdistillError, match="stain_norm must be one of"):
        PekaConfig(stain_norm="vahadane")
    with pytest.raises(StdistillError, match="stain_norm is None"):
        StampConfig(stain_reference="S0")
    assert StampConfig(stain_norm="Reinhard").stain_norm == "reinhard"
    a = he_sections(8)
    T = np.random.default_rng(0).normal(size=(a.n_obs, 2)).astype(np.float32)
    with pytest.raises(StdistillError, match="not an imaged training section"):
        PEKA(TINY_VIT, stain_norm="macenko", stain_reference="nope", n_clusters=2, cache_dir=False, **GEOM).fit(a, T, ["g0"])
    runner = CliRunner()
    for cmd in (["expression", "peka"], ["pathways", "stamp"]):  # refused before the data are read
        r = runner.invoke(app, [*cmd, str(tmp_path / "none.h5ad"), "--test-patients", "p1", "--stain-norm", "vahadane"])
        assert isinstance(r.exception, StdistillError) and "stain_norm must be one of" in str(r.exception)


def test_stamp_cli_stain_norm_is_saved_and_used_by_predict(tmp_path, monkeypatch):
    from test_pathways_cli import _scored

    monkeypatch.setenv("STDISTILL_CACHE", str(tmp_path / "cache"))
    scored, model = _scored(tmp_path), tmp_path / "stamp"
    runner = CliRunner()
    r = runner.invoke(app, ["pathways", "stamp", str(scored), "--test-patients", "P2", "--encoder", TINY_VIT, "--adapter", "lora",
                            "--rank", "4", "--max-epochs", "1", "--size-um", "32", "--px", "32", "--batch-size", "10",
                            "--stain-norm", "reinhard", "-o", str(model)])
    assert r.exit_code == 0, r.output
    assert "reinhard onto S0" in r.output  # the first imaged training section
    m = sd.recipes.STAMP.load(model)
    assert m.stain_["method"] == "reinhard" and m.stain_["reference_section"] == "S0"
    out = tmp_path / "pred.h5ad"
    r = runner.invoke(app, ["pathways", "predict", str(model), str(scored), "--sections", "S2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    got = sd.io.read_h5ad(out).obsm["pathway_pred"].to_numpy()
    np.testing.assert_allclose(got, m.predict(sd.io.subset_sections(sd.io.read_h5ad(scored), ["S2"]), inplace=False).to_numpy(), rtol=1e-5, atol=1e-5)


def test_stain_reference_is_the_first_imaged_training_section_or_the_named_one():
    from stdistill.adapters import stain_reference

    a = he_sections(8)
    assert stain_reference(a, AdapterConfig(**GEOM)) is None  # off: nothing estimated
    norm, ref = stain_reference(a, AdapterConfig(**GEOM, stain_norm="macenko"))
    assert ref == "sec0"
    own = stain_estimates(a, "macenko", n_sample=_trunk.STAIN_SAMPLE, **GEOM)
    assert norm.state() == StainNormalizer("macenko", own["sec0"]).state()
    norm1, ref1 = stain_reference(a, AdapterConfig(**GEOM, stain_norm="macenko", stain_reference="sec1"))
    assert ref1 == "sec1" and norm1.state() == StainNormalizer("macenko", own["sec1"]).state()
    assert norm1.state() != norm.state()  # the two synthetic stains differ
