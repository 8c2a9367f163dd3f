"""Conventions every public function and estimator shares: the return rule and renamed keywords.

**Return rule** (scanpy's). A function or ``predict``/``transform`` that writes AnnData keys
(:mod:`stdistill.keys`) writes them in place and returns None; ``copy=True`` writes them into a
copy and returns it; ``inplace=False`` (where the natural output is an array or a frame) writes
nothing and returns that output. :func:`deliver` applies it.

**Renamed keywords.** A parameter renamed for one spelling across the package (``feature_key``,
``batch_key``, ``accelerator``) accepts its old name for one release with a
``DeprecationWarning``: :func:`renamed_kwargs`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import anndata as ad

from ._errors import StdistillError

F = TypeVar("F", bound=Callable[..., Any])


def deprecated(message: str, stacklevel: int = 3) -> None:
    """Warn once per call site that something goes in the next release (``DeprecationWarning``)."""
    warnings.warn(f"{message} (deprecated; removed in the next release)", DeprecationWarning, stacklevel=stacklevel)


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
    """Decorator: accept each old keyword ``old=new`` of ``renames`` for one release, with a
    ``DeprecationWarning``; passing both names is an error.

    >>> @renamed_kwargs(use_rep="feature_key")
    ... def f(adata, feature_key=None): ...
    """

    def deco(fn: F) -> F:
        name = fn.__qualname__.rsplit("<locals>.", 1)[-1].removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise StdistillError(f"{name}() got both {old}= and {new}=; pass only {new}=")
                deprecated(f"{name}({old}=...) is now {name}({new}=...)")
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.__renamed_kwargs__ = dict(renames)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return deco


def write_or_return(key_added: str | None, inplace: bool, where: str, stacklevel: int = 4) -> bool:
    """``inplace``, with the old spelling ``key_added=None`` ("return it, write nothing") read as
    ``inplace=False`` for one release (``DeprecationWarning``). ``stacklevel``: frames from here to
    the user's call (4: the user called the function that calls this one)."""
    if key_added is None:
        deprecated(f"{where}(key_added=None) is now {where}(inplace=False)", stacklevel=stacklevel)
        return False
    return inplace


def deliver(adata: ad.AnnData, value: Any, write: Callable[[ad.AnnData], None], *, copy: bool = False,
            inplace: bool = True) -> Any:
    """The return rule: ``write(target)`` puts ``value``'s keys into ``adata`` (returns None), into a
    copy of it (``copy=True``, returns the copy), or nowhere (``inplace=False``, returns ``value``)."""
    if copy and not inplace:
        raise StdistillError("copy=True writes into a copy and inplace=False writes nothing: pass one of them")
    if not inplace:
        return value
    target = adata.copy() if copy else adata
    write(target)
    return target if copy else None


def write_obsm(adata: ad.AnnData, value: Any, key_added: str | None, *, inplace: bool = True, copy: bool = False,
               where: str = "") -> Any:
    """The return rule for one ``obsm`` output (an array or a frame indexed like ``adata.obs``):
    ``obsm[key_added] = value`` in place (None), in a copy (returned) or nowhere (``inplace=False``:
    ``value``). ``key_added=None`` is the old spelling of ``inplace=False`` (``DeprecationWarning``)."""
    inplace = write_or_return(key_added, inplace, where, stacklevel=5)
    return deliver(adata, value, lambda target: target.obsm.__setitem__(key_added, value), copy=copy, inplace=inplace)
