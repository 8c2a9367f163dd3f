"""JSON helpers shared by bundles, records and reports."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np


def jsonable(x: Any, finite: bool = False) -> Any:
    """``x`` with NumPy scalars/arrays, tuples and paths turned into plain JSON types; with
    ``finite``, NaN and infinite floats become ``None`` (JSON has no such numbers)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v, finite) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, finite) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist(), finite)
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, os.PathLike):
        return str(x)
    if finite and isinstance(x, float) and not math.isfinite(x):
        return None
    return x
