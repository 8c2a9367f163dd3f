"""Distillation recipes: each composes io/pp/encoders/features/teachers/students/losses/metrics/pl."""

from __future__ import annotations

import importlib
import importlib.util

# public name -> submodule that defines it (imported on first use, so importing the
# package stays light). Add an entry when you add a public object.
_LAZY: dict[str, str] = {
    "run_niches": "niches",
    "peka": "peka",
    "PEKA": "peka",
    "PekaConfig": "peka",
    "select_peka": "peka",

}


def __getattr__(name: str):
    if name in _LAZY:
        obj = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = obj  # a function named like its submodule must win over the submodule
        return obj
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # plain submodule access
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
