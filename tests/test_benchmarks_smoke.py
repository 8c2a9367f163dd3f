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
    """One feature / trunk cache for every smoke run of this test session (per xdist worker)."""
    return tmp_path_factory.mktemp("smoke-cache")


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
        for name, t in data["tables"].items():
            assert t["rows"], f"{f.name}: table {name} has no rows"
            assert all(len(row) == len(t["columns"]) for row in t["rows"]), f"{f.name}: table {name}"
            if "error" in t["columns"]:
                j = t["columns"].index("error")
                bad = [row for row in t["rows"] if row[j] not in (None, "")]
                assert not bad, f"{f.name}: table {name} has error rows {bad}"
    after = {p: p.stat().st_mtime_ns for p in (REPO / "docs" / "results").glob("*.json")}
    assert after == before, "a --smoke run wrote into docs/results"
