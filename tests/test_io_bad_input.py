"""One test per bad input: each reader refuses it with one StdistillError line naming the file."""

import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
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
    import shutil
    from collections import namedtuple

    a = _read(legacy_st(tmp_path))
    target = tmp_path / "out.h5ad"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 90, 10))
    _refused("could not write .*no space left on device: needs", write_h5ad, a, target, names=target)
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


# --- classes from issue 13 -------------------------------------------------------------------


def test_duplicate_gene_names_are_made_unique_with_a_warning_naming_them(tmp_path):
    from stdistill.io._section import DuplicateGenesWarning

    f = legacy_st(tmp_path)
    df = pd.read_csv(f["counts"], sep="\t", index_col=0)
    df.columns = ["GENEA", "GENEB", "GENEA"]
    df.to_csv(f["counts"], sep="\t")
    with pytest.warns(DuplicateGenesWarning, match=r"1 gene names occur more than once \(GENEA\)"):
        a = _read(f)
    assert list(a.var_names) == ["GENEA", "GENEB", "GENEA-1"]  # not pandas' silent "GENEA.1"


def test_comma_separated_counts_say_expected_tab_separated_in_one_short_line(tmp_path):
    f = legacy_st(tmp_path)
    rng = np.random.default_rng(0)
    wide = pd.DataFrame(rng.integers(0, 9, (4, 5000)), index=["1x1", "2x1", "1x2", "2x2"],
                        columns=[f"GENE{i}" for i in range(5000)])
    wide.to_csv(f["counts"], sep=",")
    msg = _refused("expected tab-separated counts .* comma-separated", _read, f, names=f["counts"])
    assert len(msg) < 500


def test_every_message_is_one_capped_line():
    from stdistill._errors import MAX_MESSAGE

    e = StdistillError("x" * 100_000 + "\nsecond line", "/some/file.tsv")
    assert "\n" not in str(e) and len(str(e)) <= MAX_MESSAGE + len("/some/file.tsv: ")
    assert str(e).endswith("...")


def test_nan_spot_coordinates_are_named_as_such(tmp_path):
    pos = {"x": [1, 2, 1, 2], "y": [1, 1, 2, 2], "pixel_x": [15.0, np.nan, 15.0, 25.0],
           "pixel_y": [13.0, 13.0, 23.0, 23.0], "selected": [1, 1, 1, 1]}
    f = legacy_st(tmp_path, positions=pos)
    msg = _refused("1 spots have NaN, empty or non-numeric pixel coordinates", _read, f,
                   microns_per_pixel="pitch", names=f["spots"])
    assert "pitch" not in msg.split(": ", 1)[1]


@pytest.mark.parametrize("mpp", [0.0, -0.5])
def test_non_positive_microns_per_pixel_is_not_called_missing(tmp_path, mpp):
    f = legacy_st(tmp_path)
    msg = _refused(r"microns per pixel is -?0\.\d+; it must be a positive number", _read, f, microns_per_pixel=mpp)
    assert "missing" not in msg and "--mpp" not in msg


def test_missing_microns_per_pixel_points_at_no_nonexistent_flag(tmp_path):
    from stdistill.io import new_section

    msg = _refused("microns per pixel of the full-resolution image is missing", new_section, np.ones((1, 1)),
                   genes=["G"], spots=["s"], xy_px=np.zeros((1, 2)), section="S", patient="P",
                   microns_per_pixel=None, spot_diameter_um=55.0)
    assert "--mpp" not in msg


@pytest.mark.parametrize("which", ["counts", "spots", "h5ad"])
def test_directory_given_for_a_file_is_called_a_directory(tmp_path, which):
    f = legacy_st(tmp_path)
    d = tmp_path / "adir.h5ad"
    d.mkdir()
    if which == "h5ad":
        _refused("expected, but this is a directory", read_h5ad, d, names=d)
    else:
        f[which] = d
        _refused("expected, but this is a directory", _read, f, names=d)


@pytest.mark.parametrize("value", [0, -3.0, "abc"])
def test_visium_spot_diameter_of_zero_is_not_called_absent(visium_dir, tmp_path, value):
    import json
    import shutil

    from stdistill.io import read_visium

    outs = tmp_path / "outs"
    shutil.copytree(visium_dir, outs)
    sf = outs / "spatial" / "scalefactors_json.json"
    j = json.loads(sf.read_text())
    j["spot_diameter_fullres"] = value
    sf.write_text(json.dumps(j))
    msg = _refused("spot_diameter_fullres is .*not a positive number of pixels", read_visium, outs, names=sf)
    assert "missing" not in msg


def test_image_without_recorded_size_still_refuses_spots_outside_it(tmp_path):
    a = _read(legacy_st(tmp_path))
    path = write_h5ad(a, tmp_path / "ok.h5ad")
    b = ad.read_h5ad(path)
    del b.uns["spatial"]["S"]["metadata"]["image_size"]
    b.obsm["spatial"] = b.obsm["spatial"] + 20_000.0
    b.write_h5ad(tmp_path / "far.h5ad")
    _refused("4 spot centres of section 'S' lie outside its 64x48 px image", read_h5ad, tmp_path / "far.h5ad")


def test_info_reads_the_image_size_from_the_header_when_not_recorded(tmp_path):
    from stdistill.io.summary import section_table

    a = _read(legacy_st(tmp_path))
    del a.uns["spatial"]["S"]["metadata"]["image_size"]
    row = section_table(a).iloc[0]
    assert row["image_px"] == "64 x 48" and row["spots_inside"] == 4
