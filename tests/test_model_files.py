"""Damaged model files are one StdistillError naming the file and the cause, never a library exception."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_niches import toy

from stdistill import StdistillError


def _refused(match: str, fn, *args, names=None):
    with pytest.raises(StdistillError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg and re.search(match, msg), msg
    if names is not None:
        assert str(names) in msg
    return msg


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = toy()
    NicheTeacher(3).fit_predict(a)
    path = tmp_path_factory.mktemp("student") / "s"
    NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=2, seed=0).fit(a).save(path)
    return path


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    edit(t)
    save_file(t, str(path))


def _probe(tmp_path):
    from stdistill.bench import HestRidge

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(40, 12)), rng.normal(size=(40, 3))
    return HestRidge(latent_dim=4).fit(X, Y, genes=["a", "b", "c"]).save(tmp_path / "probe")


def _expression_teacher(tmp_path):
    from test_expression_teacher import _cohort

    from stdistill.teachers import ExpressionTeacher

    a, _ = _cohort()
    return ExpressionTeacher("pca", n_components=4, n_top_genes=None, standardize="global").fit(a).save(tmp_path / "t")


@pytest.mark.parametrize("make, load", [
    (_probe, lambda p: __import__("stdistill.bench", fromlist=["HestRidge"]).HestRidge.load(p)),
    (_expression_teacher, lambda p: __import__("stdistill.teachers", fromlist=["x"]).ExpressionTeacher.load(p)),
])
def test_truncated_weights_are_one_line(tmp_path, make, load):
    path = make(tmp_path)
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    _refused(r"model.safetensors is unreadable", load, path, names=path)


def test_config_missing_a_key_is_not_keyerror(tmp_path):
    from stdistill.bench import HestRidge

    path = _probe(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["latent_dim"]
    (path / "config.json").write_text(json.dumps(cfg))
    _refused("saved HestRidge lacks 'latent_dim'", HestRidge.load, path, names=path)


def test_probe_array_of_the_wrong_shape_is_named(tmp_path):
    from stdistill.bench import HestRidge

    path = _probe(tmp_path)
    _edit_tensors(path / "model.safetensors", lambda t: t.update(coef=t["coef"][:2]))
    _refused(r"HestRidge array 'coef' has shape \(2, 4\) in the file, its config needs \(3, 4\)", HestRidge.load, path,
             names=path)


@pytest.mark.parametrize("where, key", [("top", "params"), ("info", "d_in")])
def test_student_config_missing_a_key_is_not_keyerror(student_dir, tmp_path, where, key):
    from stdistill.students import NicheStudent

    path = _copy(student_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del (cfg if where == "top" else cfg[where])[key]
    (path / "config.json").write_text(json.dumps(cfg))
    _refused(f"saved NicheStudent lacks '{key}'", NicheStudent.load, path, names=path)


def test_integer_weights_are_refused(student_dir, tmp_path):
    from stdistill.students import NicheStudent

    path = _copy(student_dir, tmp_path)
    name = {}

    def to_int(t):
        k = next(k for k, v in t.items() if v.is_floating_point() and not k.startswith("_norm"))
        name["k"] = k
        t[k] = t[k].round().to(__import__("torch").int64)

    _edit_tensors(path / "model.safetensors", to_int)
    _refused(rf"tensor '{re.escape(name['k'])}' is int64, expected floating point", NicheStudent.load, path, names=path)


def test_shape_mismatch_names_the_tensor_and_both_shapes(student_dir, tmp_path):
    import torch

    from stdistill.students import NicheStudent

    path = _copy(student_dir, tmp_path)
    name = {}

    def grow(t):
        k = next(k for k, v in t.items() if v.ndim == 2 and not k.startswith("_norm"))
        name["k"], name["shape"] = k, tuple(t[k].shape)
        t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])

    _edit_tensors(path / "model.safetensors", grow)
    r, c = name["shape"]
    _refused(rf"tensor '{re.escape(name['k'])}' has shape \({r + 1}, {c}\) in the file, the model expects \({r}, {c}\)",
             NicheStudent.load, path, names=path)


def test_niche_teacher_integer_arrays_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from stdistill.teachers import NicheTeacher

    a = toy(n_patients=2)
    t = NicheTeacher(3).fit(a)
    t.save(tmp_path / "t")
    w = tmp_path / "t" / "model.safetensors"
    arrays = load_file(str(w))
    for k in list(arrays):
        bad = dict(arrays, **{k: arrays[k].astype(np.int64)})
        save_file(bad, str(w))
        _refused(rf"'{re.escape(k)}' is int64, expected floating point", NicheTeacher.load, tmp_path / "t")
