"""``stdistill features`` over a manifest: failing entries isolated, resume after SIGKILL, and
concurrent processes sharing one feature cache and one output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import stdistill as sd
from stdistill.cli import app
from stdistill.features.cache import CacheWarning, FeatureCache

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENC = "test-manifest-tiny"

# A subprocess registers the same tiny encoder (seeded), optionally slowed down per batch, then
# runs the CLI (argv[1] == "cli") or extract_manifest and prints the statuses as JSON ("api").
SCRIPT = textwrap.dedent(f"""
    import json, os, sys, time
    import torch
    from torch import nn
    import stdistill as sd

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            time.sleep(float(os.environ.get("SLOW_S", "0")))
            return self.net(x)

    sd.encoders.register_module({ENC!r}, Slow(), mean=(0.5,) * 3, std=(0.5,) * 3, input_px=16, dim=4, overwrite=True)
    if sys.argv[1] == "cli":
        sys.argv = ["stdistill"] + sys.argv[2:]
        from stdistill.cli import main
        main()
    else:
        man, out, cache = sys.argv[2:5]
        rep = sd.features.extract_manifest(man, out, {ENC!r}, px=16, size_um=20, batch_size=2, device="cpu", cache_dir=cache)
        print("STATUS", json.dumps({{e.name: e.status for e in rep.entries}}))
""")


class _Slow:  # the in-process twin of the subprocess encoder (same seed, same weights)
    @staticmethod
    def make():
        import torch
        from torch import nn

        with torch.random.fork_rng():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _slide(path: Path, seed: int, n: int = 6) -> Path:
    rng = np.random.default_rng(seed)
    sec = sd.io.new_section(
        rng.poisson(2, (n, 3)), genes=["a", "b", "c"], spots=[f"s{i}" for i in range(n)],
        xy_px=rng.uniform(5, 90, (n, 2)), section=f"sec{seed}", patient=f"p{seed}", microns_per_pixel=1.0,
        spot_diameter_um=55.0, image=rng.integers(0, 256, (100, 100, 3), dtype=np.uint8),
    )
    sd.io.write_h5ad(sec, path)
    return path


@pytest.fixture
def cohort(tmp_path):
    """Three good slides and a manifest listing them (relative paths)."""
    d = tmp_path / "slides"
    d.mkdir()
    for k in range(3):
        _slide(d / f"slide{k}.h5ad", k)
    man = tmp_path / "slides.tsv"
    man.write_text("path\tname\n" + "".join(f"slides/slide{k}.h5ad\tS{k}\n" for k in range(3)))
    return man


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", STDISTILL_PROGRESS="0")
    env.update(extra)
    return env


def _script(tmp_path) -> Path:
    p = tmp_path / "run_manifest.py"
    p.write_text(SCRIPT)
    return p


def test_read_manifest_errors(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("file,name\na.h5ad,A\n")
    with pytest.raises(sd.StdistillError, match=r"m\.csv: manifest needs a 'path' column \(comma-separated"):
        sd.features.read_manifest(bad)
    dup = tmp_path / "d.tsv"
    dup.write_text("path\n# a comment\nx/a.h5ad\ny/a.h5ad\n")
    with pytest.raises(sd.StdistillError, match=r"d\.tsv: entry names must be unique.*\['a'\]"):
        sd.features.read_manifest(dup)
    good = tmp_path / "g.tsv"
    good.write_text("path\n/abs/one.h5ad\nrel/two\n")
    assert [(e.name, e.path) for e in sd.features.read_manifest(good)] == [
        ("one", "/abs/one.h5ad"), ("two", str(tmp_path / "rel" / "two"))]


def test_manifest_isolates_failing_entries(cohort, tmp_path):
    (tmp_path / "slides" / "broken.h5ad").write_bytes(b"not an hdf5 file at all")
    with open(cohort, "a") as fh:
        fh.write("slides/broken.h5ad\tbroken\nslides/absent.h5ad\tabsent\n")
    sd.encoders.register_module(ENC, _Slow.make, mean=(0.5,) * 3, std=(0.5,) * 3, input_px=16, dim=4, overwrite=True)
    try:
        out = tmp_path / "out"
        args = ["features", str(cohort), "-o", str(out), "-e", ENC, "--px", "16", "--size-um", "20",
                "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
        res = CliRunner().invoke(app, args, terminal_width=200)
        assert res.exit_code == 1, res.output
        assert "2 entries failed" in res.output and "broken:" in res.output and "absent:" in res.output
        assert "3 done, 2 failed" in res.output
        assert sorted(p.name for p in out.glob("*.h5ad")) == ["S0.h5ad", "S1.h5ad", "S2.h5ad"]
        assert sd.io.read_h5ad(out / "S1.h5ad").obsm[f"X_{ENC}"].shape == (6, 4)
        summary = (out / "features_summary.tsv").read_text()
        assert "broken\t" in summary and "failed" in summary
        # rerun: finished entries are skipped, the failures are tried again and listed again
        res = CliRunner().invoke(app, args, terminal_width=200)
        assert res.exit_code == 1 and "3 skipped (done earlier), 2 failed" in res.output, res.output
    finally:
        sd.encoders.unregister(ENC)


def test_manifest_resumes_after_sigkill(cohort, tmp_path):
    out, cache, script = tmp_path / "out", tmp_path / "cache", _script(tmp_path)
    args = [sys.executable, str(script), "cli", "features", str(cohort), "-o", str(out), "-e", ENC, "--px", "16",
            "--size-um", "20", "--batch-size", "2", "--device", "cpu", "--cache-dir", str(cache)]
    proc = subprocess.Popen(args, env=_env(SLOW_S="0.4"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not (out / "S0.h5ad").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("*.h5ad"))
    assert "S0.h5ad" in finished and len(finished) < 3, finished  # killed mid-way
    mtimes = {n: (out / n).stat().st_mtime_ns for n in finished}
    res = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["S0.h5ad", "S1.h5ad", "S2.h5ad"]
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == mtimes  # finished slides not redone
    assert f"{len(finished)} skipped (done earlier)" in res.stdout
    assert not list(out.glob(".*.tmp")) and not list(cache.rglob("*.tmp"))
    # same features as one uninterrupted in-process run
    sd.encoders.register_module(ENC, _Slow.make, mean=(0.5,) * 3, std=(0.5,) * 3, input_px=16, dim=4, overwrite=True)
    try:
        for k in range(3):
            ref = sd.features.extract(sd.io.read_h5ad(tmp_path / "slides" / f"slide{k}.h5ad"), ENC, px=16, size_um=20,
                                      device="cpu", cache_dir=False, copy=True)
            np.testing.assert_allclose(sd.io.read_h5ad(out / f"S{k}.h5ad").obsm[f"X_{ENC}"], ref.obsm[f"X_{ENC}"],
                                       rtol=1e-5, atol=1e-6)
    finally:
        sd.encoders.unregister(ENC)


def test_two_processes_same_manifest_and_cache(cohort, tmp_path):
    """Two jobs on one manifest: each entry is computed exactly once, outputs and cache intact."""
    out, cache, script = tmp_path / "out", tmp_path / "cache", _script(tmp_path)
    cmd = [sys.executable, str(script), "api", str(cohort), str(out), str(cache)]
    procs = [subprocess.Popen(cmd, env=_env(SLOW_S="0.1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    statuses = []
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, so + se
        statuses.append(json.loads(so.split("STATUS", 1)[1]))
    for name in ("S0", "S1", "S2"):
        done = [s[name] for s in statuses]
        assert done.count("done") == 1, statuses
        assert sd.io.read_h5ad(out / f"{name}.h5ad").obsm[f"X_{ENC}"].shape == (6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        fc = FeatureCache(cache)
        entries = fc.entries(ENC)
        assert len(entries) == 3 and all(fc.get(ENC, e.stem, n=6, dim=4) is not None for e in entries)


WRITER = textwrap.dedent("""
    import os, sys, warnings
    import numpy as np
    from stdistill.features.cache import CacheWarning, FeatureCache

    warnings.simplefilter("error", CacheWarning)      # a corrupt read fails the writer
    root, rank, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    feats = np.random.default_rng(7).standard_normal((20000, 64)).astype(np.float32)   # 5 MB
    fc = FeatureCache(root)
    p = fc.path("enc", "k")
    for i in range(rounds):
        if i % 2 == rank:          # evict, so both processes keep rewriting the same entry
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        fc.put("enc", "k", feats, section="s")
        got = fc.get("enc", "k", n=len(feats), dim=feats.shape[1])
        assert got is None or np.array_equal(got, feats)
    print("ok")
""")


def test_concurrent_writers_never_corrupt_an_entry(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "c"), str(r), "25"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0 and so.strip() == "ok", se[-2000:]
    fc = FeatureCache(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert fc.get("enc", "k", n=20000, dim=64) is not None
    assert not list((tmp_path / "c").rglob("*.tmp"))
