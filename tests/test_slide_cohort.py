"""``stdistill predict`` on a cohort: a folder or CSV of slides, one folder per slide, summary.csv,
a broken slide recorded and skipped, resuming after a kill, SLURM-style shards."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from _cli_helpers import _cli
from _slide_helpers import he_image, truncate, write_pyramid

import stdistill as sd
from stdistill import StdistillError

pytest.importorskip("tiffslide")
pytestmark = pytest.mark.usefixtures("tiny_encoders")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """a.tif and c.tif (two sections), b.tif an interrupted copy."""
    d = tmp_path_factory.mktemp("cohort") / "slides"
    d.mkdir()
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        write_pyramid(d / f"{name}.tif", he_image(seed=seed), mpp=1.0)
    truncate(d / "b.tif")
    (d / "notes.txt").write_text("not a slide")
    return d


def test_kill_after_the_first_slide_and_restart(cohort, slide_bundle, tmp_path):
    out = tmp_path / "run"
    args = ["predict", str(cohort), "--model", str(slide_bundle), "--out", str(out), "--chunk-tiles", "16",
            "--num-workers", "1"]
    proc = _cli(*args, env={"STDISTILL_CHUNK_PAUSE_S": "0.4"}, popen=True, tiny=True)
    t0 = time.time()  # kill once slide a is finished and slide c has some finished chunks
    while not ((out / "a" / "status.json").is_file() and len(list((out / "c" / "chunks").glob("*.npz"))) >= 2):
        assert time.time() - t0 < 240 and proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "c" / "status.json").exists() and not (out / "c" / "c.h5ad").exists()
    a_files = {p: p.stat().st_mtime_ns for p in (out / "a").rglob("*") if p.is_file()}
    r = _cli(*args, tiny=True)
    assert r.returncode == 0, r.stderr
    assert "a: finished earlier, kept" in r.stdout and "c: ok" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "a").rglob("*") if p.is_file()} == a_files  # not recomputed
    run_c = json.loads((out / "c" / "run.json").read_text())
    assert run_c["result"]["n_tiles_predicted"] > 0
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["slide_id"]) == ["a", "b", "c"] and list(summary["status"]) == ["ok", "error", "ok"]
    assert summary["error"].isna().tolist() == [True, False, True]
    assert "b.tif: the file is truncated" in summary["error"][1] and pd.isna(summary["n_tiles"][1])
    shares = summary[[c for c in summary.columns if c.startswith("share niche")]]
    assert shares.shape[1] == 2 and (shares.iloc[[0, 2]].sum(1).round(6) == 1).all()
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c", "cohort.json", "summary.csv"]
    assert sorted(p.name for p in (out / "b").iterdir()) == ["status.json"]  # nothing half written for b
    html = sd.report.render(out)  # the cohort report: status counts, per-slide table, the failure and its reason
    assert "cohort prediction" in html and "Slides that failed" in html and "the file is truncated" in html


def test_every_slide_failing_is_exit_2(tmp_path, slide_bundle):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "x.svs").write_bytes(b"junk")
    (d / "y.jpg").write_bytes(b"")
    r = _cli("predict", str(d), "-m", str(slide_bundle), "-o", str(tmp_path / "out"), "-q", tiny=True)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: every slide failed (2)"), r.stderr
    assert (tmp_path / "out" / "summary.csv").is_file()


def test_csv_cohort_in_shards_then_merge(cohort, slide_bundle, tmp_path):
    table = tmp_path / "cohort.csv"
    pd.DataFrame({"path": [str(cohort / "a.tif"), "slides/c.tif", str(cohort / "b.tif")],
                  "slide_id": ["P1-a", "P2-c", "P1-b"], "patient": ["P1", "P2", "P1"], "mpp": [1.0, None, 1.0]}
                 ).to_csv(table, index=False)
    (tmp_path / "slides").symlink_to(cohort)  # "slides/c.tif" is relative to the CSV's folder
    out = tmp_path / "run"
    first = sd.slide.predict_cohort(table, slide_bundle, out, shard="0/2", quiet=True)  # P1-a, P2-c (ids sorted)
    assert first.ok == ["P1-a", "P2-c"] and first.failed == {}
    s = pd.read_csv(out / "summary.csv")
    assert list(s["slide_id"]) == ["P1-a", "P1-b", "P2-c"] and list(s["status"]) == ["ok", "pending", "ok"]
    second = sd.slide.predict_cohort(table, slide_bundle, out, shard=(1, 2), quiet=True)
    assert second.ok == [] and list(second.failed) == ["P1-b"]
    merged = sd.slide.predict_cohort(table, slide_bundle, out, merge_only=True)
    s = pd.read_csv(merged.summary)
    assert list(s["status"]) == ["ok", "error", "ok"] and list(s["patient"]) == ["P1", "P1", "P2"]
    assert (out / "P2-c" / "P2-c.geojson").is_file()


def test_cohort_inputs_are_checked_before_any_slide(cohort, slide_bundle, tmp_path, monkeypatch):
    with pytest.raises(StdistillError, match="needs a 'path' column"):
        pd.DataFrame({"file": ["a.tif"]}).to_csv(tmp_path / "t.csv", index=False)
        sd.slide.predict_cohort(tmp_path / "t.csv", slide_bundle, tmp_path / "o")
    with pytest.raises(StdistillError, match="occur more than once"):
        pd.DataFrame({"path": ["a.tif", "b.tif"], "slide_id": ["s", "s"]}).to_csv(tmp_path / "d.csv", index=False)
        sd.slide.predict_cohort(tmp_path / "d.csv", slide_bundle, tmp_path / "o")
    for bad in ("3/2", "1/0", "a/b", "-1/4"):
        with pytest.raises(StdistillError, match="--shard must be i/n"):
            sd.slide.predict_cohort(cohort, slide_bundle, tmp_path / "o", shard=bad)
    assert not (tmp_path / "o").exists()


def test_an_unexpected_failure_is_isolated(cohort, slide_bundle, tmp_path, monkeypatch):
    """A bug (not a bad input) in one slide is recorded with its traceback; the others run."""
    import stdistill.slide._run as run

    real = run.predict_slide

    def flaky(slide, *a, **kw):
        if Path(slide).stem == "a":
            raise RuntimeError("boom")
        return real(slide, *a, **kw)

    monkeypatch.setattr(run, "predict_slide", flaky)
    r = sd.slide.predict_cohort(cohort, slide_bundle, tmp_path / "o", quiet=True)
    assert r.ok == ["c"] and r.failed["a"].startswith("RuntimeError: boom") and "b" in r.failed
    assert "RuntimeError: boom" in (tmp_path / "o" / "a" / "error.txt").read_text()
