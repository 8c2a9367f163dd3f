"""Every command reads its data through the one validated loader (``io.load_any``)."""

from __future__ import annotations

import sys

import anndata as ad
import numpy as np
import pytest
from _io_helpers import colour_sections

import stdistill as sd
from stdistill.cli import main


def _cli(argv: list[str], capsys, monkeypatch) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["stdistill", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return info.value.code, err


def _spoil(a: ad.AnnData, how: str) -> ad.AnnData:
    a = a.copy()
    if how == "log-normalised":
        a.X = np.log1p(a.X.toarray() / a.X.toarray().sum(1, keepdims=True) * 1e4)
    elif how == "nan-coordinates":
        a.obsm["spatial"][3] = np.nan
    elif how == "no-spatial":
        del a.obsm["spatial"]
    elif how == "no-section":
        del a.obs["section"]
    return a


CAUSE = {
    "log-normalised": "counts are not integers; expected raw UMI counts",
    "nan-coordinates": "1 spots have NaN or infinite coordinates",
    "no-spatial": 'obsm["spatial"] (spot centres in image pixels) is missing',
    "no-section": 'obs["section"] is missing',
}


@pytest.fixture(scope="module")
def good():
    return colour_sections(n_patients=2, side=4, feature_key="X_feat")


COMMANDS = {  # DATA is replaced by the input, OUT by an output path
    "info": ["info", "DATA"],
    "niches teacher": ["niches", "teacher", "DATA", "-o", "OUT"],
    "niches evaluate": ["niches", "evaluate", "DATA", "-o", "OUT", "--features", "X_feat"],
    "features": ["features", "DATA", "-o", "OUT"],
    "pathways score": ["pathways", "score", "DATA", "-o", "OUT"],
}


def _argv(command: str, data, out) -> list[str]:
    return [{"DATA": str(data), "OUT": str(out)}.get(w, w) for w in COMMANDS[command]]


@pytest.mark.parametrize("how", list(CAUSE))
@pytest.mark.parametrize("command", ["info", "niches teacher", "niches evaluate"])
def test_commands_refuse_bad_h5ad_naming_file_and_cause(good, tmp_path, capsys, monkeypatch, how, command):
    bad = tmp_path / f"{how}.h5ad"
    _spoil(good, how).write_h5ad(bad)  # anndata's own writer: no validation
    out = tmp_path / "out.h5ad"
    code, err = _cli(_argv(command, bad, out), capsys, monkeypatch)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {bad}: ") and CAUSE[how] in err[0], err
    assert not out.exists()


def test_niches_distill_names_the_file_when_an_obsm_key_is_missing(good, tmp_path, capsys, monkeypatch):
    path = sd.io.write_h5ad(good, tmp_path / "ok.h5ad")
    code, err = _cli(["niches", "distill", str(path), "-m", str(tmp_path / "m")], capsys, monkeypatch)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {path}: obsm lacks") and "niche_probs" in err[0] and "X_effnet" in err[0]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_dataset_names_are_the_same_for_every_command(tmp_path, capsys, monkeypatch, command):
    code, err = _cli(_argv(command, "nosuchdata", tmp_path / "x.h5ad"), capsys, monkeypatch)
    assert code == 2 and len(err) == 1, err
    assert "not a dataset name (her2st, simulated, mob)" in err[0]
