"""Outputs of a slide run: AnnData (.h5ad), GeoJSON that QuPath opens, PNG maps on the thumbnail,
optionally a SpatialData zarr store."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._keys import Key
from .._utils import atomic_path
from ..pl._common import NICHE_PALETTE as PALETTE
from ..pl._common import niche_colours

NICHE_KEY = Key.obs.niche_pred


def _rgb(hex_colour: str) -> list[int]:
    return [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]


def _niche_labels(names: list[str], k: int) -> list[str]:
    """``"niche 3: ERBB2/KRT19"`` style labels: the number first, marker genes when known."""
    names = list(names) if names and len(names) == k else [str(i) for i in range(k)]
    return [n if n.startswith("niche") else f"niche {n}" for n in names]


def _annotate(tiles: ad.AnnData, bundle, outputs: dict) -> ad.AnnData:
    """The tiles with predictions: niches in ``obs["niche_pred"]`` (+ ``"niche_pred_name"``) and
    ``obsm["niche_pred_probs"]``; expression/pathways as ``obsm["<kind>_pred"]`` (DataFrame)."""
    from .._niches import write_niches

    a = tiles.copy()
    if "niches" in outputs:
        probs = outputs["niches"]
        write_niches(a, probs, NICHE_KEY)
        labels = _niche_labels(bundle.outputs.get("niches", []), probs.shape[1])
        codes = a.obs[NICHE_KEY].cat.codes.to_numpy()
        a.obs[Key.obs.name(NICHE_KEY)] = pd.Categorical.from_codes(codes, categories=labels)
    for kind, values in outputs.items():
        if kind == "niches":
            continue
        v = np.asarray(values, dtype=np.float32)
        if kind == "genes":
            v = np.maximum(v, 0.0)  # log1p expression is never negative
        a.obsm[Key.obsm.prediction(kind)] = pd.DataFrame(v, index=a.obs_names, columns=bundle.outputs.get(kind))
    a.uns[Key.uns.predict] = {"bundle": json.dumps(bundle.record), "outputs": sorted(outputs)}
    return a


def _write_h5ad(a: ad.AnnData, path: Path) -> Path:
    with atomic_path(path) as tmp:
        a.write_h5ad(tmp)
    return path


def write_zarr(a: ad.AnnData, path: Path) -> Path:
    """The annotated tiles as a SpatialData zarr store (:func:`stdistill.io.to_spatialdata`: tiles as
    shapes in full-resolution pixels, the thumbnail, the table), built beside ``path`` and renamed
    into place, so a failed write leaves no half store. Needs ``pip install 'stdistill[spatialdata]'``."""
    import shutil
    import warnings

    from ..io import to_spatialdata

    sdata = to_spatialdata(a)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*zarr v3 autosharding.*")
            sdata.write(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_geojson(a: ad.AnnData, path: str | Path) -> Path:
    """Tiles as square polygons in full-resolution pixels (QuPath's coordinates): ``classification``
    = the predicted niche (with its map colour), ``measurements`` = niche probabilities and
    predicted values. Written feature by feature (atomically)."""
    path = Path(path)
    sec = a.obs[Key.obs.section].iloc[0]
    meta = a.uns[Key.uns.spatial][sec]
    half = meta["scalefactors"]["spot_diameter_fullres"] / 2
    xy = np.asarray(a.obsm[Key.obsm.spatial], dtype=float)
    cols: list[tuple[str, np.ndarray]] = []
    if Key.obsm.probs(NICHE_KEY) in a.obsm:
        labels = list(a.obs[Key.obs.name(NICHE_KEY)].cat.categories)
        cols += [(f"p({lab})", a.obsm[Key.obsm.probs(NICHE_KEY)][:, i]) for i, lab in enumerate(labels)]
    for key in sorted(k for k in a.obsm if k.endswith("_pred") and isinstance(a.obsm[k], pd.DataFrame)):
        cols += [(str(c), a.obsm[key][c].to_numpy()) for c in a.obsm[key].columns]
    names = a.obs[Key.obs.name(NICHE_KEY)] if Key.obs.name(NICHE_KEY) in a.obs else None
    codes = names.cat.codes.to_numpy() if names is not None else None
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [\n')
        for i, tid in enumerate(a.obs_names):
            x, y = xy[i]
            ring = [[round(x - half, 2), round(y - half, 2)], [round(x + half, 2), round(y - half, 2)],
                    [round(x + half, 2), round(y + half, 2)], [round(x - half, 2), round(y + half, 2)]]
            props: dict = {"objectType": "tile", "name": str(tid),
                           "measurements": {n: (None if not np.isfinite(v[i]) else round(float(v[i]), 5)) for n, v in cols}}
            if codes is not None and codes[i] >= 0:
                props["classification"] = {"name": names.cat.categories[codes[i]],
                                           "color": _rgb(PALETTE[codes[i] % len(PALETTE)])}
            feat = {"type": "Feature", "id": str(tid), "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]},
                    "properties": props}
            fh.write(("," if i else "") + json.dumps(feat) + "\n")
        fh.write("]}\n")
    return path


def _grid(a: ad.AnnData, values: np.ndarray):
    """A (rows, cols) grid of per-tile ``values`` (NaN off tissue) and its extent on the thumbnail."""
    sec = a.obs[Key.obs.section].iloc[0]
    lib = a.uns[Key.uns.spatial][sec]
    scale = float(lib["scalefactors"]["tissue_hires_scalef"])
    side = float(lib["scalefactors"]["spot_diameter_fullres"])
    r, c = a.obs[Key.obs.tile_row].to_numpy(), a.obs[Key.obs.tile_col].to_numpy()
    xy = np.asarray(a.obsm[Key.obsm.spatial], dtype=float)
    x0, y0 = float(np.median(xy[:, 0] - (c + 0.5) * side)), float(np.median(xy[:, 1] - (r + 0.5) * side))
    grid = np.full((r.max() + 1, c.max() + 1), np.nan)
    grid[r, c] = values
    extent = (x0 * scale, (x0 + grid.shape[1] * side) * scale, (y0 + grid.shape[0] * side) * scale, y0 * scale)
    return grid, extent, lib["images"]["hires"]


def _figure(thumb: np.ndarray):
    from matplotlib.figure import Figure

    h, w = thumb.shape[:2]
    fig = Figure(figsize=(7.0, 7.0 * h / max(w, 1) + 0.6), dpi=120)
    ax = fig.add_subplot()
    ax.imshow(thumb)
    ax.set_axis_off()
    return fig, ax


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})  # tight: legends never clipped
    return path


def niche_map(a: ad.AnnData, path: str | Path, title: str = "") -> Path:
    """Predicted niches as translucent tiles on the slide thumbnail; the legend (outside the
    image, never clipped) names each niche with its marker genes and its share of tiles."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = a.obs[Key.obs.name(NICHE_KEY)]
    labels = list(names.cat.categories)
    codes = names.cat.codes.to_numpy().astype(float)
    codes[codes < 0] = np.nan
    grid, extent, thumb = _grid(a, codes)
    fig, ax = _figure(thumb)
    colours = niche_colours(len(labels))
    ax.imshow(np.ma.masked_invalid(grid), cmap=ListedColormap(colours), vmin=-0.5, vmax=len(labels) - 0.5,
              extent=extent, interpolation="nearest", alpha=0.55)
    share = np.bincount(names.cat.codes.to_numpy()[names.cat.codes.to_numpy() >= 0], minlength=len(labels))
    share = share / max(share.sum(), 1)
    handles = [Patch(facecolor=colours[i], edgecolor="none", label=f"{lab} ({share[i]:.0%})") for i, lab in enumerate(labels)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="niche (tiles)")
    ax.set_title(title or f"predicted niches, {a.n_obs} tiles")
    return _save(fig, Path(path))


def value_map(a: ad.AnnData, values: np.ndarray, path: str | Path, title: str, label: str) -> Path:
    """One predicted value per tile (e.g. a gene's log1p expression) on the slide thumbnail."""
    grid, extent, thumb = _grid(a, values)
    fig, ax = _figure(thumb)
    finite = values[np.isfinite(values)]
    lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                   extent=extent, interpolation="nearest", alpha=0.75)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label=label)
    ax.set_title(title)
    return _save(fig, Path(path))


def write_outputs(tiles: ad.AnnData, bundle, outputs: dict, out: Path, name: str,
                  map_genes: list[str] | None = None, zarr: bool = False) -> dict:
    """Write ``<name>.h5ad``, ``<name>.geojson``, ``maps/*.png`` (and ``<name>.zarr`` with ``zarr``);
    returns their paths."""
    a = _annotate(tiles, bundle, outputs)
    maps = []
    if "niches" in outputs:
        maps.append(niche_map(a, out / "maps" / "niches.png", f"{name}: predicted niches ({bundle.encoder})"))
    for kind in sorted(k for k in outputs if k != "niches"):
        frame = a.obsm[Key.obsm.prediction(kind)]
        chosen = list(map_genes) if map_genes else list(frame.columns[:4])
        missing = [g for g in chosen if g not in frame.columns]
        if missing:
            from .._errors import StdistillError

            raise StdistillError(f"the model does not predict {missing}; it predicts {list(frame.columns)[:8]}...", bundle.path)
        unit = "log1p expression" if kind == "genes" else "score"
        for g in chosen:
            maps.append(value_map(a, frame[g].to_numpy(), out / "maps" / f"{g}.png", f"{name}: predicted {g}", unit))
    return {"h5ad": _write_h5ad(a, out / f"{name}.h5ad"), "geojson": write_geojson(a, out / f"{name}.geojson"), "maps": maps,
            "zarr": write_zarr(a, out / f"{name}.zarr") if zarr else None}
