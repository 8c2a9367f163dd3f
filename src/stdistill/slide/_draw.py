"""Drawing per-tile values on a slide's thumbnail (shared by the maps and the window ranking)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from .._keys import Key
from .._utils import atomic_path


def tile_grid(a: ad.AnnData, values: np.ndarray):
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


def thumb_figure(thumb: np.ndarray):
    from matplotlib.figure import Figure

    h, w = thumb.shape[:2]
    fig = Figure(figsize=(7.0, 7.0 * h / max(w, 1) + 0.6), dpi=120)
    ax = fig.add_subplot()
    ax.imshow(thumb)
    ax.set_axis_off()
    return fig, ax


def save_png(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})  # tight: legends never clipped
    return path
