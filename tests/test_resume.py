"""Training killed with SIGKILL resumes from its Lightning checkpoint and ends where an
uninterrupted run ends (niche student)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lightning")
TESTS = Path(__file__).resolve().parent

SCRIPT = """
    import os, signal, sys
    import numpy as np
    from test_niches import toy
    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    mode, run_dir = sys.argv[1], sys.argv[2]
    a = toy(n_patients=3, grid=6, n_genes=20)
    NicheTeacher(3, seed=0).fit_predict(a)
    if mode == "kill":  # SIGKILL this process right after the 3rd epoch's checkpoint is written
        from lightning.pytorch.callbacks import ModelCheckpoint
        save, count = ModelCheckpoint._save_checkpoint, [0]
        def save_then_die(self, trainer, filepath):
            save(self, trainer, filepath)
            count[0] += 1
            if count[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        ModelCheckpoint._save_checkpoint = save_then_die

    def fit(run):
        return NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=8, patience=50, seed=0).fit(a, run_dir=run)

    s = fit(run_dir)
    print("resumed:", s.info_["resumed"])
    ref = fit(None)  # the same training, uninterrupted
    print("identical:", np.array_equal(s.predict_proba(a), ref.predict_proba(a)),
          s.info_["val_loss_history"] == ref.info_["val_loss_history"])
"""


def _run(mode: str, run_dir: Path) -> subprocess.CompletedProcess:
    src = str(TESTS.parent / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "STDISTILL_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), mode, str(run_dir)], check=False,
                          capture_output=True, text=True, timeout=300, env=env, cwd=TESTS)


def test_niche_student_resumes_after_sigkill_to_the_same_result(tmp_path):
    run_dir = tmp_path / "run"
    killed = _run("kill", run_dir)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    stage = [d for d in run_dir.iterdir() if d.name.startswith("candidate0-")]
    assert len(stage) == 1 and (stage[0] / "last.ckpt").is_file() and not (stage[0] / "done.ckpt").exists()
    res = _run("resume", run_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed: ['candidate0']" in res.stdout, res.stdout
    assert "identical: True True" in res.stdout, res.stdout
