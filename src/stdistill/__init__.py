"""stdistill: learn from paired spatial transcriptomics + H&E, then run on H&E alone.

Submodules follow scverse conventions: ``io`` (readers), ``datasets``, ``pp`` (patches,
tiling, neighbours, splits), ``encoders`` (registry), ``features`` (extraction + cache),
``teachers``, ``students``, ``losses``, ``metrics``, ``bench``, ``recipes``, ``pl``,
``bundle`` (saved students), ``slide`` (whole-slide prediction), ``report`` (HTML summaries),
``select`` (settings chosen on inner patients), ``adapters`` (adapted encoders) and ``keys`` (every
AnnData key the package writes).
"""

from __future__ import annotations

import importlib

from ._errors import StdistillError

__version__ = "0.2.0"  # the one place the version is set (pyproject.toml reads it)

_SUBMODULES = {
    "io", "pp", "datasets", "encoders", "features", "teachers", "students",
    "losses", "metrics", "bench", "recipes", "pl", "bundle", "slide", "report", "select", "adapters", "keys",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'stdistill' has no attribute {name!r}")


__all__ = ["StdistillError", "__version__", *sorted(_SUBMODULES)]
