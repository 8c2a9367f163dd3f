import io

import pytest
import scipy.sparse as sp
from _io_helpers import legacy_st
from rich.console import Console

from stdistill import StdistillError
from stdistill.io import load_any, read_legacy_st, summarise, write_h5ad


def _section(tmp_path, name="S1", image=True, **kw):
    d = tmp_path / name
    d.mkdir()
    a = read_legacy_st(**legacy_st(d, image=image), microns_per_pixel=2.0, section=name, patient="P1", **kw)
    return a


def test_summarise_counts_spots_inside_the_image(tmp_path):
    a = _section(tmp_path)
    a.obs["pathology"] = ["tumour", None, "stroma", None]
    buf = io.StringIO()
    df = summarise(a, console=Console(file=buf, width=200))
    row = df.iloc[0]
    assert (row.section, row.patient, row.spots, row.genes) == ("S1", "P1", 4, 3)
    assert row.microns_per_pixel == 2.0 and row.image_px == "64 x 48"
    assert row.spots_inside == 4 and row.fraction_inside == 1.0
    assert row.labels == "pathology (2)"
    out = buf.getvalue()
    assert "S1" in out and "64 x 48" in out and "100%" in out


def test_summarise_a_section_without_image(tmp_path):
    a = _section(tmp_path, image=False)
    buf = io.StringIO()
    df = summarise(a, console=Console(file=buf, width=200))
    assert df.iloc[0].image_px is None and df.iloc[0].spots_inside == 0
    assert "no image" in buf.getvalue()


def test_spots_without_counts_are_not_counted_inside(tmp_path):
    a = _section(tmp_path)
    X = a.X.toarray()
    X[1, :] = 0
    a.X = sp.csr_matrix(X)
    df = summarise(a, console=Console(file=io.StringIO()))
    assert df.iloc[0].spots_inside == 3 and df.iloc[0].fraction_inside == pytest.approx(0.75)


def test_load_any_reads_h5ad_and_visium(tmp_path, visium_dir):
    path = write_h5ad(_section(tmp_path), tmp_path / "s.h5ad")
    assert load_any(path).n_obs == 4
    assert load_any(visium_dir).shape == (100, 100)


def test_load_any_refuses_unknown_input(tmp_path):
    with pytest.raises(StdistillError, match="not a dataset name"):
        load_any("no-such-dataset")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(StdistillError, match="not an .h5ad file"):
        load_any(tmp_path / "x.csv")


def test_cli_info_prints_the_table(tmp_path):
    from typer.testing import CliRunner

    from stdistill.cli import app

    path = write_h5ad(_section(tmp_path), tmp_path / "s.h5ad")
    res = CliRunner().invoke(app, ["info", str(path)])
    assert res.exit_code == 0, res.output
    assert "S1" in res.output and "64 x 48" in res.output
    assert "um/px" in res.output and "spots with counts+image" in res.output
