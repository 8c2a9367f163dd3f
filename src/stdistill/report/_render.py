"""HTML from the collected report contents: a jinja2 template shipped with the package, figures
embedded as base64 PNG so the page is one self-contained file."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from .._errors import StdistillError
from .._utils import atomic_path, versions
from ._collect import collect
from ._common import MAX_FIGURES

TEMPLATE = "report.html.j2"


def _environment():
    try:
        import jinja2
    except ImportError:
        raise StdistillError("stdistill report needs jinja2: pip install 'stdistill[report]'") from None
    return jinja2.Environment(loader=jinja2.PackageLoader("stdistill.report", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)


def _embed(paths: list[Path], root: Path) -> list[dict]:
    """``[{"title", "src"}]`` with each PNG as a ``data:`` URI."""
    out = []
    for p in paths[:MAX_FIGURES]:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        out.append({"title": str(p.relative_to(root)), "src": f"data:image/png;base64,{data}"})
    return out


def render(run_dir: str | os.PathLike) -> str:
    """The report of ``run_dir`` as one HTML string (see :func:`write_report`)."""
    root = Path(run_dir)
    info = collect(root)
    figures = info.pop("figures")
    if len(figures) > MAX_FIGURES:
        info["notes"].append(f"{len(figures)} figures found; the first {MAX_FIGURES} are shown.")
    return _environment().get_template(TEMPLATE).render(
        **info, figures=_embed(figures, root), folder=str(root.resolve()),
        made=time.strftime("%Y-%m-%d %H:%M"), report_versions=versions(), licence_reference=_licences())


def _licences() -> list[dict]:
    """Every registered encoder's licence, for the reference table."""
    from ..encoders import list_encoders

    t = list_encoders()
    return [{"name": n, "licence": r["licence"], "restricts": bool(r["restricts_derivatives"])} for n, r in t.iterrows()]


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write one self-contained HTML report for a ``stdistill predict`` folder or a benchmark folder.

    Parameters
    ----------
    run_dir
        A ``stdistill predict`` output folder (``run.json`` + ``<slide>.h5ad`` + ``maps/``) or a
        benchmark folder (``results.csv``, ``table.md``, PNG figures; ``run.json``/``meta.json``
        with ``command``, ``versions``, ``encoder`` when present).
    out
        HTML file to write (default ``run_dir/report.html``); written to a temporary file, then renamed.

    Returns
    -------
    The path written.
    """
    html = render(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path
