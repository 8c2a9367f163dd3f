"""Pieces every report kind uses: tables and numbers as strings, figures and JSON from a folder,
licence rows per encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .._errors import StdistillError

#: Most figures and table rows a report embeds (a larger folder is cut, with a note).
MAX_FIGURES, MAX_ROWS = 40, 200


def _table(title: str, frame: pd.DataFrame, caption: str = "") -> dict:
    """A table for the template: column names and rows of strings."""
    cut = len(frame) > MAX_ROWS
    frame = frame.head(MAX_ROWS)
    rows = [[_fmt(v) for v in r] for r in frame.itertuples(index=False)]
    if cut:
        caption = f"{caption} (first {MAX_ROWS} rows)".strip()
    return {"title": title, "caption": caption, "columns": [str(c) for c in frame.columns], "rows": rows}


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def _spread(x: np.ndarray) -> str:
    """``"mean +- sd"`` (sample sd; ``n = 1`` shows the mean alone)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return ""
    return f"{x.mean():.4g}" if x.size == 1 else f"{x.mean():.4g} +- {x.std(ddof=1):.3g}"


def encoder_rows(names: list[str], recorded: dict | None = None) -> list[dict]:
    """Licence facts per encoder name: the registry's entry, else what the run recorded."""
    from ..encoders import get_spec

    rows = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            s = get_spec(name)
            lic, restricts, note = s.licence, s.restricts_derivatives, s.notes
        except StdistillError:
            rec = recorded or {}
            lic, restricts, note = rec.get("licence", "unknown"), None, "not in this installation's encoder registry"
        if restricts:
            use = "non-commercial only; students distilled from it count as derivatives (no derivatives)"
        elif restricts is None:
            use = "unknown: read the model card"
        else:
            use = "no restriction on distilled students from the licence"
        rows.append({"name": name, "licence": lic, "use": use, "restricts": bool(restricts), "note": note})
    return rows


def _figures(folder: Path) -> list[Path]:
    """PNG files in ``folder`` and its sub-folders (two levels), in path order."""
    found = sorted({*folder.glob("*.png"), *folder.glob("*/*.png"), *folder.glob("*/*/*.png")})
    return [p for p in found if not p.name.startswith(".")]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StdistillError(f"unreadable JSON ({type(e).__name__}: {e})", path) from None
