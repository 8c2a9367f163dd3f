"""One model format: every estimator saves and loads as a bundle folder; refusals are one line."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from _cli_helpers import _cli
from _survival_helpers import tiny_cohort
from test_expression_teacher import _cohort
from test_niches import toy
from typer.testing import CliRunner

import stdistill as sd
from stdistill import StdistillError
from stdistill.bundle import load_bundle, save_bundle

RECORD = {"encoder": "fake-encoder", "size_um": 112.0, "px": 224, "precision": "fp32", "weights_digest": "ab" * 16,
          "stain": {"method": "macenko", "reference": [[0.6, 0.7, 0.4], [0.1, 0.9, 0.3]], "reference_section": "S0"}}


def _refused(match: str, fn, *args, **kw) -> str:
    with pytest.raises(StdistillError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


# ------------------------------------------------------------------------------------ one per kind
def _probe():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(40, 12)), rng.normal(size=(40, 3))
    m = sd.bench.HestRidge(latent_dim=4).fit(X, Y, genes=["a", "b", "c"], features=RECORD)
    return m, lambda mm: mm.predict(X)


def _expression_teacher():
    a, _ = _cohort()
    m = sd.teachers.ExpressionTeacher("pca", n_components=4, n_top_genes=None, standardize="global").fit(a)
    return m, lambda mm: mm.transform(a)


def _niche_teacher():
    a = toy(n_patients=2)
    m = sd.teachers.NicheTeacher(3).fit(a)
    return m, lambda mm: mm.predict_proba(a)


def _niche_student():
    a = toy()
    sd.teachers.NicheTeacher(3).fit_predict(a)
    a.uns["features"] = {"X_toy": {**RECORD, "encoder": "toy-encoder"}}
    m = sd.students.NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=2, seed=0).fit(a)
    return m, lambda mm: mm.predict_proba(a)


def _survival(kind: str):
    def make():
        c = tiny_cohort(n=16)
        c.meta["features_record"] = RECORD  # as cohort_from_tiles keeps it
        fast = dict(max_epochs=2, dim=8, batch_size=8)
        teacher = sd.recipes.SurvivalModel(kind="gge", **fast).fit(c)
        m = teacher if kind == "gge" else sd.recipes.SurvivalModel(kind="student", **fast).fit(c, teacher=teacher)
        return m, lambda mm: mm.predict(c).to_numpy()
    return make


KINDS = {"probe": _probe, "expression_teacher": _expression_teacher, "niche_teacher": _niche_teacher,
         "niches": _niche_student, "survival": _survival("gge"), "survival_student": _survival("student")}


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_same_numbers_and_record(kind, tmp_path):
    model, predict = KINDS[kind]()
    path = save_bundle(model, tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left
    b = load_bundle(path)
    assert type(b.model) is type(model) and b.path == path
    np.testing.assert_array_equal(predict(b.model), predict(model))  # bit-identical
    rec = b.record
    recipe = kind.replace("survival_student", "survival")
    assert b.recipe == recipe and rec["schema"] == sd.bundle.SCHEMA and rec["stdistill_version"] == sd.__version__
    assert set(rec) >= {"encoder", "patch", "precision", "feature_norm", "features", "outputs", "training"}
    if recipe in ("probe", "niches", "survival"):  # models of encoder features carry how they were made
        assert rec["features"]["stain"]["method"] == "macenko" and rec["precision"] == "fp32"
        assert rec["encoder"]["weights_digest"] == RECORD["weights_digest"] and (b.size_um, b.px) == (112.0, 224)
    else:
        assert rec["features"] is None and rec["patch"] is None
    if recipe == "survival":
        assert b.model.config.kind == ("student" if kind == "survival_student" else "gge")
    cfg = (path / "config.json").read_text()
    json.loads(cfg, parse_constant=lambda c: pytest.fail(f"config.json holds {c}"))  # strict JSON: no NaN/Infinity
    again = type(model).load(path)  # the estimator's own load is the same reader
    np.testing.assert_array_equal(predict(again), predict(model))


def test_load_as_another_class_is_refused(tmp_path):
    model, _ = _probe()
    path = model.save(tmp_path / "probe")
    _refused("this is a HestRidge bundle, not a NicheTeacher one", sd.teachers.NicheTeacher.load, path)


# ------------------------------------------------------------------------------------ crafted configs
def test_a_config_naming_code_is_refused_and_nothing_is_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    mod = tmp_path / "pkg"
    mod.mkdir()
    (mod / "evil_stdistill_probe.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                 "class Run:\n    pass\n")
    monkeypatch.syspath_prepend(str(mod))
    model, predict = _probe()
    path = model.save(tmp_path / "probe")
    good = json.loads((path / "config.json").read_text())

    def with_(**edits):
        cfg = json.loads(json.dumps(good))
        for k, v in edits.items():
            if k == "recipe":
                cfg["bundle"]["recipe"] = v
            else:
                cfg[k] = v
        (path / "config.json").write_text(json.dumps(cfg))

    for fmt in ("os:system", "evil_stdistill_probe:Run", "stdistill.students.niche:NicheStudent", "stdistill.HestRidge/1"):
        with_(format=fmt)
        _refused(r"not a stdistill model bundle \(format", load_bundle, path)
    with_(recipe="evil_stdistill_probe:Run")
    _refused(r"must have recipe 'probe', not 'evil_stdistill_probe:Run'", load_bundle, path)
    with_(reader="evil_stdistill_probe:Run", module="os:system")  # other fields are data, never looked up
    np.testing.assert_array_equal(predict(load_bundle(path).model), predict(model))
    assert not marker.exists() and "evil_stdistill_probe" not in sys.modules
    (path / "config.json").write_text('["not", "an", "object"]')
    _refused("config.json is not a JSON object", load_bundle, path)


# ------------------------------------------------------------------------------------ older files
def _old_safetensors(path, fmt):
    import torch
    from safetensors.torch import save_file

    save_file({"y_mean": torch.zeros(2)}, str(path), metadata={"format": fmt, "encoder": "x"})
    return path


def _old_npz(path, fmt):
    meta = np.frombuffer(json.dumps({"format": fmt}).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, coef=np.zeros((2, 2)), meta=meta)
    return path


def _old_folder(path, fmt, weights="model.safetensors"):
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"format": fmt, "params": {}}))
    save_file({"w": np.zeros(2)}, str(path / weights))
    return path


@pytest.mark.parametrize("make, fmt, cls, says", [
    (_old_safetensors, "stdistill.PEKA/1", "recipes.PEKA", "single-file PEKA model.*`stdistill expression peka"),
    (_old_safetensors, "stdistill.STAMP/1", "recipes.STAMP", "single-file STAMP model.*`stdistill pathways stamp"),
    (_old_npz, "stdistill.HestRidge/1", "bench.HestRidge", r"\.npz frozen probe.*`stdistill expression probe"),
    (_old_npz, "stdistill.ExpressionTeacher/1", "teachers.ExpressionTeacher",
     r'\.npz ExpressionTeacher.*ExpressionTeacher\("pca"\)\.fit\(adata\)\.save\(FOLDER\)'),
    (_old_folder, "stdistill.GenST/1", "recipes.GenST", "GenST model folder without a bundle record.*`stdistill genst fit"),
    (_old_folder, "stdistill.SurvivalModel/1", "recipes.SurvivalModel", "survival model folder.*`stdistill survival fit"),
    (lambda p, f: _old_folder(p, f, "weights.safetensors"), "stdistill.NicheTeacher/1", "teachers.NicheTeacher",
     "niche teacher folder.*`stdistill niches teacher"),
])
def test_older_models_get_one_line_saying_how_to_write_them_again(tmp_path, make, fmt, cls, says):
    suffix = {_old_safetensors: ".safetensors", _old_npz: ".npz"}.get(make, "")
    path = make(tmp_path / f"old{suffix}", fmt)
    msg = _refused(says, load_bundle, path)
    assert "written by an older stdistill; models are bundle folders now" in msg and str(path) in msg
    module, name = cls.split(".")
    _refused(says, getattr(getattr(sd, module), name).load, path)


def test_damaged_and_foreign_files_are_one_line(tmp_path):
    _refused("no such model bundle", load_bundle, tmp_path / "absent")
    (tmp_path / "x.npz").write_bytes(b"junk")
    _refused(r"not a stdistill model: a \.npz file", load_bundle, tmp_path / "x.npz")
    (tmp_path / "m.pt").write_bytes(b"junk")
    _refused("not a model bundle: a file", load_bundle, tmp_path / "m.pt")
    (tmp_path / "empty").mkdir()
    _refused(r"not a model bundle \(config.json missing\)", load_bundle, tmp_path / "empty")
    model, _ = _probe()
    path = model.save(tmp_path / "probe")
    (path / "model.safetensors").unlink()
    _refused(r"not a complete model bundle \(model.safetensors missing\)", load_bundle, path)


# ------------------------------------------------------------------------------------ writing
def test_write_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    model, predict = _probe()
    path = model.save(tmp_path / "probe")
    before = (path / "config.json").read_bytes()
    other = sd.bench.HestRidge(latent_dim=2).fit(np.ones((5, 3)) * np.arange(5)[:, None], np.arange(10.0).reshape(5, 2))

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    _refused("cannot write the model .*No space left on device.*nothing was left", save_bundle, other, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    _refused("cannot write the model", save_bundle, other, path)  # over an existing bundle: the old one stays whole
    assert (path / "config.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"]  # no temporary folders left
    monkeypatch.undo()
    np.testing.assert_array_equal(predict(load_bundle(path).model), predict(model))
    save_bundle(other, path)  # a bundle is replaced by a new one
    assert load_bundle(path).model.latent_dim == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["probe"]


def test_overwrite_refusals(tmp_path):
    model, _ = _probe()
    _refused(r"saved as a folder .*without the \.safetensors suffix", model.save, tmp_path / "m.safetensors")
    _refused(r"without the \.npz suffix", model.save, tmp_path / "m.npz")
    (tmp_path / "notes.txt").write_text("mine")
    _refused("exists and is a file, not a model bundle folder", model.save, tmp_path / "notes.txt")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a,b")
    _refused("exists and is not a model bundle", model.save, tmp_path / "results")
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "results" / "table.csv").exists()
    (tmp_path / "empty").mkdir()
    assert load_bundle(model.save(tmp_path / "empty")).recipe == "probe"  # an empty folder is free


# ------------------------------------------------------------------------------------ CLI
def test_cli_refuses_a_single_file_out_before_training(tmp_path):
    r = _cli("expression", "peka", str(tmp_path / "absent.h5ad"), "--test-patients", "P2", "-o", str(tmp_path / "m.safetensors"))
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0].startswith("error: ") and "without the .safetensors suffix" in err[0]


def test_cli_probe_writes_a_bundle_with_the_feature_record(tmp_path):
    from _io_helpers import colour_sections

    from stdistill.cli import app

    a = colour_sections(3, 5, [f"G{i}" for i in range(12)], 0, feature_key="X_feat")
    a.uns["features"] = {"X_feat": {**RECORD, "size_um": 32.0, "px": 32}}
    f = tmp_path / "d.h5ad"
    a.write_h5ad(f)
    r = CliRunner().invoke(app, ["expression", "probe", str(f), "--feature-key", "X_feat", "--n-genes", "5",
                                 "-o", str(tmp_path / "probe")])
    assert r.exit_code == 0, r.output
    b = load_bundle(tmp_path / "probe")
    assert b.recipe == "probe" and (b.size_um, b.px) == (32.0, 32) and b.features["stain"]["method"] == "macenko"
    g = sd.pp.hest_genes(a, 5)  # HEST's genes and HEST's alpha on the data given, as the benchmark fits them
    F = np.asarray(a.obsm["X_feat"], dtype=np.float64)
    want = sd.bench.HestRidge().fit(F, sd.pp.log1p_targets(a, g), genes=g)
    assert b.outputs == {"genes": g} and b.model.alpha_ == want.alpha_
    np.testing.assert_array_equal(b.model.predict(F), want.predict(F))
