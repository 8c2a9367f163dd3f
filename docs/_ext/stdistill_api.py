"""Sphinx extension: one API page per public subpackage of stdistill, written at build time.

Every name a subpackage exports (its ``__all__``; for a module without ``__all__``, the public
functions and classes defined in it) gets an autosummary line and an autodoc entry, so the API
reference cannot fall behind the code. Pages go to ``docs/api/`` (generated, not committed).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "api"


def subpackages() -> list[str]:
    """The public subpackages: the module names in ``stdistill.__all__``, in that order."""
    import stdistill

    return [n for n in stdistill.__all__ if inspect.ismodule(getattr(stdistill, n, None))]


def public_names(module: str) -> list[str]:
    """``__all__`` of ``module``, else its public functions and classes defined there."""
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(mod).items() if not n.startswith("_")
                 and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module]
    return list(names)


def _directive(module: str, name: str, obj, seen: dict) -> list[str]:
    """The autodoc directive for ``module.name``; an object already documented elsewhere is an alias."""
    if inspect.isclass(obj):
        kind, opts = "autoclass", ["   :members:", "   :show-inheritance:"]
    elif callable(obj) and not inspect.ismodule(obj):
        kind, opts = "autofunction", []
    else:
        kind, opts = "autodata", ["   :no-value:"] if isinstance(obj, (dict, list, tuple)) and len(obj) > 8 else []
    first = seen.setdefault(id(obj), f"{module}.{name}") if kind != "autodata" else f"{module}.{name}"
    if first != f"{module}.{name}":  # the same object under a second name: index it once
        return [f".. py:{'class' if kind == 'autoclass' else 'function'}:: {name}", "   :no-index-entry:", "",
                f"   The same object as :obj:`{first}`.", ""]
    return [f".. {kind}:: {name}", *opts, ""]


def module_page(module: str, seen: dict) -> str:
    mod = importlib.import_module(module)
    names = public_names(module)
    title = f"``{module}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {module}", "   :no-members:", "",
             f".. currentmodule:: {module}", "", ".. autosummary::", "   :nosignatures:", ""]
    lines += [f"   {n}" for n in names] + [""]
    for n in names:
        lines += _directive(module, n, getattr(mod, n), seen)
    return "\n".join(lines)


def index_page(modules: list[str]) -> str:
    lines = ["API reference", "=============", "",
             "Every public name of ``stdistill`` and its subpackages. Each page lists what the",
             "subpackage exports (its ``__all__``), then documents each name.", "",
             ".. currentmodule:: stdistill", "",
             ".. autoexception:: StdistillError", "",
             ".. py:data:: __version__", "", "   The installed version (a string such as ``'0.2.0'``).", "",
             ".. toctree::", "   :maxdepth: 1", ""]
    lines += [f"   {m}" for m in modules] + [""]
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # unchanged pages keep their mtime (incremental builds)
        path.write_text(text)


def generate(app=None) -> list[str]:
    """Write ``api/index.rst`` and one ``api/stdistill.<sub>.rst`` per subpackage; returns the modules."""
    OUT.mkdir(exist_ok=True)
    modules = [f"stdistill.{s}" for s in subpackages()]
    seen: dict = {}
    for m in modules:
        _write(OUT / f"{m}.rst", module_page(m, seen))
    _write(OUT / "index.rst", index_page(modules))
    for stale in set(OUT.glob("*.rst")) - {OUT / f"{m}.rst" for m in modules} - {OUT / "index.rst"}:
        stale.unlink()
    return modules


def setup(app):
    app.connect("builder-inited", generate, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
