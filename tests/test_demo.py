"""``stdistill demo``: simulate, patches, summary, figure, features, niche distillation."""

import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from stdistill import StdistillError
from stdistill.cli import app
from stdistill.cli.demo import STEPS, Step, run_demo


def test_demo_cli_quick(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--seed", "1"])
    assert res.exit_code == 0, res.output
    text = res.output
    for word in ("simulate", "patches", "sim0", "sim1", "simP0", "demo finished in", "simulated"):
        assert word in text, word
    for name in ("simulated_niches.png", "simulated_patches.png"):
        p = out / name
        assert p.is_file() and str(p) in text.replace("\n", "")
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # the niche recipe ran end to end: metric table printed, CSV and niche maps written
    assert "student" in text and "kmeans_nbr" in text
    import pandas as pd

    m = pd.read_csv(next((out / "niches").glob("metrics_K*.csv")))
    assert {"student", "kmeans", "kmeans_nbr"} <= set(m["method"]) and m["fold"].nunique() == 2
    assert list((out / "niches").glob("*.png"))


def test_demo_steps_are_extensible(tmp_path):
    seen = {}

    def extra(run):
        seen["spots"] = run.adata.n_obs
        seen["patches"] = len(run.patches)
        run.outputs["extra"] = run.out / "extra.txt"

    run = run_demo(tmp_path, quick=True, n_sections=1, steps=[*STEPS[:4], Step("extra", "an added step", extra)])
    assert seen["spots"] == seen["patches"] == run.adata.n_obs > 0
    assert list(run.timings)[:5] == ["simulate", "patches", "summary", "figure", "extra"]
    assert "niche_true" in run.adata.obs and run.adata.obs["section"].nunique() == 1


def test_demo_same_seed_same_data(tmp_path):
    steps = STEPS[:1]
    a = run_demo(tmp_path / "a", quick=True, n_sections=1, seed=4, steps=steps).adata
    b = run_demo(tmp_path / "b", quick=True, n_sections=1, seed=4, steps=steps).adata
    assert (a.X != b.X).nnz == 0


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(StdistillError, match="n-patients"):
        run_demo(tmp_path, quick=True, n_sections=2, n_patients=3, steps=[])
    # through the real entry point: one error line, exit status 2
    res = subprocess.run(
        [sys.executable, "-c", "from stdistill.cli import main; main()", "demo", "--quick", "--n-sections", "1",
         "--n-patients", "2", "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr
