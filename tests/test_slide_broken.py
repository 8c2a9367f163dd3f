"""Slides a real archive holds, through ``stdistill predict``: each broken kind is one line naming
the slide and what is wrong, exit 2, and nothing written; what can be converted is converted; a
few damaged tiles in a readable slide are skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _cli_helpers import _cli, run_main
from _slide_helpers import corrupt_tiles, he_image, truncate, write_pyramid

import stdistill as sd
from stdistill import StdistillError
from stdistill.io._image import open_image

pytest.importorskip("tiffslide")
pytestmark = pytest.mark.usefixtures("tiny_encoders")


def _refused(argv, capsys, monkeypatch, out: Path, expect: str) -> None:
    code, err = run_main(argv, capsys, monkeypatch)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists() or (out.is_file() and not list(out.parent.glob(f".{out.name}*"))), "half-written output"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("good") / "good.tif", he_image(), mpp=1.0)


def test_truncated_pyramid_is_one_line_without_library_noise(slide_bundle, tmp_path):
    """An interrupted copy (JPEG tiles, half the bytes): one line in a real process, no traceback,
    no asyncio or tifffile messages, even at exit."""
    path = sd.io.write_pyramid_tiff(tmp_path / "cut.tif", he_image(1600, 1200), 1.0, tile=128, compression="jpeg")
    truncate(path)
    r = _cli("predict", str(path), "-m", str(slide_bundle), "-o", str(tmp_path / "out"), "-q", tiny=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {path}: the file is truncated") and "interrupted copy" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["garbage", "empty", "text_jpeg", "truncated_jpeg", "directory_suffix"])
def test_unreadable_files_are_one_line(case, slide_bundle, tmp_path, capsys, monkeypatch):
    name, content, expect = {
        "garbage": ("scan.svs", b"hello, not a slide", "not a .svs slide"),
        "empty": ("scan.tif", b"", "the file is empty"),
        "text_jpeg": ("scan.jpg", b"<html>404</html>", "image is unreadable"),
        "truncated_jpeg": ("scan.jpg", None, "truncated"),
        "directory_suffix": ("scan.ndpi", None, "directory"),
    }[case]
    path = tmp_path / name
    if case == "truncated_jpeg":
        from PIL import Image

        Image.fromarray(he_image()).save(path, quality=90)
        truncate(path)
    elif case == "directory_suffix":
        path.mkdir()
    else:
        path.write_bytes(content)
    if case == "directory_suffix":  # a folder is a cohort: refused because it holds no slides
        expect = "no slide images here"
    _refused(["predict", str(path), "-m", str(slide_bundle), "-o", str(tmp_path / "out"), "--mpp", "1"], capsys,
             monkeypatch, tmp_path / "out", expect)


def test_unreadable_permissions_are_one_line(good, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(StdistillError, match="no permission to read the file"):
        open_image(good)


@pytest.mark.parametrize("mpp, expect", [
    ("50", "--mpp gives 50 um per pixel, implausible"),       # a typo of 0.50
    ("0.02", "--mpp gives 0.02 um per pixel, implausible"),
    ("5", "a 32 um tile is 6.4 px, under 16 px"),              # tiles under 16 px
    ("-1", "--mpp must be a positive number of micrometres per pixel, got -1"),
    ("0", "--mpp must be a positive number"),
    ("nan", "--mpp must be a positive number of micrometres per pixel, got nan"),
])
def test_implausible_or_impossible_mpp(mpp, expect, good, slide_bundle, tmp_path, capsys, monkeypatch):
    _refused(["predict", str(good), "-m", str(slide_bundle), "-o", str(tmp_path / "out"), "--mpp", mpp], capsys,
             monkeypatch, tmp_path / "out", expect)


def test_force_accepts_an_unusual_scale():
    from stdistill.io._image import ArrayImage
    from stdistill.slide._inputs import SlideSource, check_scale

    src = SlideSource(ArrayImage(he_image()), "s", None, 12.0)  # the metadata says 12 um/px
    with pytest.raises(StdistillError, match="the slide's metadata gives 12 um per pixel"):
        check_scale(src, None, 32.0, force=False)
    assert check_scale(src, None, 32.0, force=True) == 12.0
    assert check_scale(src, 0.5, 32.0, force=False) == 0.5  # --mpp wins over the metadata
    with pytest.raises(StdistillError, match="must be a positive number"):
        check_scale(src, -1.0, 32.0, force=True)  # --force never accepts a negative scale


def test_existing_file_as_out(good, slide_bundle, tmp_path, capsys, monkeypatch):
    out = tmp_path / "taken.txt"
    out.write_text("mine")
    _refused(["predict", str(good), "-m", str(slide_bundle), "-o", str(out)], capsys, monkeypatch, out,
             "--out is an existing file")
    assert out.read_text() == "mine"


def test_empty_slide_and_too_small_slide(slide_bundle, tmp_path, capsys, monkeypatch):
    blank = write_pyramid(tmp_path / "blank.tif", np.full((400, 500, 3), 244, np.uint8), mpp=1.0)
    _refused(["predict", str(blank), "-m", str(slide_bundle), "-o", str(tmp_path / "o1")], capsys, monkeypatch,
             tmp_path / "o1", "no tissue found")
    tiny = write_pyramid(tmp_path / "tiny.tif", he_image()[:20, :20].copy(), mpp=1.0, levels=1)
    _refused(["predict", str(tiny), "-m", str(slide_bundle), "-o", str(tmp_path / "o2")], capsys, monkeypatch,
             tmp_path / "o2", "smaller than one 32 um tile")


def _tiff(path: Path, data: np.ndarray, **kw) -> Path:
    import tifffile

    tifffile.imwrite(path, data, resolution=(1e4, 1e4), resolutionunit="CENTIMETER", **kw)
    return path


def test_other_bit_depths_and_modes_are_converted(tmp_path):
    """16-bit, RGBA (onto white), CMYK and palette TIFFs read as the same 8-bit RGB pixels."""
    img = he_image(256, 192)
    alpha = np.full(img.shape[:2], 255, np.uint8)
    alpha[:, :10] = 0  # transparent: white, like glass
    grey_map = np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))
    cases = {
        "rgb16": (_tiff(tmp_path / "rgb16.tif", img.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64)), img),
        "rgba": (_tiff(tmp_path / "rgba.tif", np.dstack([img, alpha]), photometric="rgb", extrasamples=["unassalpha"]),
                 np.where(alpha[..., None] == 0, 255, img)),
        "cmyk": (_tiff(tmp_path / "cmyk.tif", np.dstack([255 - img, np.zeros_like(alpha)]), photometric="separated"),
                 img),
        "palette": (_tiff(tmp_path / "pal.tif", img[..., 0], photometric="palette", colormap=grey_map),
                    np.repeat(img[..., :1], 3, axis=2)),
    }
    for kind, (path, want) in cases.items():
        r = open_image(path)
        assert r.layout.kind == kind
        np.testing.assert_allclose(r.read_region(0, 0, 256, 192).astype(int), want.astype(int), atol=1, err_msg=kind)
        thumb, scale = r.thumbnail(128)
        assert thumb.dtype == np.uint8 and thumb.shape == (96, 128, 3) and scale == 0.5, kind


def test_sixteen_bit_slide_through_the_legacy_st_reader(tmp_path):
    import pandas as pd

    img = he_image(400, 300)
    path = _tiff(tmp_path / "he16.tif", img.astype(np.uint16) * 257, photometric="rgb")
    xy = [(x, y) for x in range(3) for y in range(2)]
    counts = pd.DataFrame(np.ones((6, 2), int), index=[f"{x}x{y}" for x, y in xy], columns=["G1", "G2"])
    counts.to_csv(tmp_path / "c.tsv", sep="\t")
    pd.DataFrame({"x": [x for x, _ in xy], "y": [y for _, y in xy], "pixel_x": [100 + 60 * x for x, _ in xy],
                  "pixel_y": [100 + 60 * y for _, y in xy]}).to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    a = sd.io.read_legacy_st(tmp_path / "c.tsv", tmp_path / "s.tsv", image=path, microns_per_pixel=1.0, section="S",
                             patient="P", cache_dir=tmp_path / "cache")
    patch = sd.io.image(a).read_region(100, 100, 20, 20)
    np.testing.assert_array_equal(patch, img[100:120, 100:120])


@pytest.mark.parametrize("mode, expect", [("L", "greyscale image (mode L)"), ("I;16", "greyscale image (mode I;16)")])
def test_greyscale_is_refused(mode, expect, tmp_path):
    from PIL import Image

    Image.fromarray(he_image()[..., 0].astype(np.uint16 if mode == "I;16" else np.uint8)).save(tmp_path / "g.png")
    with pytest.raises(StdistillError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        open_image(tmp_path / "g.png")
    _tiff(tmp_path / "g.tif", he_image()[..., 0], photometric="minisblack")
    with pytest.raises(StdistillError, match="greyscale image"):
        open_image(tmp_path / "g.tif")
    _tiff(tmp_path / "f.tif", he_image().astype(np.float32) / 255, photometric="rgb")
    with pytest.raises(StdistillError, match="floating-point samples"):
        open_image(tmp_path / "f.tif")


def test_png_palette_and_rgba_are_converted(tmp_path):
    from PIL import Image

    img = he_image(200, 150)
    Image.fromarray(img).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "p.png")
    Image.fromarray(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])).save(tmp_path / "a.png")
    for name in ("p.png", "a.png"):
        arr = open_image(tmp_path / name).read_region(0, 0, 200, 150)
        assert arr.shape == (150, 200, 3) and np.abs(arr.astype(int) - img).mean() < 8, name


def test_a_few_damaged_tiles_are_skipped_and_counted(slide_bundle, tmp_path):
    """Two JPEG tiles of level 0 zeroed: the tissue tiles over them are skipped, counted in
    run.json, the .h5ad and the report; every other tissue tile is predicted."""
    import anndata as ad

    path = sd.io.write_pyramid_tiff(tmp_path / "damaged.tif", he_image(2200, 900, seed=4), 0.5, compression="jpeg")
    grid = sd.pp.tile(path, size_um=32, px=32, section="damaged")  # tissue is found on level 1, which is intact
    corrupt_tiles(path, [(3, 9), (4, 13)])
    r = sd.slide.predict_slide(path, slide_bundle, tmp_path / "out", quiet=True)
    assert 0 < r.n_unreadable < 0.1 * grid.n_obs and r.n_tiles + r.n_unreadable == grid.n_obs
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    a = ad.read_h5ad(tmp_path / "out" / "damaged.h5ad")
    skipped = run["result"]["unreadable_tiles"]
    assert skipped["n"] == r.n_unreadable == a.uns["predict"]["unreadable_tiles"]["n"]
    assert set(skipped["ids"]) == set(a.uns["predict"]["unreadable_tiles"]["ids"])
    assert set(skipped["ids"]) | set(a.obs_names) == set(grid.obs_names) and not set(skipped["ids"]) & set(a.obs_names)
    assert np.isfinite(a.obsm["niche_pred_probs"]).all()
    assert f"{r.n_unreadable} tissue tiles could not be decoded" in sd.report.render(tmp_path / "out")
    corrupt_tiles(path, [(r_, c) for r_ in range(7) for c in range(17)])  # all of level 0
    with pytest.raises(StdistillError, match="the file is damaged"):
        sd.slide.predict_slide(path, slide_bundle, tmp_path / "out2", quiet=True)
    assert not (tmp_path / "out2").exists()
