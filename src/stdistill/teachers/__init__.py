"""Transcriptomic teachers: fitted on expression (+ coordinates), frozen, give soft targets to histology students."""

from __future__ import annotations

from .._lazy import attach

# public name -> submodule that defines it (imported on first use, so importing the
# package stays light). Add an entry when you add a public object.
_LAZY: dict[str, str] = {
    "NicheTeacher": "niche",
    "ConsensusMixture": "_consensus",
    **dict.fromkeys(("teacher_stability", "summarise_stability", "spot_agreement"), "_stability"),
    "ExpressionTeacher": "expression",
    "CountEmbedder": "expression",
    "register_embedder": "expression",
}

__getattr__, __all__ = attach(__name__, _LAZY)
