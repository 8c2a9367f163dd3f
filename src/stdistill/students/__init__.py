"""Histology-only students: distilled from transcriptomic teachers, run on H&E features alone."""

from __future__ import annotations

from .._lazy import attach

# public name -> submodule that defines it (imported on first use, so importing the
# package stays light). Add an entry when you add a public object.
_LAZY: dict[str, str] = {
    "NicheStudent": "niche",
    "NicheStudentConfig": "niche",
    "refine_niches": "_refine",
    "propagate_labels": "_refine",
    "gmm_refine": "_refine",
    "choose_refinement": "_refine",
    "DEFAULT_REFINE_GRID": "_refine",
}

__getattr__, __all__ = attach(__name__, _LAZY)
