"""Plots (matplotlib). Each function returns the Figure and writes a PNG when given a path."""

from __future__ import annotations

from .._lazy import attach

# public name -> submodule that defines it (imported on first use, so importing the
# package stays light). Add an entry when you add a public object.
_LAZY: dict[str, str] = {
    "niches": "_niches",
    "niche_panels_table": "_niches",
    "niche_maps_per_section": "_niches",
    "NICHE_PALETTE": "_common",
    "expression_maps": "_expression",
    "pearson_bars": "_expression",
    "pathways": "_pathways",
    "pathway_bars": "_pathways",
    "km_risk_groups": "_survival",
    "survival_attention": "_survival",
    "cindex_bars": "_survival",

}

__getattr__, __all__ = attach(__name__, _LAZY)
