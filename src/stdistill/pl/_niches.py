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
from ._common import _one_section, niche_colours


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
    names: Sequence[str] | None = None,
):
    """Spots coloured by niche on the section's H&E thumbnail, one panel per ``obs`` key.

    Colours come from :data:`stdistill.pl.NICHE_PALETTE` (visible on H&E; the slide maps use the
    same). The legend sits outside the panels, on the right, with the reference's niches.

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
        Write a PNG here (atomically; cropped to its content, so the legend is never clipped).
    names
        Legend labels of the reference's niches "0", "1", ..., e.g. a student's
        ``info_["niche_names"]`` (``"0: ERBB2/KRT19/..."``, the teacher's top marker genes).

    Returns
    -------
    matplotlib Figure.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    keys = list(keys)
    if not keys:
        raise StdistillError("pl.niches needs at least one obs key")
    for k in keys:
        if k not in adata.obs:
            raise StdistillError(f'AnnData has no obs["{k}"] to plot')
    section, m = _one_section(adata, section)
    img, xy, diam = _spot_layout(adata, section, m, spot_scale)
    labs = [adata.obs[k].astype(str).to_numpy()[m] for k in keys]
    ref_levels, maps, n_colours = _colour_maps(labs)
    pal = niche_colours(max(n_colours, 1))

    n = len(keys)
    fig = Figure(figsize=(panel_size * n + 1.6, panel_size + 0.6))
    axes = fig.subplots(1, n, squeeze=False)
    for j, (ax, lab, cm) in enumerate(zip(axes[0], labs, maps)):
        _draw_panel(ax, img, xy, diam, [pal[cm[v]] if v != "nan" else None for v in lab], alpha)
        ax.set_title(titles[j] if titles is not None else keys[j], fontsize=10)
    handles = [Patch(color=pal[i], label=_legend_label(v, names)) for i, v in enumerate(ref_levels)]
    axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                       title=titles[0] if titles else keys[0], title_fontsize=8)
    matched = " (colours matched to the first, Hungarian)" if n > 1 else ""
    fig.suptitle(f"{section}{matched}", fontsize=10)
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return fig


def _legend_label(level: str, names: Sequence[str] | None) -> str:
    """``"niche 3: ERBB2/KRT19"`` from level ``"3"`` and its name; the number alone without names."""
    if names is not None and level.isdigit() and int(level) < len(names):
        n = str(names[int(level)])
        return n if n.startswith("niche") else f"niche {n}"
    return level if level.startswith("niche") else f"niche {level}"


def _spot_layout(adata: ad.AnnData, section: str, m: np.ndarray, spot_scale: float):
    """Thumbnail (or None), spot centres on it and the spot diameter in its pixels (from the spot
    size, else 0.8 x the median nearest-spot distance)."""
    lib = adata.uns.get(SPATIAL_KEY, {}).get(section, {})
    sf = lib.get("scalefactors", {})
    img = lib.get("images", {}).get("hires")
    scale = float(sf.get("tissue_hires_scalef", 1.0)) if img is not None else 1.0
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)[m] * scale
    diam = float(sf.get("spot_diameter_fullres", 0) or 0) * scale * spot_scale
    if diam <= 0:
        from sklearn.neighbors import NearestNeighbors

        d = NearestNeighbors(n_neighbors=2).fit(xy).kneighbors(xy)[0][:, 1] if len(xy) > 1 else np.array([10.0])
        diam = 0.8 * float(np.median(d)) * spot_scale
    return img, xy, diam


def _colour_maps(labs: list[np.ndarray]) -> tuple[list[str], list[dict], int]:
    """Reference levels, one label -> colour index map per panel (matched to the first), colours used."""
    ref_levels = sorted(set(labs[0][labs[0] != "nan"]), key=_natural)
    maps = [{v: i for i, v in enumerate(ref_levels)}]
    extra = len(ref_levels)
    for lab in labs[1:]:
        cm = _matched_colours(labs[0], lab, ref_levels, extra)
        extra = max([extra, *[c + 1 for c in cm.values()]])
        maps.append(cm)
    return ref_levels, maps, extra


def _draw_panel(ax, img, xy: np.ndarray, diam: float, colours: list, alpha: float) -> None:
    """Spots (``None`` colour: unlabelled, not drawn) as discs of ``diam`` over the thumbnail."""
    from matplotlib.collections import EllipseCollection

    if img is not None:
        ax.imshow(np.asarray(img))
    else:
        ax.set_facecolor("white")
    ok = np.array([c is not None for c in colours], dtype=bool)
    k = int(ok.sum())
    ec = EllipseCollection(np.full(k, diam), np.full(k, diam), np.zeros(k), units="xy", offsets=xy[ok],
                           offset_transform=ax.transData, facecolors=[c for c in colours if c is not None],
                           edgecolors="none", alpha=alpha)
    ax.add_collection(ec)
    ax.set_xlim(xy[:, 0].min() - diam, xy[:, 0].max() + diam)
    ax.set_ylim(xy[:, 1].max() + diam, xy[:, 1].min() - diam)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def niche_maps_per_section(adata: ad.AnnData, keys: Sequence[str], path: str | os.PathLike, **kwargs) -> list[str]:
    """:func:`niches` for every section: ``path`` itself with one section, else ``<stem>_<section><suffix>``
    beside it. Returns the paths written."""
    from ..io._section import sections, subset_sections

    secs = sections(adata)
    base = os.fspath(path)
    stem, suffix = os.path.splitext(base)
    out = []
    for s in secs:
        p = base if len(secs) == 1 else f"{stem}_{s}{suffix or '.png'}"
        niches(subset_sections(adata, [s]), keys, section=s, path=p, **kwargs)
        out.append(p)
    return out


def niche_panels_table(adata: ad.AnnData, keys: Sequence[str], section: str) -> pd.DataFrame:
    """Spots per label of each key on ``section`` (a text companion to :func:`niches`)."""
    m = adata.obs[SECTION_KEY].astype(str) == section
    return pd.concat({k: adata.obs.loc[m, k].astype(str).value_counts() for k in keys}, axis=1).fillna(0).astype(int)
