"""Datasets: real public data (HER2ST, mouse olfactory bulb) and the simulated default, all in the stdistill layout."""

from __future__ import annotations

from .._lazy import attach

# public name -> submodule that defines it (imported on first use, so importing the
# package stays light). Add an entry when you add a public object.
_LAZY: dict[str, str] = {
    "her2st": "her2st",
    "mob": "mob",
    "simulated": "simulated",
    "her2st_survival": "her2st_survival", "simulated_survival": "her2st_survival",
}

__getattr__, __all__ = attach(__name__, _LAZY)
