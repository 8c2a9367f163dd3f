"""``stdistill report``: a self-contained HTML page for a predict folder and a benchmark folder,
loaded in headless Chromium (no console errors, figures drawn); skipped where chromium is absent."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from _cli_helpers import _cli

import stdistill as sd
from stdistill import StdistillError

pytest.importorskip("jinja2")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
#: Reports a broken (not embedded, undecodable) image as a console error once the page has loaded.
PROBE = ("<script>window.addEventListener('load', () => { for (const i of document.images) "
         "{ if (!i.complete || i.naturalWidth === 0) console.error('broken image ' + i.alt); } });</script>")


def _predict_folder(out: Path) -> Path:
    """A real ``predict_slide`` output layout (tiling, maps, h5ad, GeoJSON, run.json) with made-up
    predictions from a bundle-like record, so no model is trained here."""
    from _slide_helpers import he_image
    from PIL import Image

    from stdistill.slide._export import write_outputs
    from stdistill.slide._chunks import write_manifest

    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.parent / "slide.png"
    Image.fromarray(he_image(384, 288)).save(png)
    tiles = sd.pp.tile(png, size_um=32.0, px=32, microns_per_pixel=1.0, section="slide")
    rng = np.random.default_rng(0)
    record = {"recipe": "niches", "stdistill_version": sd.__version__, "encoder": {"name": "uni", "weights_digest": "ab" * 8},
              "patch": {"size_um": 32.0, "px": 32}, "precision": "fp32", "feature_norm": "section",
              "outputs": {"niches": ["0: ERBB2/KRT19", "1: COL1A1/LUM"], "genes": ["ERBB2", "KRT19"]},
              "training": {"train_patients": ["A"], "train_sections": ["A1"], "n_train_spots": 300}}
    bundle = SimpleNamespace(outputs=record["outputs"], encoder="uni", record=record, path=out.parent / "bundle")
    outputs = {"niches": rng.dirichlet([1, 1], tiles.n_obs), "genes": rng.normal(1, 0.5, (tiles.n_obs, 2))}
    write_manifest(out, {"slide": str(png), "mpp": 1.0, "min_tissue": 0.5, "n_tiles": int(tiles.n_obs), "recipe": "niches"},
              False, about={"command": "stdistill predict slide.png --model bundle --out out --mpp 1",
                            "versions": {"stdistill": sd.__version__}})
    write_outputs(tiles, bundle, outputs, out, "slide")
    return out


def _bench_folder(out: Path) -> Path:
    """A benchmark folder: results.csv (method x fold x seed), table.md and one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True)
    rows = [{"method": m, "fold": f, "seed": s, "pearson": base + 0.01 * f + 0.001 * s, "encoder": "h-optimus-0"}
            for m, base in (("ridge", 0.2), ("student", 0.3)) for f in range(3) for s in range(2)]
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "table.md").write_text("Pearson r per fold:\n\n| method | A | B |\n|---|---|---|\n| ridge | 0.2 | 0.21 |\n")
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(["ridge", "student"], [0.2, 0.3], color=["tab:orange", "tab:blue"])
    fig.savefig(out / "bars.png", dpi=80)
    plt.close(fig)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report")
    return {"predict": _predict_folder(root / "pred" / "out"), "bench": _bench_folder(root / "bench")}


def test_predict_report_is_self_contained(folders):
    path = sd.report.write_report(folders["predict"])
    html = path.read_text()
    assert path == folders["predict"] / "report.html"
    assert "stdistill predict slide.png --model bundle" in html  # the command
    assert "CC-BY-NC-ND-4.0" in html and 'class="restricted"' in html  # UNI's licence, flagged
    assert "niche 0: ERBB2/KRT19" in html and " +- " in html  # niches with spreads
    assert "Predicted genes" in html and "ERBB2" in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)  # niches + 2 genes
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing loaded from outside the file
    assert not list(folders["predict"].glob(".report.html.*"))  # temp file renamed away


def test_benchmark_report_summarises_results(folders):
    html = sd.report.render(folders["bench"])
    res = pd.read_csv(folders["bench"] / "results.csv")
    x = res.loc[res["method"] == "student", "pearson"]
    assert f"{x.mean():.4g} +- {x.std(ddof=1):.3g}" in html  # mean +- sd over folds and seeds
    assert "spread over fold, seed" in html
    assert "Pearson r per fold:" in html and "Apache-2.0" in html  # table.md and the encoder's licence
    assert html.count("data:image/png;base64,") == 1


def test_report_shows_any_run_folders_tables(tmp_path):
    pd.DataFrame({"K": [4, 6], "student_ari": [0.41, 0.38], "kmeans_ari": [0.30, 0.33]}).to_csv(
        tmp_path / "metrics.csv", index=False)  # e.g. a niches evaluate --out-dir
    html = sd.report.write_report(tmp_path).read_text()
    assert "metrics" in html and "student_ari" in html and "0.41" in html


def test_report_refuses_in_one_line(tmp_path):
    with pytest.raises(StdistillError, match="nothing to report") as e:
        sd.report.write_report(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(StdistillError, match="does not exist"):
        sd.report.write_report(tmp_path / "missing")


def test_report_cli(folders, tmp_path):
    out = tmp_path / "r.html"
    r = _cli("report", str(folders["bench"]), "--out", str(out))
    assert r.returncode == 0 and out.is_file(), r.stderr
    r = _cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")


def _chromium(page: Path, shot: Path) -> str:
    """Load ``page`` headless, screenshot it; returns Chromium's console log lines."""
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--enable-logging=stderr",
           "--v=0", f"--user-data-dir={shot.parent / 'profile'}", "--window-size=1000,2400",
           "--virtual-time-budget=5000", f"--screenshot={shot}", page.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    return "\n".join(line for line in r.stderr.splitlines() if ":CONSOLE" in line)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
@pytest.mark.parametrize("kind", ["predict", "bench"])
def test_report_in_headless_chromium(folders, kind, tmp_path):
    from PIL import Image

    html = sd.report.render(folders[kind])
    page = tmp_path / "page.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    shot = tmp_path / "shot.png"
    console = _chromium(page, shot)
    assert console == "", console  # no console errors, no broken images
    hsv = np.asarray(Image.open(shot).convert("HSV"))
    assert hsv.shape[:2] == (2400, 1000) and hsv[..., 2].std() > 10  # not blank
    assert (hsv[..., 1] > 60).mean() > 0.01  # the coloured maps / figures are drawn
