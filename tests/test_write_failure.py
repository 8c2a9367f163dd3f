"""A failed write (full disk, quota, file-size limit) is one error line and the process lives on.

h5py crashes the interpreter when it closes a file whose writes failed (h5py issues 914, 2160);
stdistill builds HDF5 files in memory and copies them with plain file I/O. The tests run a
subprocess under ``RLIMIT_FSIZE`` (Python ignores SIGXFSZ, so an oversize write fails with EFBIG).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import stdistill as sd

resource = pytest.importorskip("resource")
TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
LIMIT = 20_000  # bytes: far less than any output below


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "STDISTILL_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)


def _no_output(tmp_path: Path, name: str) -> None:
    assert [p.name for p in tmp_path.iterdir() if name in p.name] == []


def test_python_catches_a_failed_write_and_the_process_survives(tmp_path):
    res = _run(f"""
        import gc, resource
        import numpy as np
        from _io_helpers import colour_sections
        from stdistill import StdistillError
        from stdistill.features.cache import FeatureCache
        from stdistill.io import write_h5ad
        a = colour_sections(n_patients=2, side=12)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
        for write in (lambda: write_h5ad(a, "out.h5ad"),
                      lambda: FeatureCache("cache").put("enc", "k", np.ones((5000, 8), np.float32))):
            try:
                write()
            except StdistillError as e:
                print("caught:", e)
        gc.collect()
        print("alive")
    """, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    caught = [ln for ln in res.stdout.splitlines() if ln.startswith("caught:")]
    assert len(caught) == 2, res.stdout
    assert "out.h5ad: could not write" in caught[0] and "File too large" in caught[0]
    assert "cannot write the feature cache" in caught[1]
    assert res.stdout.rstrip().endswith("alive") and "Traceback" not in res.stderr
    _no_output(tmp_path, "out.h5ad")
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.rglob("*.h5*"))


def test_cli_features_on_a_full_disk_exits_2_with_one_line(tmp_path):
    rng = np.random.default_rng(0)
    a = sd.io.new_section(rng.poisson(2, (30, 3)), genes=["a", "b", "c"], spots=[f"s{i}" for i in range(30)],
                          xy_px=rng.uniform(5, 90, (30, 2)), section="sec0", patient="p0", microns_per_pixel=1.0,
                          spot_diameter_um=55.0, image=rng.integers(0, 256, (100, 100, 3), dtype=np.uint8))
    sd.io.write_h5ad(a, tmp_path / "in.h5ad")
    res = _run(f"""
        import resource, sys
        import torch
        from torch import nn
        import stdistill as sd
        from stdistill.cli import main
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        sd.encoders.register_module("tiny", net, mean=(0.5,) * 3, std=(0.5,) * 3, input_px=16, dim=4)
        sys.argv = ["stdistill", "features", "in.h5ad", "-o", "out.h5ad", "-e", "tiny", "--px", "16",
                    "--size-um", "20", "--device", "cpu", "--no-cache"]
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
        main()
    """, tmp_path)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "out.h5ad" in lines[0], res.stderr
    assert "File too large" in lines[0]
    _no_output(tmp_path, "out.h5ad")
