"""What a report shows, gathered from a run folder into plain dicts (no HTML here)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .._errors import StdistillError
from ._common import _figures, _fmt, _read_json, _spread, _table, encoder_rows

#: Columns of a results table that name a replicate (rows averaged over), not a method.
REPLICATE_COLUMNS = ("fold", "seed", "split", "repeat", "test_patient", "patient", "section", "sample")
def is_predict_run(folder: Path) -> bool:
    """A ``stdistill predict`` output folder: ``run.json`` naming a slide beside the ``.h5ad``."""
    run = folder / "run.json"
    return run.is_file() and "slide" in _read_json(run) and any(folder.glob("*.h5ad"))


def collect(run_dir: str | os.PathLike) -> dict:
    """Everything the report shows for ``run_dir`` (a predict output or a benchmark folder).

    Returns a dict with ``title``, ``kind``, ``run`` (label/value rows), ``versions``,
    ``encoders`` (licence rows), ``tables``, ``figures`` (paths) and ``notes``.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise StdistillError("run folder does not exist" if not folder.exists() else "run folder expected, got a file",
                             folder)
    if is_predict_run(folder):
        from ._predict import collect_predict

        return collect_predict(folder)
    return collect_benchmark(folder)


def _about(folder: Path) -> dict:
    """``run.json`` or ``meta.json`` of a benchmark folder, when there is one."""
    for name in ("run.json", "meta.json"):
        if (folder / name).is_file():
            return _read_json(folder / name)
    return {}


def _group_columns(res: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """(method columns, replicate columns, numeric metric columns) of a results table."""
    reps = [c for c in res.columns if str(c).lower() in REPLICATE_COLUMNS]
    numeric = [c for c in res.columns if c not in reps and pd.api.types.is_numeric_dtype(res[c])
               and res[c].notna().any()]
    methods = [c for c in res.columns if c not in reps and c not in numeric and res[c].nunique() < len(res)]
    return methods, reps, numeric


def summarise_results(res: pd.DataFrame) -> pd.DataFrame:
    """Every numeric column as ``mean +- sd`` over replicate rows (folds, seeds), per method."""
    methods, reps, numeric = _group_columns(res)
    if not numeric:
        return pd.DataFrame()
    groups = res.groupby(methods, sort=False, dropna=False) if methods else [((), res)]
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(methods, key))
        row["n rows"] = len(g)
        row.update({c: _spread(g[c].to_numpy()) for c in numeric})
        rows.append(row)
    return pd.DataFrame(rows)


def _markdown_tables(text: str) -> list[pd.DataFrame]:
    """The pipe tables of a Markdown file, each with the paragraph line above it as ``attrs['title']``."""
    tables, block, title, last_text = [], [], "", ""
    for line in [*text.splitlines(), ""]:
        s = line.strip()
        if s.startswith("|") and s.endswith("|"):
            if not block:
                title = last_text
            block.append([c.strip() for c in s.strip("|").split("|")])
            continue
        if len(block) >= 2:
            body = [r for r in block[2:] if len(r) == len(block[0])]
            t = pd.DataFrame(body, columns=block[0])
            t.attrs["title"] = title
            tables.append(t)
        block = []
        if s:
            last_text = s
    return tables


def collect_benchmark(folder: Path) -> dict:
    """A benchmark or other run folder: ``results.csv`` summarised per method, other ``*.csv``
    tables, ``table.md`` tables, PNG figures."""
    about = _about(folder)
    tables, notes, encoders = [], [], []
    res_path = folder / "results.csv"
    if res_path.is_file():
        try:
            res = pd.read_csv(res_path)
        except Exception as e:
            raise StdistillError(f"unreadable results table ({type(e).__name__}: {e})", res_path) from None
        summary = summarise_results(res)
        _, reps, _ = _group_columns(res)
        if len(summary):
            over = ", ".join(reps) if reps else "rows"
            tables.append(_table("Metrics (mean +- sd)", summary, f"from results.csv; spread over {over}"))
        if "encoder" in res.columns:
            encoders = sorted(res["encoder"].dropna().astype(str).unique())
    for extra in sorted(folder.glob("*.csv"))[:8]:  # other runs' tables (e.g. niches evaluate --out-dir)
        if extra.name == "results.csv":
            continue
        try:
            t = pd.read_csv(extra)
        except Exception:  # noqa: BLE001 - a CSV we cannot parse is left out, not fatal
            notes.append(f"{extra.name} could not be read as a table and is not shown.")
            continue
        tables.append(_table(extra.stem, t, f"from {extra.name}"))
    md = folder / "table.md"
    if md.is_file():
        for t in _markdown_tables(md.read_text()):
            tables.append(_table(t.attrs.get("title") or "table.md", t, "from table.md"))
    figures = _figures(folder)
    if not tables and not figures:
        raise StdistillError("nothing to report: no run.json with an .h5ad (stdistill predict), CSV tables, "
                             "table.md or PNG figures", folder)
    encoders = [*encoders, *([about["encoder"]] if isinstance(about.get("encoder"), str) else [])]
    if not encoders:
        notes.append("The folder does not record which encoder made the features; check its licence before use.")
    run = [("folder", folder.name), ("kind", "benchmark results")]
    run += [(k, _fmt(v)) for k, v in about.items() if k not in ("versions", "encoder") and not isinstance(v, (dict, list))]
    return {"title": f"stdistill benchmark: {folder.name}", "kind": "benchmark", "command": about.get("command", ""),
            "run": run, "versions": about.get("versions", {}), "encoders": encoder_rows(encoders),
            "tables": tables, "figures": figures, "notes": notes}
