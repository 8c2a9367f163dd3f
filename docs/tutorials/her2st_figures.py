"""Figures and quoted printouts of the HER2ST tutorial (docs/tutorials/her2st.md), from its run folder.

    python docs/tutorials/her2st_figures.py stdistill_out/her2st [--figures DIR] [--text FILE]

Reads what the tutorial's commands wrote (``niches.h5ad``, ``teacher.txt``, ``B4/``) and writes
``tutorial_her2st_{teacher,predict_map,b4,geojson}.png`` (default: docs/figures/) and the text the
page quotes (default: docs/tutorials/her2st_run.txt): the teacher's printout and the agreement of
the student's tiles with the teacher's niches on B4's spots. Nothing is fitted here; no randomness.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEST_SECTION = "B4"
DPI = 90
COLOURS = 256  # PNG palette size (the niche colours and the image's own): small files


def _palette() -> tuple[str, ...]:
    from stdistill.pl import NICHE_PALETTE

    return NICHE_PALETTE


def _write_png(im, path: Path) -> None:
    """``im`` (PIL) as a palette PNG whose palette holds the niche colours exactly (legends stay true)."""
    from PIL import Image

    rgb = im.convert("RGB")
    niche = [int(c[i:i + 2], 16) for c in _palette() for i in (1, 3, 5)]
    rest = rgb.quantize(COLOURS - len(niche) // 3, dither=Image.Dither.NONE).getpalette()[: 3 * COLOURS - len(niche)]
    pal = Image.new("P", (1, 1))
    pal.putpalette(niche + rest)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb.quantize(palette=pal, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path}")


def _save(fig, path: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, bbox_inches="tight", format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        _write_png(im, path)


def _spot_panel(ax, adata, section: str, labels: np.ndarray, title: str) -> None:
    """Spots of ``section`` coloured by niche id (``labels``, strings; "" = none) on its thumbnail."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    lib = adata.uns["spatial"][section]
    img = lib["images"]["hires"]
    sf = lib["scalefactors"]
    m = adata.obs["section"].astype(str).to_numpy() == section
    xy = np.asarray(adata.obsm["spatial"], float)[m] * sf["tissue_hires_scalef"]
    r = sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"] / 2
    pal = _palette()
    keep = labels[m] != ""
    circles = [Circle(tuple(p), r) for p in xy[keep]]
    colours = [pal[int(v) % len(pal)] for v in labels[m][keep]]
    ax.imshow(img)
    ax.add_collection(PatchCollection(circles, facecolor=colours, edgecolor="none", alpha=0.8))
    pad = 3 * r
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _legend(fig, names: list[str]) -> None:
    from matplotlib.patches import Patch

    pal = _palette()
    handles = [Patch(color=pal[i % len(pal)], label=f"niche {n}") for i, n in enumerate(names)]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)


def teacher_figure(niches, names: list[str], path: Path) -> None:
    """One section per patient (its first imaged section), spots coloured by the teacher's niche."""
    from matplotlib.figure import Figure

    secs = niches.obs.groupby("patient", observed=True)["section"].first().astype(str)
    fig = Figure(figsize=(3.4 * len(secs), 4.0), layout="constrained")
    axes = fig.subplots(1, len(secs), squeeze=False)[0]
    labels = niches.obs["niche"].astype(str).to_numpy()
    for ax, (patient, s) in zip(axes, secs.items()):
        _spot_panel(ax, niches, s, labels, f"patient {patient}: {s}")
    _legend(fig, names)
    _save(fig, path)


def tile_under_spots(spots_xy: np.ndarray, tiles, tile_px: float) -> np.ndarray:
    """Index of the tile whose square holds each spot centre (-1: no tissue tile there)."""
    from scipy.spatial import cKDTree

    d, i = cKDTree(np.asarray(tiles.obsm["spatial"], float)).query(spots_xy, p=np.inf)
    return np.where(d <= tile_px / 2, i, -1)


def comparison(niches, tiles) -> tuple[np.ndarray, dict]:
    """Per B4 spot: the student's niche of the tile under it ("" where none), and the agreement summary."""
    lib = next(iter(tiles.uns["spatial"].values()))
    tile_px = float(lib["scalefactors"]["spot_diameter_fullres"])
    m = niches.obs["section"].astype(str).to_numpy() == TEST_SECTION
    idx = tile_under_spots(np.asarray(niches.obsm["spatial"], float)[m], tiles, tile_px)
    pred_tile = tiles.obs["niche_pred"].astype(str).to_numpy()
    pred = np.full(niches.n_obs, "", dtype=object)
    pred[np.flatnonzero(m)[idx >= 0]] = pred_tile[idx[idx >= 0]]
    teacher = niches.obs["niche"].astype(str).to_numpy()[m][idx >= 0]
    student = pred[m][idx >= 0]
    values, counts = np.unique(teacher, return_counts=True)
    summary = {
        "spots": int(m.sum()),
        "covered": int((idx >= 0).sum()),
        "agree": float(np.mean(teacher == student)) if len(teacher) else float("nan"),
        "majority_niche": str(values[np.argmax(counts)]) if len(values) else "",
        "majority_share": float(counts.max() / counts.sum()) if len(values) else float("nan"),
    }
    return pred.astype(str), summary


def b4_figure(niches, pred: np.ndarray, names: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    _spot_panel(axes[0], niches, TEST_SECTION, niches.obs["niche"].astype(str).to_numpy(),
                f"{TEST_SECTION}: teacher (from the counts)")
    _spot_panel(axes[1], niches, TEST_SECTION, pred, f"{TEST_SECTION}: student tile under each spot (H&E only)")
    _legend(fig, names)
    _save(fig, path)


def predict_map_figure(run: Path, path: Path, width: int = 720) -> None:
    """``maps/niches.png`` of the prediction, scaled down to ``width`` px."""
    from PIL import Image

    with Image.open(run / TEST_SECTION / "maps" / "niches.png") as im:
        im = im.convert("RGB")
        im.thumbnail((width, width))
        _write_png(im, path)


def geojson_figure(run: Path, path: Path, n_tiles: int = 14) -> None:
    """The GeoJSON's polygons, outlined in their classification colour, on a zoomed part of the slide."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Polygon
    from PIL import Image

    out = run / TEST_SECTION
    feats = json.loads(next(out.glob("*.geojson")).read_text())["features"]
    slide = Path(json.loads((out / "run.json").read_text())["slide"])
    rings = [np.asarray(f["geometry"]["coordinates"][0], float) for f in feats]
    centres = np.array([r[:-1].mean(0) for r in rings])
    side = float(np.ptp(rings[0][:, 0]))
    c = centres[np.argmin(np.abs(centres - np.median(centres, 0)).sum(1))]
    half = side * n_tiles / 2
    x0, y0 = max(c[0] - half, 0), max(c[1] - half, 0)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(slide) as im:
        crop = im.convert("RGB").crop((int(x0), int(y0), int(x0 + 2 * half), int(y0 + 2 * half)))
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.imshow(crop, extent=(x0, x0 + crop.width, y0 + crop.height, y0))
    for f, ring in zip(feats, rings):
        rgb = np.asarray(f["properties"]["classification"]["color"], float) / 255
        ax.add_patch(Polygon(ring, closed=True, facecolor=(*rgb, 0.25), edgecolor=rgb, linewidth=1.2))
    ax.set_xlim(x0, x0 + crop.width)
    ax.set_ylim(y0 + crop.height, y0)
    ax.set_title(f"{slide.name}: tiles of the GeoJSON (pixels)", fontsize=9)
    _save(fig, path)


def run_text(run: Path, summary: dict) -> str:
    printed = (run / "teacher.txt").read_text().strip().splitlines()
    teacher = "\n".join(line for line in printed if not line.startswith("wrote "))
    return "\n".join([
        "# Printed by docs/tutorials/her2st_figures.py from the tutorial's run folder.",
        "# teacher",
        teacher,
        "# end teacher",
        "# agreement",
        f"{TEST_SECTION} spots under a tissue tile: {summary['covered']} of {summary['spots']}",
        f"student niche = teacher niche:                    {summary['agree']:.3f}",
        f"constant guess (teacher niche {summary['majority_niche']}, the most common): {summary['majority_share']:.3f}",
        "# end agreement",
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    import anndata as ad

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="the tutorial's output folder (stdistill_out/her2st)")
    p.add_argument("--figures", type=Path, default=HERE.parent / "figures")
    p.add_argument("--text", type=Path, default=HERE / "her2st_run.txt")
    a = p.parse_args(argv)
    niches = ad.read_h5ad(a.run / "niches.h5ad")
    tiles = ad.read_h5ad(next((a.run / TEST_SECTION).glob("*.h5ad")))
    names = list(json.loads((a.run / "student" / "config.json").read_text())["bundle"]["outputs"]["niches"])
    teacher_figure(niches, names, a.figures / "tutorial_her2st_teacher.png")
    predict_map_figure(a.run, a.figures / "tutorial_her2st_predict_map.png")
    pred, summary = comparison(niches, tiles)
    b4_figure(niches, pred, names, a.figures / "tutorial_her2st_b4.png")
    geojson_figure(a.run, a.figures / "tutorial_her2st_geojson.png")
    text = run_text(a.run, summary)
    a.text.parent.mkdir(parents=True, exist_ok=True)
    a.text.write_text(text)
    print(text, end="")
    return summary


if __name__ == "__main__":
    main()
