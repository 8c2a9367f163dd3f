"""The HER2ST tutorial (docs/tutorials/her2st.md) runs as written, on a small part of the data.

Every ``bash`` block of the page is run in order by bash, as a user would paste it, against a
copy of HER2ST cut down to about 30 spots per imaged section (B4's and C2-C5's JPEGs cropped
around them, coordinates shifted to match) with one change to the commands: the student trains
for 2 epochs. Then each step's output is checked, and the page's figure script is run on them.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, SHARED_DATA

PAGE = REPO / "docs" / "tutorials" / "her2st.md"
FIGURES = REPO / "docs" / "tutorials" / "her2st_figures.py"
SPOTS_PER_SECTION = 20
MARGIN_PX = 200
#: the only edits made to the page's commands (each must match exactly once, so a changed page fails here)
EDITS = {"--train-patients A,C": "--train-patients A,C --max-epochs 2"}
STDISTILL = ('stdistill() { "$STDISTILL_PYTHON" -c \'import sys; from stdistill.cli import main; '
             'sys.argv[0] = "stdistill"; main()\' "$@"; }\n')


def bash_blocks(text: str) -> list[str]:
    """The ``bash`` fenced blocks of a Markdown page, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def tutorial_script(data_parent: Path, edits: dict[str, str] = EDITS) -> str:
    """The page's commands as one bash script, ``STDISTILL_DATA`` pointed at ``data_parent``."""
    script = "\n".join(bash_blocks(PAGE.read_text()))
    script, n = re.subn(r"^export STDISTILL_DATA=.*$", f"export STDISTILL_DATA={data_parent}", script, flags=re.M)
    assert n == 1, "the page should set STDISTILL_DATA once"
    for old, new in edits.items():
        assert script.count(old) == 1, f"the page's commands no longer contain {old!r} once"
        script = script.replace(old, new)
    return script


def _her2st_source() -> Path:
    env = os.environ.get("STDISTILL_DATA")
    for p in ([Path(env).expanduser() / "her2st"] if env else []) + [SHARED_DATA / "her2st"]:
        if (p / "data" / "ST-cnts").is_dir():
            return p
    pytest.skip(f"no HER2ST copy: neither $STDISTILL_DATA/her2st nor {SHARED_DATA / 'her2st'} exists "
                "(this test runs the tutorial on the public HER2ST files)")


def _link(src: Path, dst: Path) -> None:
    if src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(src)


def _cut_section(src: Path, dst: Path, section: str, image: Path | None) -> None:
    """``SPOTS_PER_SECTION`` neighbouring spots around the section's middle; a JPEG cropped around
    them with ``pixel_x``/``pixel_y`` shifted into the crop."""
    from PIL import Image

    spots = pd.read_csv(src / f"data/ST-spotfiles/{section}_selection.tsv", sep="\t")
    counts = pd.read_csv(src / f"data/ST-cnts/{section}.tsv.gz", sep="\t", index_col=0)
    spots = spots[(spots["selected"] == 1) & (spots["x"].astype(str) + "x" + spots["y"].astype(str)).isin(counts.index)]
    xy = spots[["x", "y"]].to_numpy(float)
    centre = xy[np.argmin(np.abs(xy - np.median(xy, 0)).sum(1))]
    spots = spots.iloc[np.argsort(np.hypot(*(xy - centre).T), kind="stable")[:SPOTS_PER_SECTION]].copy()
    if image is not None and image.suffix.lower() == ".jpg":
        x0 = max(int(spots["pixel_x"].min()) - MARGIN_PX, 0)
        y0 = max(int(spots["pixel_y"].min()) - MARGIN_PX, 0)
        x1, y1 = int(spots["pixel_x"].max()) + MARGIN_PX, int(spots["pixel_y"].max()) + MARGIN_PX
        out = dst / image.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(image) as im:
            im.crop((x0, y0, x1, y1)).save(out, quality=90)
        spots["pixel_x"] -= x0
        spots["pixel_y"] -= y0
    elif image is not None:
        _link(image, dst / image.relative_to(src))
    (dst / "data/ST-spotfiles").mkdir(parents=True, exist_ok=True)
    spots.to_csv(dst / f"data/ST-spotfiles/{section}_selection.tsv", sep="\t", index=False)
    ids = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    (dst / "data/ST-cnts").mkdir(parents=True, exist_ok=True)
    with gzip.open(dst / f"data/ST-cnts/{section}.tsv.gz", "wt") as f:
        counts.loc[ids.to_numpy()].to_csv(f, sep="\t")


def small_her2st(src: Path, dst: Path) -> None:
    """A HER2ST copy in the repository's layout holding only the imaged sections, cut down."""
    jpgs = {p.parent.name: p for p in sorted((src / "data/ST-imgs").glob("*/*/*.jpg"))}
    pngs = {s: src / f"app/www/imgs/{s}_HE_image_dark.png" for s in ("A1", "A2")}
    images = {**{s: p for s, p in pngs.items() if p.is_file()}, **jpgs}
    assert {"A", "B", "C"} <= {s[0] for s in images}, f"expected imaged sections of patients A, B, C in {src}"
    for section, image in sorted(images.items()):
        _cut_section(src, dst, section, image)
    for rel in ("res/ST-deconv/props/major.zip", "res/ST-cluster/lbl/A2-cluster-annotation.tsv.gz",
                "data/ST-pat/lbl/A1_labeled_coordinates.tsv"):
        _link(src / rel, dst / rel)


@pytest.fixture(scope="module")
def tutorial_run(tmp_path_factory):
    src = _her2st_source()
    tmp = tmp_path_factory.mktemp("tutorial")
    small_her2st(src, tmp / "data" / "her2st")
    work = tmp / "work"
    work.mkdir()
    env = {**os.environ, "STDISTILL_PYTHON": sys.executable, "STDISTILL_CACHE": str(tmp / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "STDISTILL_PROGRESS": "0", "MPLBACKEND": "Agg",
           "COLUMNS": "200"}
    script = "set -euo pipefail\n" + STDISTILL + tutorial_script(tmp / "data")
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the tutorial's commands failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return work / "stdistill_out" / "her2st", r.stdout


def test_features_and_info(tutorial_run):
    import anndata as ad

    run, stdout = tutorial_run
    a = ad.read_h5ad(run / "features.h5ad")
    assert "X_effnet-lite0-imagenet" in a.obsm and np.isfinite(a.obsm["X_effnet-lite0-imagenet"]).all()
    assert {"A", "B", "C"} <= set(a.obs["patient"].astype(str))
    # the --mpp the page passes for B4's JPEG is what `stdistill info` prints for B4
    mpp = float(re.search(r"--mpp ([0-9.]+)", PAGE.read_text()).group(1))
    row = next(line for line in stdout.splitlines() if re.search(r"\bB4\b", line) and "B " in line)
    printed = [float(v) for v in re.findall(r"\b\d\.\d{3}\b", row)]
    assert any(abs(v - mpp) < 0.005 for v in printed), (mpp, row)


def test_teacher_writes_niches(tutorial_run):
    import anndata as ad

    from stdistill.keys import Key

    run, _ = tutorial_run
    a = ad.read_h5ad(run / "niches.h5ad")
    probs = np.asarray(a.obsm[Key.obsm.niche_probs])
    assert Key.obs.niche in a.obs and probs.shape == (a.n_obs, 4)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert "NMI(niche, patient)" in (run / "teacher.txt").read_text()


def test_student_bundle_trained_on_two_patients(tutorial_run):
    run, _ = tutorial_run
    cfg = json.loads((run / "student" / "config.json").read_text())
    assert (run / "student" / "model.safetensors").stat().st_size > 0
    assert cfg["bundle"]["training"]["train_patients"] == ["A", "C"]
    assert len(cfg["bundle"]["outputs"]["niches"]) == 4


def test_predict_report_and_geojson(tutorial_run):
    import anndata as ad

    run, _ = tutorial_run
    out = run / "B4"
    tiles = ad.read_h5ad(out / "BT10737_D2_HE.h5ad")
    assert tiles.n_obs > 0 and tiles.n_vars == 0  # H&E only: no counts went in
    assert set(tiles.obs["niche_pred"].astype(str)) <= {"0", "1", "2", "3"}
    gj = json.loads((out / "BT10737_D2_HE.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == tiles.n_obs
    f = gj["features"][0]
    assert f["geometry"]["type"] == "Polygon" and f["properties"]["classification"]["name"].startswith("niche ")
    assert len(f["properties"]["measurements"]) == 4
    assert (out / "maps" / "niches.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "BT10737_D2_HE" in html and "<img" in html


def test_figure_script_on_the_run(tutorial_run, tmp_path):
    sys.path.insert(0, str(FIGURES.parent))
    try:
        import her2st_figures
    finally:
        sys.path.remove(str(FIGURES.parent))
    run, _ = tutorial_run
    summary = her2st_figures.main([str(run), "--figures", str(tmp_path), "--text", str(tmp_path / "run.txt")])
    for name in ("teacher", "predict_map", "b4", "geojson"):
        assert (tmp_path / f"tutorial_her2st_{name}.png").stat().st_size > 1000, name
    assert 0 < summary["covered"] <= summary["spots"] and 0 <= summary["agree"] <= 1
    assert "# end agreement" in (tmp_path / "run.txt").read_text()


def test_page_figures_and_quotes_exist():
    """Every figure the page shows is committed, and the printout it quotes has its markers."""
    text = PAGE.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(figures) == 4
    for f in figures:
        assert (PAGE.parent / f).is_file(), f
    assert f"{SPOTS_PER_SECTION} neighbouring spots" in text, "the page should say how this test cuts the data"
    quoted = (PAGE.parent / "her2st_run.txt").read_text()
    for marker in re.findall(r':(?:start-after|end-before): "([^"]+)"', text):
        assert marker in quoted, marker
