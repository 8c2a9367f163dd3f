"""One test per bad input: each reader refuses it with one StdistillError line naming the file."""

import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
from _io_helpers import hest_folder, legacy_st

from stdistill import StdistillError
from stdistill.io import read_h5ad, read_hest, read_legacy_st, write_h5ad


def _refused(match, fn, *args, names=None, **kwargs):
    with pytest.raises(StdistillError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    problem = msg[len(info.value.path) + 2 :] if info.value.path else msg  # not the (test-named) path
    assert re.search(match, problem), problem
    if names is not None:
        assert str(names) in msg
    return msg


def _read(f, **kw):
    kw.setdefault("microns_per_pixel", 1.0)
    return read_legacy_st(**f, section="S", patient="P", **kw)


def test_image_missing(tmp_path):
    f = legacy_st(tmp_path)
    f["image"] = tmp_path / "nope.jpg"
    _refused("does not exist", _read, f, names=f["image"])


def test_image_unreadable(tmp_path):
    f = legacy_st(tmp_path)
    f["image"].write_bytes(b"this is not a PNG")
    _refused("unreadable", _read, f, names=f["image"])


def test_spot_coordinates_outside_the_image(tmp_path):
    f = legacy_st(tmp_path)
    # 10x scale puts spots at x up to 250 px in a 64 px wide image
    _refused("outside the 64x48 px image", _read, f, scale=10.0, names=f["image"])


def test_spots_with_counts_but_no_position(tmp_path):
    f = legacy_st(tmp_path, ids=["1x1", "2x1", "1x2", "9x9"])
    _refused("1 spots have counts but no position", _read, f, names=f["counts"])


def test_positions_without_counts(tmp_path):
    f = legacy_st(tmp_path, counts=np.array([[1, 0, 3], [0, 2, 0], [5, 1, 0]]), ids=["1x1", "2x1", "1x2"])
    _refused("1 spots have a position but no counts", _read, f, names=f["spots"])


def test_negative_counts(tmp_path):
    f = legacy_st(tmp_path, counts=np.array([[1, 0, 3], [0, -2, 0], [5, 1, 0], [0, 0, 7]]))
    _refused("negative", _read, f, names=f["counts"])


def test_nan_counts(tmp_path):
    f = legacy_st(tmp_path, counts=np.array([[1, 0, 3], [0, np.nan, 0], [5, 1, 0], [0, 0, 7]]))
    _refused("NaN", _read, f, names=f["counts"])


def test_non_integer_counts(tmp_path):
    f = legacy_st(tmp_path, counts=np.array([[1, 0, 3], [0, 0.5, 0], [5, 1, 0], [0, 0, 7]]))
    _refused("not integers", _read, f, names=f["counts"])


def test_duplicate_spot_ids(tmp_path):
    f = legacy_st(tmp_path, ids=["1x1", "2x1", "1x2", "1x2"])
    _refused("duplicate spot ids", _read, f, names=f["counts"])


def test_missing_microns_per_pixel_says_how_to_pass_it(tmp_path):
    f = legacy_st(tmp_path)
    msg = _refused("microns per pixel is missing", _read, f, microns_per_pixel=None, names=f["spots"])
    assert "microns_per_pixel=" in msg and "'pitch'" in msg


def test_missing_microns_per_pixel_in_hest_metadata(tmp_path):
    root = hest_folder(tmp_path, meta={"patient": "P1"})
    msg = _refused("microns per pixel is missing", read_hest, "TENX1", root, names="TENX1.json")
    assert "microns_per_pixel=" in msg


def test_empty_section(tmp_path):
    f = legacy_st(
        tmp_path,
        counts=np.zeros((0, 3)),
        ids=[],
        positions={"x": [], "y": [], "pixel_x": [], "pixel_y": [], "selected": []},
    )
    _refused("section is empty", _read, f, names=f["counts"])


def test_hest_whole_slide_image_missing(tmp_path):
    root = hest_folder(tmp_path, wsi=False)
    _refused("does not exist", read_hest, "TENX1", root, names="TENX1.tif")


def test_h5ad_with_negative_counts(tmp_path):
    f = legacy_st(tmp_path)
    a = _read(f)
    path = write_h5ad(a, tmp_path / "ok.h5ad")
    b = ad.read_h5ad(path)
    b.X = b.X.astype(np.float32)
    b.X.data[0] = -1
    b.write_h5ad(tmp_path / "neg.h5ad")
    _refused("negative", read_h5ad, tmp_path / "neg.h5ad", names=tmp_path / "neg.h5ad")


def test_write_h5ad_leaves_no_file_when_writing_fails(tmp_path, monkeypatch):
    a = _read(legacy_st(tmp_path))
    target = tmp_path / "out.h5ad"

    def broken(self, filename, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    _refused("could not write .*disk full", write_h5ad, a, target, names=target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if "out.h5ad" in p.name] == []


def test_cli_info_on_a_bad_file_prints_one_error_line(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"not hdf5 at all")
    res = subprocess.run(
        [sys.executable, "-c", "from stdistill.cli import main; main()", "info", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.h5ad" in lines[0]
    assert "Traceback" not in res.stdout + res.stderr


@pytest.mark.parametrize("reader", ["h5ad", "hest"])
def test_counts_file_not_h5ad(tmp_path, reader):
    if reader == "h5ad":
        bad = tmp_path / "x.h5ad"
        bad.write_text("not hdf5")
        _refused(r"\.h5ad file is unreadable", read_h5ad, bad, names=bad)
    else:
        root = hest_folder(tmp_path)
        bad = root / "st" / "TENX1.h5ad"
        bad.write_text("not hdf5")
        _refused("HEST counts file is unreadable", read_hest, "TENX1", root, names=bad)
