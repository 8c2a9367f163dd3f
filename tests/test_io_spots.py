"""``io.read_spots`` / ``stdistill import``: one's own spots + counts + image in one step."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _cli_helpers import _cli
from PIL import Image

import stdistill as sd
from stdistill import StdistillError

W, H, N, G = 300, 200, 12, 5


@pytest.fixture
def own(tmp_path) -> dict:
    """An image, a counts table (comma) and a positions table (tab) for N spots."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(tmp_path / "he.png")
    spots = [f"s{i}" for i in range(N)]
    counts = pd.DataFrame(rng.poisson(3, (N, G)), index=spots, columns=[f"G{j}" for j in range(G)])
    counts.index.name = "spot"
    counts.to_csv(tmp_path / "counts.csv")
    pos = pd.DataFrame({"x": rng.uniform(10, W - 10, N), "y": rng.uniform(10, H - 10, N)}, index=spots[::-1])
    pos.index.name = "spot"
    pos.to_csv(tmp_path / "pos.tsv", sep="\t")
    return {"dir": tmp_path, "counts": counts, "pos": pos}


def test_tables_fill_the_data_model(own):
    d = own["dir"]
    a = sd.io.read_spots(d / "counts.csv", positions=d / "pos.tsv", image=d / "he.png", microns_per_pixel=0.5,
                         patient="P1")
    assert a.shape == (N, G) and list(a.obs["section"].unique()) == ["he"] and list(a.obs["patient"].unique()) == ["P1"]
    np.testing.assert_array_equal(a.X.toarray(), own["counts"].to_numpy())
    np.testing.assert_allclose(a.obsm["spatial"], own["pos"].loc[a.obs_names, ["x", "y"]].to_numpy())  # joined by id
    lib = a.uns["spatial"]["he"]
    assert lib["metadata"]["image_size"] == [W, H] and lib["scalefactors"]["microns_per_pixel"] == 0.5
    sd.io.validate(a)


def test_genes_by_spots_table_and_gz_are_detected(own):
    d = own["dir"]
    own["counts"].T.to_csv(d / "counts_t.tsv.gz", sep="\t")
    a = sd.io.read_spots(d / "counts_t.tsv.gz", positions=d / "pos.tsv", image=d / "he.png", microns_per_pixel=1)
    assert a.shape == (N, G) and list(a.var_names) == list(own["counts"].columns)


def test_h5ad_with_spatial_then_cli(own, tmp_path):
    d = own["dir"]
    src = ad.AnnData(own["counts"].to_numpy().astype(np.float32))
    src.obs_names, src.var_names = own["counts"].index, own["counts"].columns
    src.obsm["spatial"] = own["pos"].loc[src.obs_names, ["x", "y"]].to_numpy()
    src.write_h5ad(d / "mine.h5ad")
    a = sd.io.read_spots(d / "mine.h5ad", image=d / "he.png", microns_per_pixel=0.5, section="S1")
    assert a.obs["section"].iloc[0] == "S1" and a.obs["patient"].iloc[0] == "S1"
    r = _cli("import", str(d / "counts.csv"), "--positions", str(d / "pos.tsv"), "--image", str(d / "he.png"),
             "--mpp", "0.5", "--patient", "P9", "--out", str(tmp_path / "o.h5ad"))
    assert r.returncode == 0, r.stderr
    b = sd.io.load_any(tmp_path / "o.h5ad")  # what every command reads
    assert b.obs["patient"].iloc[0] == "P9" and b.n_obs == N


@pytest.mark.parametrize("change, match", [
    ("no_positions", "needs positions="),
    ("outside", "outside the 300x200 px image"),
    ("missing_spot", "have counts but no position"),
    ("no_xy", "no spot pixel column"),
    ("float_counts", "count"),
])
def test_bad_input_is_one_line_naming_the_file(own, change, match):
    d = own["dir"]
    kw = {"positions": d / "pos.tsv", "image": d / "he.png", "microns_per_pixel": 0.5}
    counts = d / "counts.csv"
    if change == "no_positions":
        kw.pop("positions")
    elif change == "outside":
        own["pos"].assign(x=own["pos"]["x"] + W).to_csv(d / "pos.tsv", sep="\t")
    elif change == "missing_spot":
        own["pos"].iloc[1:].to_csv(d / "pos.tsv", sep="\t")
    elif change == "no_xy":
        own["pos"].rename(columns={"x": "col", "y": "row"}).to_csv(d / "pos.tsv", sep="\t")
    elif change == "float_counts":
        (own["counts"] + 0.5).to_csv(counts)
    with pytest.raises(StdistillError, match=match) as e:
        sd.io.read_spots(counts, **kw)
    msg = str(e.value)
    assert "\n" not in msg and (str(counts) in msg or str(d / "pos.tsv") in msg)
