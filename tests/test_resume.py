"""Training killed with SIGKILL resumes from its Lightning checkpoint and ends where an
uninterrupted run ends (niche student, PEKA, STAMP)."""

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

KILL = """
    import os, signal, sys
    mode, run_dir, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "kill":  # SIGKILL this process right after the kill_after-th epoch's checkpoint is written
        from lightning.pytorch.callbacks import ModelCheckpoint
        save, count = ModelCheckpoint._save_checkpoint, [0]
        def save_then_die(self, trainer, filepath):
            save(self, trainer, filepath)
            count[0] += 1
            if count[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        ModelCheckpoint._save_checkpoint = save_then_die
"""

SCRIPT = """
    import numpy as np
    from test_niches import toy
    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = toy(n_patients=3, grid=6, n_genes=20)
    NicheTeacher(3, seed=0).fit_predict(a)

    def fit(run):
        return NicheStudent(feature_key="X_toy", radius_um=450, max_epochs=4, patience=50, seed=0).fit(a, run_dir=run)

    s = fit(run_dir)
    print("resumed:", s.info_["resumed"])
    ref = fit(None)  # the same training, uninterrupted
    print("identical:", np.array_equal(s.predict_proba(a), ref.predict_proba(a)),
          s.info_["val_loss_history"] == ref.info_["val_loss_history"])
"""


ADAPTED = """
    import numpy as np
    import pandas as pd
    import stdistill as sd
    from _io_helpers import colour_sections
    from conftest import TINY_EFF, TINY_VIT, register_tiny_encoders
    from stdistill.recipes import PekaConfig, StampConfig

    register_tiny_encoders()
    recipe = sys.argv[4]

    def fit(run):
        if recipe == "peka":
            a = colour_sections(3, 4, [f"G{i}" for i in range(8)], 0)
            a.obsm["X_teacher"] = np.random.default_rng(0).normal(size=(a.n_obs, 4)).astype(np.float32)
            cfg = PekaConfig(adapter="lora", rank=4, lr=1e-2, max_epochs=3, batch_size=8, n_clusters=2, size_um=32,
                             px=32, val_metric="head", train_positions=None, patience=50)
            m = sd.recipes.peka(a, "X_teacher", list(a.var_names[:4]), train_sections=["S0", "S1"], val_sections=["S2"],
                                encoder=TINY_VIT, config=cfg, cache_dir=False, key_added=None, run_dir=run)
        else:
            a = colour_sections(3, 4, None, 0, feature_key="colour")
            act = np.asarray(a.obsm.pop("colour"))[:, :3] @ np.random.default_rng(0).normal(size=(3, 4))
            a.obsm["pathway_scores"] = pd.DataFrame(act, index=a.obs_names, columns=[f"PW{i}" for i in range(4)])
            cfg = StampConfig(adapter="lora", rank=4, lr=1e-2, max_epochs=3, batch_size=8, size_um=32, px=32,
                              proj_dim=8, val_metric="head", patience=50)
            m = sd.recipes.stamp(a, "pathway_scores", train_sections=["S0", "S1"], val_sections=["S2"], encoder=TINY_EFF,
                                 config=cfg, cache_dir=False, key_added=None, pred_key=None, run_dir=run)
        return m, m.predict(a, inplace=False).to_numpy(), m.transform(a, inplace=False)

    import hashlib
    from stdistill.adapters import clear_trunk_cache

    def run(where):
        # each fit computes the trunk activations as a fresh process would: a cache miss draws
        # DataLoader seeds from torch's global RNG (before the adapter's random init), a hit does not
        clear_trunk_cache()
        m, pred, feat = fit(where)
        return m.resumed_, hashlib.sha256(pred.tobytes() + feat.tobytes() + repr(m.history_).encode()).hexdigest()

    print("resumed: %s %s" % run(run_dir))  # "kill" dies in here, after the first epoch's checkpoint
    print("again: %s %s" % run(run_dir))  # a finished training is read back, not trained again
    print("plain: %s %s" % run(None))  # the same training uninterrupted, without checkpoints
"""


def _run(mode: str, run_dir: Path, script: str = SCRIPT, *args: str) -> subprocess.CompletedProcess:
    src = str(TESTS.parent / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "STDISTILL_PROGRESS": "0"}
    kill_after = "1" if args else "2"  # the kill_after-th checkpoint
    code = textwrap.dedent(KILL) + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code, mode, str(run_dir), kill_after, *args], check=False,
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


@pytest.mark.parametrize("recipe", ["peka", "stamp"])
def test_adapted_encoder_resumes_after_sigkill_to_the_same_result(tmp_path, recipe):
    run_dir = tmp_path / "run"
    killed = _run("kill", run_dir, ADAPTED, recipe)  # killed after the first epoch's checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (stage,) = run_dir.iterdir()
    assert stage.name.startswith("fit-") and (stage / "last.ckpt").is_file() and not (stage / "done.ckpt").exists()
    res = _run("resume", run_dir, ADAPTED, recipe)
    assert res.returncode == 0, res.stderr[-2000:]
    got = dict(line.split(": ", 1) for line in res.stdout.splitlines() if line.startswith(("resumed", "again", "plain")))
    (resumed, digest), (again, again_digest), (plain, plain_digest) = (got[k].split() for k in ("resumed", "again", "plain"))
    assert (resumed, again, plain) == ("resumed", "finished", "None"), res.stdout
    # the same predictions, features and validation history as the uninterrupted run (the fits in
    # one process are comparable: each starts from an empty trunk cache, and Lightning's
    # deterministic settings are restored after each fit)
    assert digest == again_digest == plain_digest, res.stdout
