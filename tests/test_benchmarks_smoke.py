"""Every script in benchmarks/ runs its --smoke mode from the repository root, as a user would.

The scripts are collected from the folder (a new script without ``--smoke`` fails here). A run
fails on a non-zero exit, on a table row recorded as an error, or on a missing results file; a
script whose data are absent (one ``error: ... not found at PATH`` line, exit 2) is skipped with
that line when PATH is really absent.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.relative_to(REPO) for p in (REPO / "benchmarks").rglob("*.py") if not p.name.startswith("_"))
MISSING = re.compile(r"error: (.+?) not found at (\S+):")


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory) -> Path:
    """One feature / trunk cache for every smoke run of this test session, shared by the xdist
    workers (entries are written atomically), so the scripts' common small inputs are encoded once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / "smoke-cache"
    cache.mkdir(exist_ok=True)
    return cache


def _env(cache: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", STDISTILL_PROGRESS="0",
               HF_HUB_OFFLINE="1", MPLBACKEND="Agg", STDISTILL_CACHE=str(cache))
    src = str(REPO / "src")  # this checkout's package first (as an editable install would give)
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]])
    return env


def test_scripts_are_collected():
    assert len(SCRIPTS) >= 10 and Path("benchmarks/scale.py") in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.as_posix().removeprefix("benchmarks/"))
def test_smoke(script, tmp_path, smoke_cache):
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in (REPO / "docs" / "results").glob("*.json")}
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], cwd=REPO, env=_env(smoke_cache),
                       capture_output=True, text=True, timeout=600)
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-25:])
    m = MISSING.search(r.stderr)
    if r.returncode == 2 and m:
        path = REPO / m.group(2)
        assert not path.exists(), f"{script} says {m.group(2)} is absent, but it is there:\n{tail}"
        pytest.skip(m.group(0).removeprefix("error: ").rstrip(":"))
    assert r.returncode == 0, f"python {script} --smoke exited {r.returncode}:\n{tail}"
    files = sorted(out.glob(f"{script.stem}*.json"))
    assert files, f"python {script} --smoke wrote no results file {script.stem}*.json under --out:\n{tail}"
    for f in files:
        data = json.loads(f.read_text())
        assert data["smoke"] is True and data["benchmark"] == script.name and data["tables"], f
        assert not os.path.isabs(data["command"].split()[-1]) and str(REPO) not in data["command"]
        assert not [k for k, v in data["args"].items() if isinstance(v, str) and os.path.isabs(v)], data["args"]
        for name, t in data["tables"].items():
            assert t["rows"], f"{f.name}: table {name} has no rows"
            assert all(len(row) == len(t["columns"]) for row in t["rows"]), f"{f.name}: table {name}"
            if "error" in t["columns"]:
                j = t["columns"].index("error")
                bad = [row for row in t["rows"] if row[j] not in (None, "")]
                assert not bad, f"{f.name}: table {name} has error rows {bad}"
    after = {p: p.stat().st_mtime_ns for p in (REPO / "docs" / "results").glob("*.json")}
    assert after == before, "a --smoke run wrote into docs/results"


# ------------------------------------------------------------------ the shared helper, in-process
def _module(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def common(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the command line records it when set
    monkeypatch.setattr(sys, "argv", [str(REPO / "benchmarks" / "toy.py"), "--root", str(REPO.parent / "data")])
    return _module("bench_common", REPO / "benchmarks" / "_common.py")


def test_missing_dataset_is_one_line_and_exit_2(common, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("STDISTILL_DATA", str(tmp_path))
    assert common.data_root() == tmp_path and not common.has_dataset("her2st")
    with pytest.raises(SystemExit) as e:
        common.dataset("her2st")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and MISSING.search(err[0]) and "her2st" in err[0]


def test_printed_table_round_trips_through_results_and_docs(common, tmp_path):
    import argparse

    printed = "| method | fold A | r | n | note |\n|---|---|---|---|---|\n| a | 0.1234 +- 0.0100 | 0.125 | 3 | x \\| y |\n" \
              "| b | 0.2000 | -0.500 | 12 |  |\n"
    args = argparse.Namespace(smoke=True, out=tmp_path, results=None, root=REPO.parent / "data")
    res = common.Results(args, seeds=[0], precision="fp32")
    res.markdown(printed, ["main"])
    res.table("rows", [{"case": "ok", "error": None}, {"case": "bad", "error": "exit 1: boom"}])
    assert res.errors() == ["rows row 1: exit 1: boom"]
    path = res.write()
    assert path == tmp_path / "toy.json"  # a smoke run writes under --out, never into docs/results
    data = json.loads(path.read_text())
    assert data["command"] == "python benchmarks/toy.py --root ../data" and data["args"]["root"] == "../data"
    t = data["tables"]["main"]
    assert t["rows"][1][2] == -0.5 and t["digits"] == {"r": 3} and t["rows"][0][1] == "0.1234 +- 0.0100"
    tables = _module("docs_tables_for_smoke", REPO / "docs" / "tables.py")
    want = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in printed.splitlines() if "---" not in ln]
    got = tables.grid(data, "main")
    assert [[c.replace("\\|", "|").strip() for c in r] for r in got] == [[c.replace("\\|", "|") for c in r] for r in want]
    assert common.Results(argparse.Namespace(smoke=False, results=None), []).path == REPO / "docs" / "results" / "toy.json"
