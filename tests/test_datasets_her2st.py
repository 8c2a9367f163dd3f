import shutil

import numpy as np
import pytest

from stdistill import StdistillError
from stdistill.datasets import _download, her2st, mob
from stdistill.datasets.her2st import SECTIONS, _needed_files
from stdistill.io import image, microns_per_pixel
from stdistill.io.summary import section_table

WITH_IMAGE = {"A1": 346, "A2": 325, "B4": 283, "C2": 187, "C3": 180, "C4": 184, "C5": 181}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One parsed-counts cache for this module, never the user's."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("stdistill-cache")
    mp.setenv("STDISTILL_CACHE", str(d))
    mp.delenv("STDISTILL_DATA", raising=False)
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def with_images(cache):
    from conftest import _shared

    return her2st(_shared("her2st"), images_only=True)


def test_sections_with_images_have_the_expected_spots(with_images):
    t = section_table(with_images).set_index("section")
    assert t["spots_inside"].to_dict() == WITH_IMAGE
    assert (t["fraction_inside"] == 1.0).all()
    assert set(with_images.obs["patient"].unique()) == {"A", "B", "C"}
    # pitch-derived microns per pixel: ~0.69 for the full-res JPEGs, ~3.19 for A1/A2's 2000 px copies
    for s in ("B4", "C2", "C3", "C4", "C5"):
        assert microns_per_pixel(with_images, s) == pytest.approx(0.688, abs=0.003)
    for s in ("A1", "A2"):
        assert microns_per_pixel(with_images, s) == pytest.approx(3.19, abs=0.01)
    assert image(with_images, "B4").size == (9272, 9923)


def test_a2_spots_land_on_tissue_after_the_warp(with_images):
    # A2's app PNG is rigidly warped and its background blacked out: with the plain scale
    # about 57 spots fall on black; with the fitted warp none should
    arr = image(with_images, "A2").array
    xy = np.round(with_images[with_images.obs["section"] == "A2"].obsm["spatial"]).astype(int)
    centre = np.array([arr[y - 3 : y + 4, x - 3 : x + 4].mean() for x, y in xy])
    assert (centre < 20).sum() == 0
    A = with_images.uns["spatial"]["A2"]["metadata"]["coordinate_affine"]
    assert np.degrees(np.arctan2(A[1, 0], A[0, 0])) == pytest.approx(-5.45, abs=0.1)


def test_pathology_and_celltype_props(with_images):
    a1 = with_images[with_images.obs["section"] == "A1"]
    counts = a1.obs["pathology"].value_counts()
    assert a1.obs["pathology"].notna().sum() == 346
    assert counts["invasive cancer"] == 282 and counts["connective tissue"] == 24
    assert with_images[with_images.obs["section"] == "B4"].obs["pathology"].isna().all()
    props = with_images.obsm["celltype_props"]
    assert list(props.index) == list(with_images.obs_names)
    assert props.shape[1] == 8 and "Epithelial" in props.columns
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-3)


def test_section_and_patient_ids(her2st_root, cache):
    # all 36 are read by `stdistill info her2st` and benchmarks/io_her2st_load.py; two suffice here
    assert len(SECTIONS) == 36 and SECTIONS[0] == "A1" and SECTIONS[-1] == "H3"
    a = her2st(her2st_root, sections=["E1", "H3"])
    assert a.obs["section"].value_counts().to_dict() == {"E1": 587, "H3": 510}
    assert list(a.obs["patient"].cat.categories) == ["E", "H"]
    assert a.obs_names.is_unique and a.obs_names[0].startswith("E1_")
    assert a.X.dtype.kind == "i"
    assert a.obs.loc[a.obs["section"] == "E1", "pathology"].notna().sum() == 587
    assert a.obs.loc[a.obs["section"] == "H3", "pathology"].isna().all()


def test_unknown_section(her2st_root):
    with pytest.raises(StdistillError, match="unknown her2st section"):
        her2st(her2st_root, sections=["Z9"])


def test_download_into_the_cache_with_checksums(her2st_root, tmp_path, monkeypatch):
    monkeypatch.setenv("STDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STDISTILL_DATA", raising=False)
    monkeypatch.setattr(_download, "HER2ST_URL", her2st_root.resolve().as_uri())
    a = her2st(sections=["A2"])
    cached = tmp_path / "cache" / "her2st"
    for rel in _needed_files(["A2"]):
        assert _download.is_verified(cached / rel, *_download.HER2ST_MANIFEST[rel])
    assert a.n_obs == 325 and str(cached) in a.uns["spatial"]["A2"]["metadata"]["source_image_path"]
    # second call: served from the cache, no fetch
    monkeypatch.setattr(_download, "fetch", lambda *a, **k: pytest.fail("fetched again"))
    assert her2st(sections=["A2"]).n_obs == 325


def test_a_corrupted_download_is_refused(her2st_root, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    for rel in _needed_files(["B1"]):
        (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(her2st_root / rel, mirror / rel)
    spot = mirror / "data/ST-spotfiles/B1_selection.tsv"
    data = bytearray(spot.read_bytes())
    data[100] = ord("9") if data[100] != ord("9") else ord("8")  # same size, one byte changed
    spot.write_bytes(bytes(data))
    monkeypatch.setenv("STDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STDISTILL_DATA", raising=False)
    monkeypatch.setattr(_download, "HER2ST_URL", mirror.as_uri())
    with pytest.raises(StdistillError, match="download is corrupt"):
        her2st(sections=["B1"])
    target = tmp_path / "cache" / "her2st" / "data/ST-spotfiles/B1_selection.tsv"
    assert not target.exists() and not list(target.parent.glob(".*tmp"))


def test_git_blob_sha1_matches_git(tmp_path):
    p = tmp_path / "hello.txt"
    p.write_bytes(b"hello\n")
    # `printf 'hello\n' | git hash-object --stdin`
    assert _download.git_blob_sha1(p) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_mob_reads_two_mouse_replicates(mob_root):
    a = mob(mob_root)
    assert a.obs["section"].value_counts().to_dict() == {"Rep2": 280, "Rep1": 267}
    assert list(a.obs["patient"].unique()) == ["MOB"]
    assert microns_per_pixel(a, "Rep1") == pytest.approx(3.45, abs=0.01)
    assert (section_table(a)["fraction_inside"] == 1.0).all()
