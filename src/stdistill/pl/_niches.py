"""Niche maps on the H&E: one panel per labelling (teacher | student | baselines), colours matched."""

from __future__ import annotations

import os
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._utils import atomic_path
from ..io._section import SECTION_KEY, SPATIAL_KEY
from ._common import _one_section


def _palette(n: int) -> list:
    import matplotlib

    base = list(matplotlib.colormaps["tab10"].colors) + list(matplotlib.colormaps["Dark2"].colors) + list(
        matplotlib.colormaps["Set3"].colors)
    return [base[i % len(base)] for i in range(n)]


def _matched_colours(ref: np.ndarray, lab: np.ndarray, ref_levels: list[str], n_extra_start: int) -> dict:
    """label -> colour index; labels are Hungarian-matched to reference levels (by overlap)."""
    from ..metrics import hungarian_match

    ok = (ref != "nan") & (lab != "nan")
    levels = sorted(set(lab[lab != "nan"]), key=_natural)
    if ok.sum() == 0:
        return {v: n_extra_start + i for i, v in enumerate(levels)}
    m = hungarian_match(ref[ok], lab[ok])
    out, extra = {}, n_extra_start
    for v in levels:
        r = m.get(v)
        if r is not None and not r.startswith("+") and r in ref_levels:
            out[v] = ref_levels.index(r)
        else:
            out[v] = extra
            extra += 1
    return out


def _natural(v: str):
    try:
        return (0, int(v), v)
    except ValueError:
        return (1, 0, v)


def niches(
    adata: ad.AnnData,
    keys: Sequence[str],
    *,
    section: str | None = None,
    titles: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    spot_scale: float = 1.0,
    alpha: float = 0.75,
    panel_size: float = 4.0,
    dpi: int = 110,
):
    """Spots coloured by niche on the section's H&E thumbnail, one panel per ``obs`` key.

    Parameters
    ----------
    keys
        ``obs`` columns with niche/cluster labels, e.g. ``["niche_teacher", "niche_student",
        "niche_kmeans", "niche_kmeans_nbr"]``. The first is the reference: every other panel's
        labels are matched to it by Hungarian assignment on this section's spots, so matching
        niches share a colour; unmatched clusters get extra colours.
    section
        Section to draw (default: the only one). The image is ``uns["spatial"][section]["images"]
        ["hires"]``, spot centres ``obsm["spatial"] * scalefactors["tissue_hires_scalef"]``;
        a section without image is drawn on white.
    path
        Write a PNG here (atomically).

    Returns
    -------
    matplotlib Figure.
    """
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection
    from matplotlib.patches import Patch

    keys = list(keys)
    if not keys:
        raise StdistillError("pl.niches needs at least one obs key")
    for k in keys:
        if k not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{k}"] to plot')
    section, m = _one_section(adata, section)
    lib = adata.uns.get(SPATIAL_KEY, {}).get(section, {})
    sf = lib.get("scalefactors", {})
    img = lib.get("images", {}).get("hires")
    scale = float(sf.get("tissue_hires_scalef", 1.0)) if img is not None else 1.0
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)[m] * scale
    diam = float(sf.get("spot_diameter_fullres", 0) or 0) * scale * spot_scale
    if diam <= 0:  # no physical spot size: a fraction of the nearest-spot distance
        from sklearn.neighbors import NearestNeighbors

        d = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)[0][:, 1] if len(xy) > 1 else np.array([10.0])
        diam = 0.8 * float(np.median(d)) * spot_scale

    labs = [adata.obs[k].astype(str).to_numpy()[m] for k in keys]
    ref_levels = sorted(set(labs[0][labs[0] != "nan"]), key=_natural)
    maps = [{v: i for i, v in enumerate(ref_levels)}]
    extra = len(ref_levels)
    for lab in labs[1:]:
        cm = _matched_colours(labs[0], lab, ref_levels, extra)
        extra = max([extra, *[c + 1 for c in cm.values()]])
        maps.append(cm)
    pal = _palette(max(extra, 1))

    n = len(keys)
    fig, axes = plt.subplots(1, n, figsize=(panel_size * n, panel_size + 0.6), squeeze=False)
    for j, (ax, lab, cm) in enumerate(zip(axes[0], labs, maps)):
        if img is not None:
            ax.imshow(np.asarray(img))
        else:
            ax.set_facecolor("white")
        ok = lab != "nan"
        cols = [pal[cm[v]] for v in lab[ok]]
        ec = EllipseCollection(np.full(ok.sum(), diam), np.full(ok.sum(), diam), np.zeros(ok.sum()), units="xy",
                               offsets=xy[ok], offset_transform=ax.transData, facecolors=cols, edgecolors="none", alpha=alpha)
        ax.add_collection(ec)
        pad = diam
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[j] if titles is not None else keys[j], fontsize=10)
    handles = [Patch(color=pal[i], label=f"niche {v}") for i, v in enumerate(ref_levels)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(f"{section}: colours matched to {titles[0] if titles else keys[0]} (Hungarian)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    return fig


def niche_panels_table(adata: ad.AnnData, keys: Sequence[str], section: str) -> pd.DataFrame:
    """Spots per label of each key on ``section`` (a text companion to :func:`niches`)."""
    m = adata.obs[SECTION_KEY].astype(str) == section
    return pd.concat({k: adata.obs.loc[m, k].astype(str).value_counts() for k in keys}, axis=1).fillna(0).astype(int)
