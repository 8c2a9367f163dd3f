"""Helpers shared by the plotting functions: the section to draw, spots on the H&E thumbnail."""

from __future__ import annotations

import anndata as ad
import numpy as np

from .._errors import StdistillError
from ..io._section import SECTION_KEY, SPATIAL_KEY, library, sections

#: Label colours that stay visible on H&E (no pinks or purples: those vanish into eosin and
#: haematoxylin). Shared by every niche map: ``pl.niches``, slide maps, GeoJSON classes, the demo.
NICHE_PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#000000", "#17BECF",
                 "#8C510A", "#BCBD22", "#7F7F7F", "#00441B")


def niche_colours(n: int) -> list[str]:
    """``n`` colours from :data:`NICHE_PALETTE` (repeating after 12)."""
    return [NICHE_PALETTE[i % len(NICHE_PALETTE)] for i in range(n)]


def _one_section(adata: ad.AnnData, section: str | None) -> tuple[str, np.ndarray]:
    """The section to draw (``None``: the only one) and its boolean spot mask (n_obs,)."""
    secs = sections(adata)
    if section is None:
        if len(secs) != 1:
            raise StdistillError(f"AnnData holds {len(secs)} sections: pass section= (one of {secs[:6]})")
        section = secs[0]
    if section not in secs:
        raise StdistillError(f"section {section!r} is not in the AnnData (has {secs[:6]})")
    return section, adata.obs[SECTION_KEY].astype(str).to_numpy() == section


def _thumbnail(adata: ad.AnnData, section: str, mask: np.ndarray, spot_scale: float):
    """The section's hires thumbnail (or None), spot centres on it and the spot diameter in its pixels."""
    lib = library(adata, section)
    img = lib.get("images", {}).get("hires")
    sf = lib.get("scalefactors", {})
    scale = float(sf.get("tissue_hires_scalef", 1.0)) if img is not None else 1.0
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)[mask] * scale
    diam = float(sf.get("spot_diameter_fullres", 20.0) or 20.0) * scale * spot_scale
    return img, xy, diam


def _spots(ax, img, xy: np.ndarray, diam: float, v: np.ndarray, clim: tuple[float, float], cmap: str):
    """Spots as filled circles of their physical diameter (data units) over the thumbnail."""
    from matplotlib.collections import EllipseCollection

    if img is not None:
        ax.imshow(np.asarray(img))
    ok = np.isfinite(v)
    n = int(ok.sum())
    ec = EllipseCollection(np.full(n, diam), np.full(n, diam), np.zeros(n), units="xy", offsets=xy[ok],
                           offset_transform=ax.transData, cmap=cmap, alpha=0.9, linewidths=0)
    ec.set_array(v[ok])
    ec.set_clim(*clim)
    ax.add_collection(ec)
    pad = 1.5 * diam
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_axis_off()
    return ec


def _clim(*values: np.ndarray) -> tuple[float, float]:
    """One colour scale for ``values``: 5th-95th percentile of their finite entries ((0, 1) when none)."""
    v = np.concatenate([x[np.isfinite(x)] for x in values])
    lo, hi = np.percentile(v, [5, 95]) if v.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def _subplots(*args, figsize: tuple[float, float], layout: str | None = "constrained", **kw):
    """``(Figure, axes)`` like ``pyplot.subplots``, without pyplot: no global figure registry and no
    backend switch, so plotting never changes the caller's matplotlib state."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*args, **kw)
