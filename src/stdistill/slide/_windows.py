"""Where to sequence next: square windows of a physical size (a capture area, 6.5 mm for a Visium
slide) ranked by the mean predicted uncertainty of the tissue tiles inside.

Windows slide over the tile grid one tile at a time; a window counts only where at least
:data:`MIN_TISSUE` of its tiles are predicted tissue tiles. The best window is taken, every window
overlapping it is dropped, and so on (greedy, no overlaps), up to ``n`` windows. Tissue that
spans less than the window in one direction gets windows as long as the tissue in that direction
(their real size is in the table).
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from .._utils import atomic_path
from ._draw import save_png, thumb_figure, tile_grid

#: least share of a window's tiles that are predicted tissue tiles
MIN_TISSUE = 0.5
DEFAULT_WINDOW_MM = 6.5


def _sums(grid: np.ndarray, k: tuple[int, int]) -> np.ndarray:
    """Sum of ``grid`` over every (k0, k1) window (top-left corners), from a summed-area table."""
    s = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1))
    s[1:, 1:] = grid.cumsum(0).cumsum(1)
    return s[k[0]:, k[1]:] - s[:-k[0], k[1]:] - s[k[0]:, :-k[1]] + s[:-k[0], :-k[1]]


def rank_windows(a: ad.AnnData, values: np.ndarray, window_mm: float = DEFAULT_WINDOW_MM, n: int = 10) -> pd.DataFrame:
    """Up to ``n`` non-overlapping windows of ``window_mm`` mm ranked by the mean of ``values``
    (one per tile of ``a``, e.g. GenST's uncertainty) over their tissue tiles. Columns: ``rank``,
    ``mean_uncertainty``, ``n_tiles``, ``tissue_share``, corners ``x0_px .. y1_px`` (full-resolution
    px), ``centre_x_um``, ``centre_y_um``, ``width_mm``, ``height_mm``."""
    if not (np.isfinite(window_mm) and window_mm > 0):
        raise StdistillError(f"the window size must be a positive number of mm, got {window_mm}")
    sec = a.obs[Key.obs.section].iloc[0]
    lib = a.uns[Key.uns.spatial][sec]
    side = float(lib["scalefactors"]["spot_diameter_fullres"])  # tile side, full-res px
    mpp = float(lib["scalefactors"]["microns_per_pixel"])
    r, c = a.obs[Key.obs.tile_row].to_numpy(), a.obs[Key.obs.tile_col].to_numpy()
    xy = np.asarray(a.obsm[Key.obsm.spatial], dtype=float)
    x0, y0 = float(np.median(xy[:, 0] - (c + 0.5) * side)), float(np.median(xy[:, 1] - (r + 0.5) * side))
    v = np.asarray(values, dtype=np.float64)
    good = np.isfinite(v)
    shape = (int(r.max()) + 1, int(c.max()) + 1)
    val, cnt = np.zeros(shape), np.zeros(shape)
    np.add.at(val, (r[good], c[good]), v[good])
    np.add.at(cnt, (r[good], c[good]), 1.0)
    want = max(1, int(round(window_mm * 1000 / (side * mpp))))
    k = (min(want, shape[0]), min(want, shape[1]))
    n_t, tot = _sums(cnt, k), _sums(val, k)
    share = n_t / (k[0] * k[1])
    score = np.where(share >= MIN_TISSUE, tot / np.maximum(n_t, 1), -np.inf)
    rows, taken = [], np.zeros(score.shape, bool)
    while len(rows) < n:
        masked = np.where(taken, -np.inf, score)
        i, j = np.unravel_index(int(np.argmax(masked)), masked.shape)
        if not np.isfinite(masked[i, j]):
            break
        taken[max(0, i - k[0] + 1): i + k[0], max(0, j - k[1] + 1): j + k[1]] = True  # every overlapping window
        px0, py0 = x0 + j * side, y0 + i * side
        px1, py1 = px0 + k[1] * side, py0 + k[0] * side
        rows.append({"rank": len(rows) + 1, "mean_uncertainty": round(float(score[i, j]), 6), "n_tiles": int(n_t[i, j]),
                     "tissue_share": round(float(share[i, j]), 4), "x0_px": round(px0, 1), "y0_px": round(py0, 1),
                     "x1_px": round(px1, 1), "y1_px": round(py1, 1), "centre_x_um": round((px0 + px1) / 2 * mpp, 1),
                     "centre_y_um": round((py0 + py1) / 2 * mpp, 1), "width_mm": round(k[1] * side * mpp / 1000, 4),
                     "height_mm": round(k[0] * side * mpp / 1000, 4)})
    return pd.DataFrame(rows, columns=["rank", "mean_uncertainty", "n_tiles", "tissue_share", "x0_px", "y0_px", "x1_px",
                                       "y1_px", "centre_x_um", "centre_y_um", "width_mm", "height_mm"])


def write_windows(a: ad.AnnData, table: pd.DataFrame, out: Path, name: str, map_path: Path, values: np.ndarray) -> list[Path]:
    """``<name>_windows.csv``, ``<name>_windows.geojson`` (rectangles, rank and mean uncertainty as
    measurements) and a PNG of the uncertainty map with the windows numbered."""
    csv, gj = out / f"{name}_windows.csv", out / f"{name}_windows.geojson"
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    feats = []
    for w in table.itertuples():
        ring = [[w.x0_px, w.y0_px], [w.x1_px, w.y0_px], [w.x1_px, w.y1_px], [w.x0_px, w.y1_px], [w.x0_px, w.y0_px]]
        feats.append({"type": "Feature", "id": f"window {w.rank}", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "annotation", "name": f"window {w.rank}",
                                     "measurements": {"rank": int(w.rank), "mean uncertainty": w.mean_uncertainty}}})
    with atomic_path(gj) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    from matplotlib.patches import Rectangle

    grid, extent, thumb = tile_grid(a, values)
    scale = float(a.uns[Key.uns.spatial][a.obs[Key.obs.section].iloc[0]]["scalefactors"]["tissue_hires_scalef"])
    fig, ax = thumb_figure(thumb)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="magma", extent=extent, interpolation="nearest", alpha=0.7)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="uncertainty (mean SD over genes, log1p)")
    for w in table.itertuples():
        ax.add_patch(Rectangle((w.x0_px * scale, w.y0_px * scale), (w.x1_px - w.x0_px) * scale,
                               (w.y1_px - w.y0_px) * scale, fill=False, edgecolor="cyan", linewidth=1.5))
        ax.text(w.x0_px * scale + 3, w.y0_px * scale + 3, str(w.rank), color="cyan", va="top", fontsize=9)
    ax.set_title(f"{name}: where to sequence next ({len(table)} windows)")
    return [csv, gj, save_png(fig, map_path)]
