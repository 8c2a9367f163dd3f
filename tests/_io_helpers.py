"""Tiny hand-made inputs for the tests (legacy ST layout, HEST layout, colour-driven imaged sections)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def write_image(path: Path, w: int = 64, h: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def legacy_st(
    tmp: Path,
    counts: np.ndarray | None = None,
    ids: list[str] | None = None,
    positions: dict | None = None,
    image: bool = True,
    gzip: bool = True,
) -> dict:
    """A 4-spot legacy ST section: array 2x2 with 10 px per array step, image 64x48 px.

    Returns keyword arguments for ``read_legacy_st`` (counts, spots, image).
    """
    xy = [(1, 1), (2, 1), (1, 2), (2, 2)]
    ids = ids if ids is not None else [f"{x}x{y}" for x, y in xy]
    if counts is None:
        counts = np.array([[1, 0, 3], [0, 2, 0], [5, 1, 0], [0, 0, 7]])
    df = pd.DataFrame(counts, index=ids, columns=["GENEA", "GENEB", "GENEC"])
    cpath = tmp / ("counts.tsv.gz" if gzip else "counts.tsv")
    df.to_csv(cpath, sep="\t")
    pos = positions or {
        "x": [x for x, _ in xy],
        "y": [y for _, y in xy],
        "new_x": [x + 0.01 for x, _ in xy],
        "new_y": [y - 0.01 for _, y in xy],
        "pixel_x": [10.0 * x + 5 for x, _ in xy],
        "pixel_y": [10.0 * y + 3 for _, y in xy],
        "selected": [1, 1, 1, 1],
    }
    spath = tmp / "spots.tsv"
    pd.DataFrame(pos).to_csv(spath, sep="\t", index=False)
    out = {"counts": cpath, "spots": spath, "image": None}
    if image:
        out["image"] = write_image(tmp / "he.png")
    return out


def hest_folder(root: Path, sample: str = "TENX1", meta: dict | None = None, wsi: bool = True) -> Path:
    """A tiny HEST-1k layout: st/<id>.h5ad (5 spots, 4 genes), wsis/<id>.tif (80x60), metadata/<id>.json."""
    import anndata as ad
    import scipy.sparse as sp
    import tifffile

    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    X = sp.csr_matrix(
        np.array([[1, 0, 2, 0], [0, 3, 0, 1], [4, 0, 0, 0], [0, 0, 5, 6], [2, 2, 2, 2]], dtype=np.float32)
    )
    obs = pd.DataFrame(
        {"in_tissue": [1, 1, 1, 1, 0], "array_row": [0, 0, 1, 1, 2], "array_col": [0, 2, 1, 3, 0]},
        index=[f"BC{i}-1" for i in range(5)],
    )
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["ACTB", "GAPDH", "ERBB2", "KRT19"]))
    a.obsm["spatial"] = np.array([[10.0, 10.0], [30.0, 12.0], [20.0, 30.0], [50.0, 40.0], [70.0, 55.0]])
    a.write_h5ad(root / "st" / f"{sample}.h5ad")
    if wsi:
        rng = np.random.default_rng(1)
        tifffile.imwrite(
            root / "wsis" / f"{sample}.tif", rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), photometric="rgb"
        )
    m = {
        "pixel_size_um_estimated": 0.5,
        "pixel_size_um_embedded": 0.25,
        "patient": "P7",
        "st_technology": "Visium",
        "species": "Homo sapiens",
    }
    if meta is not None:
        m = meta
    (root / "metadata" / f"{sample}.json").write_text(json.dumps(m))
    return root


def colour_sections(n_patients: int = 3, side: int = 5, genes=None, seed: int = 0, feature_key: str | None = None):
    """One imaged section per patient (``S<p>``/``P<p>``): ``side`` x ``side`` spots on a 40 px grid,
    each a 28 px square whose colour drives its expression (learnable from the patch). Genes
    default to G0..G11. With ``feature_key``, ``obsm[feature_key]`` = colour + 5 noise columns."""
    from stdistill.io import concat, new_section

    rng = np.random.default_rng(seed)
    genes = list(genes) if genes is not None else [f"G{i}" for i in range(12)]
    W = rng.normal(size=(3, len(genes)))
    secs = []
    for p in range(n_patients):
        img = np.full((side * 40, side * 40, 3), 220, np.uint8)
        c = (np.arange(side) + 0.5) * 40
        xy = np.array([(x, y) for y in c for x in c])
        col = rng.integers(30, 230, size=(len(xy), 3))
        for (x, y), cc in zip(xy, col):
            img[int(y) - 14:int(y) + 14, int(x) - 14:int(x) + 14] = cc
        counts = rng.poisson(np.exp(1.0 + (col / 255.0 - 0.5) @ W))
        a = new_section(counts, genes=genes, spots=[f"s{i}" for i in range(len(xy))], xy_px=xy, section=f"S{p}",
                        patient=f"P{p}", microns_per_pixel=1.0, spot_diameter_um=28, image=img)
        if feature_key:
            a.obsm[feature_key] = np.c_[col / 255.0, rng.normal(size=(len(xy), 5))].astype(np.float32)
        secs.append(a)
    return concat(secs)
