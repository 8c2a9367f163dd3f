"""One row of numbers per slide, for a cohort's ``summary.csv``.

:data:`SUMMARIES` maps an output kind (a key of the outputs a predictor returns) to a function
``(annotated tiles, bundle) -> {column: value}``; a new kind of model adds its entry here.
Slide-level values a predictor found (a survival model's ``risk``, ``risk_group`` and the
``risk_cut`` stored in its bundle) come first.
"""

from __future__ import annotations

import numpy as np


def niche_shares(a, bundle) -> dict:
    """``share <niche>``: the share of the slide's tissue tiles predicted in each niche."""
    names = a.obs["niche_pred_name"] if "niche_pred_name" in a.obs else a.obs["niche_pred"]
    codes = names.cat.codes.to_numpy()
    counts = np.bincount(codes[codes >= 0], minlength=len(names.cat.categories))
    total = max(int(counts.sum()), 1)
    return {f"share {lab}": round(float(c) / total, 6) for lab, c in zip(names.cat.categories, counts)}


def mean_values(key: str):
    """``mean <output>``: the mean predicted value of each gene or pathway over tissue tiles."""
    def summary(a, bundle) -> dict:
        frame = a.obsm[key]
        return {f"mean {c}": round(float(v), 6) for c, v in frame.mean(axis=0, skipna=True).items()}
    return summary


#: output kind -> per-slide summary values
SUMMARIES = {"niches": niche_shares, "genes": mean_values("genes_pred"), "pathways": mean_values("pathways_pred"),
             "uncertainty": mean_values("uncertainty_pred")}


def slide_summary(a, bundle, kinds) -> dict:
    """Summary values of every output kind in ``kinds`` that :data:`SUMMARIES` knows."""
    row: dict = dict(a.uns.get("predict", {}).get("slide", {}))
    for kind in kinds:
        if kind in SUMMARIES:
            row.update(SUMMARIES[kind](a, bundle))
    return row
