"""Datasets: real public data (HER2ST, mouse olfactory bulb) and the simulated default, all in the stdistill layout."""

from __future__ import annotations

import importlib

# public name -> submodule that defines it (imported on first use, so importing the
# package stays light). Add an entry when you add a public object.
_LAZY: dict[str, str] = {
    "her2st": "her2st",
    "mob": "mob",
    "simulated": "simulated",
}


def __getattr__(name: str):
    if name in _LAZY:
        obj = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = obj  # importing the submodule of the same name set it here: the function wins
        return obj
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
