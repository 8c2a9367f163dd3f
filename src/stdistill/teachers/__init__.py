"""Transcriptomic teachers: fitted on expression (+ coordinates), frozen, give soft targets to histology students."""

from __future__ import annotations

import importlib

# public name -> submodule that defines it (imported on first use, so importing the
# package stays light). Add an entry when you add a public object.
_LAZY: dict[str, str] = {
    "NicheTeacher": "niche",
    "ExpressionTeacher": "expression",
    "CountEmbedder": "expression",
    "register_embedder": "expression",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
