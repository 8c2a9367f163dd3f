"""Cohort readers: TRIDENT/CLAM feature files, clinical and RNA tables, tile AnnData; one-line errors."""

import numpy as np
import pandas as pd
import pytest
import torch
from _survival_helpers import tiny_cohort, write_h5, write_tcga_like

from stdistill import StdistillError
from stdistill.io._section import concat, new_section
from stdistill.recipes import (
    Cohort,
    cohort_from_tiles,
    read_clinical,
    read_cohort,
    read_rna,
)


def test_trident_layout_clinical_and_rna_make_the_same_cohort(tmp_path):
    c = tiny_cohort(n=6)
    f = write_tcga_like(tmp_path, c)
    got = read_cohort(read_clinical(f["clinical"], time_col="OS_MONTHS", event_col="OS_STATUS"), f["features"], f["rna"])
    assert got.patients == c.patients
    np.testing.assert_allclose(got.time, c.time)
    np.testing.assert_array_equal(got.event, c.event)  # "1:DECEASED" / "0:LIVING" -> 1 / 0
    assert got.slide_patient["P03-01Z-00-DX1"] == "P03"  # TCGA slide barcode -> patient by prefix
    np.testing.assert_array_equal(got.bag("P03"), c.bag("P03"))
    assert got.coords["P03-01Z-00-DX1"].shape == (len(c.bag("P03")), 2)
    pd.testing.assert_frame_equal(got.rna, c.rna, check_names=False)  # genes x samples, barcodes -> patients


def test_clam_layout_slide_column_two_slides_and_pt_files(tmp_path):
    rng = np.random.default_rng(0)
    write_h5(tmp_path / "h5_files" / "a1.h5", rng.normal(size=(1, 3, 4)), trident=False)  # leading 1 is squeezed
    write_h5(tmp_path / "h5_files" / "a2.h5", rng.normal(size=(2, 4)), trident=False)
    write_h5(tmp_path / "h5_files" / "b1.h5", rng.normal(size=(5, 4)), trident=False)
    table = pd.DataFrame({"time": [3.0, 4.0], "event": [1, 0], "slide": ["a1;a2", "b1"]}, index=["A", "B"])
    c = read_cohort(table, tmp_path)
    assert c.slides_of("A") == ["a1", "a2"] and c.bag("A").shape == (5, 4)
    pt = tmp_path / "pt"
    pt.mkdir()
    torch.save(torch.ones(2, 4), pt / "a1.pt")
    torch.save(torch.zeros(3, 4), pt / "b1.pt")
    c2 = read_cohort(table.assign(slide=["a1", "b1"]), pt)
    assert c2.bag("A").shape == (2, 4) and c2.bag("B").sum() == 0


def test_tiles_anndata_becomes_a_cohort():
    parts = []
    for s, p in (("slideA", "A"), ("slideB", "B")):
        a = new_section(None, genes=[], spots=[f"{s}_t{i}" for i in range(4)], xy_px=np.full((4, 2), 5.0), section=s,
                        patient=p, microns_per_pixel=0.5, spot_diameter_um=112.0, require_inside=False)
        parts.append(a)
    tiles = concat(parts)
    tiles.obsm["X_enc"] = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    c = cohort_from_tiles(tiles, pd.DataFrame({"time": [1.0, 2.0], "event": [1, 1]}, index=["A", "B"]))
    assert c.slides_of("B") == ["slideB"] and c.bag("B")[0, 0] == 12
    assert list(c.instance_ids["slideA"]) == [f"slideA_t{i}" for i in range(4)]


@pytest.mark.parametrize("case", ["no_features", "nan", "coords", "missing_file"])
def test_bad_feature_files_name_the_file(tmp_path, case):
    p = tmp_path / "f" / "s1.h5"
    if case == "no_features":
        import h5py

        p.parent.mkdir()
        with h5py.File(p, "w") as f:
            f.create_dataset("feats", data=np.ones((2, 2)))
    elif case == "nan":
        write_h5(p, np.full((2, 3), np.nan))
    elif case == "coords":
        write_h5(p, np.ones((2, 3)), np.ones((3, 2)))
    table = pd.DataFrame({"time": [1.0], "event": [1]}, index=["s1"])
    with pytest.raises(StdistillError) as e:
        read_cohort(table, tmp_path / "f")
    msg = str(e.value)
    assert "\n" not in msg and ("s1.h5" in msg or case == "missing_file")
    assert "f" in msg


def test_bad_tables_are_one_line_errors_naming_the_file(tmp_path):
    p = tmp_path / "clin.csv"
    pd.DataFrame({"patient": ["A"], "days": [3]}).to_csv(p, index=False)
    with pytest.raises(StdistillError, match="no 'time' column") as e:
        read_clinical(p)
    assert str(p) in str(e.value)
    pd.DataFrame({"patient": ["A", "B"], "time": [3, 4], "event": [2, 1]}).to_csv(p, index=False)
    with pytest.raises(StdistillError, match="0/1"):
        read_clinical(p)
    pd.DataFrame({"patient": ["A", "A"], "time": [3, 4], "event": [0, 1]}).to_csv(p, index=False)
    with pytest.raises(StdistillError, match="repeat"):
        read_clinical(p)
    r = tmp_path / "rna.csv"
    pd.DataFrame({"id": ["A"], "TP53": ["high"]}).to_csv(r, index=False)
    with pytest.raises(StdistillError, match="numbers") as e:
        read_rna(r, ["A"], orient="patients")
    assert str(r) in str(e.value)
    with pytest.raises(StdistillError, match="not found"):
        read_clinical(tmp_path / "absent.csv")


def test_cohort_validation():
    with pytest.raises(StdistillError, match="no slide"):
        Cohort(pd.DataFrame({"time": [1.0, 2.0], "event": [1, 0]}, index=["A", "B"]), {"s": np.ones((2, 2))}, {"s": "A"})
    with pytest.raises(StdistillError, match=">= 0"):
        Cohort(pd.DataFrame({"time": [-1.0], "event": [1]}, index=["A"]), {"s": np.ones((2, 2))}, {"s": "A"})
    c = tiny_cohort(n=6)
    sub = c.subset(["P01", "P00"])
    assert sub.patients == ["P01", "P00"] and list(sub.rna.index) == ["P01", "P00"] and len(sub.bags) == 2
    assert c.without_rna().rna is None and c.rna is not None
