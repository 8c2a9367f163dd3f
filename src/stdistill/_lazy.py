"""Lazy package namespaces: public names resolve to their submodule on first use."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping


def attach(package: str, lazy: Mapping[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """``__getattr__`` and ``__all__`` for ``package``, whose public ``name`` lives in submodule
    ``lazy[name]``. A function named like its submodule (``pl.niches``) wins over the submodule;
    other submodules are reachable as plain attributes."""

    def __getattr__(name: str):
        if name in lazy:
            obj = getattr(importlib.import_module(f".{lazy[name]}", package), name)
            vars(sys.modules[package])[name] = obj
            return obj
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(lazy)
