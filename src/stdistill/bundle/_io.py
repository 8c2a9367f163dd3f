"""Writing and reading bundle folders: the one way every estimator is saved and loaded.

The estimator supplies its parts (see :mod:`stdistill.bundle`); this module owns the files, the
checks and the errors. Nothing named in a file is imported: the format -> class table is ours.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .._errors import StdistillError
from .._json import jsonable
from .._utils import Record, as_record
from ._format import Bundle

CONFIG, WEIGHTS = "config.json", "model.safetensors"

#: config.json ``"format"`` -> (module, class, recipe) of the estimator that reads it.
_READERS = {
    "stdistill.NicheStudent/1": ("stdistill.students.niche", "NicheStudent", "niches"),
    "stdistill.PEKA/1": ("stdistill.recipes._peka", "PEKA", "peka"),
    "stdistill.STAMP/1": ("stdistill.recipes._stamp", "STAMP", "stamp"),
    "stdistill.HestRidge/2": ("stdistill.bench._probe", "HestRidge", "probe"),
    "stdistill.GenST/2": ("stdistill.recipes._genst._model", "GenST", "genst"),
    "stdistill.SurvivalModel/2": ("stdistill.recipes._survival._model", "SurvivalModel", "survival"),
    "stdistill.NicheTeacher/2": ("stdistill.teachers.niche", "NicheTeacher", "niche_teacher"),
    "stdistill.ExpressionTeacher/2": ("stdistill.teachers.expression", "ExpressionTeacher", "expression_teacher"),
}

#: formats older versions wrote outside bundles -> (what it is, how to write it again)
_OLD = {
    "stdistill.PEKA/1": ("a single-file PEKA model", "train it again with `stdistill expression peka ... -o FOLDER` "
                         "or PEKA(...).fit(...).save(FOLDER)"),
    "stdistill.STAMP/1": ("a single-file STAMP model", "train it again with `stdistill pathways stamp ... -o FOLDER` "
                          "or STAMP(...).fit(...).save(FOLDER)"),
    "stdistill.HestRidge/1": ("an .npz frozen probe (HestRidge)", "fit it again with `stdistill expression probe DATA "
                              "--feature-key KEY -o FOLDER` or HestRidge().fit(X, Y, genes, features=record).save(FOLDER)"),
    "stdistill.ExpressionTeacher/1": ("an .npz ExpressionTeacher", "fit it again and save it with "
                                      'ExpressionTeacher("pca").fit(adata).save(FOLDER)'),
    "stdistill.GenST/1": ("a GenST model folder without a bundle record", "train it again with "
                          "`stdistill genst fit ... -o FOLDER` or GenST(...).fit(...).save(FOLDER)"),
    "stdistill.SurvivalModel/1": ("a survival model folder without a bundle record", "train it again with "
                                  "`stdistill survival fit ... -o FOLDER` or SurvivalModel(...).fit(...).save(FOLDER)"),
    "stdistill.NicheTeacher/1": ("a niche teacher folder without a bundle record", "fit it again with "
                                 "`stdistill niches teacher ... --model FOLDER` or NicheTeacher(...).fit(...).save(FOLDER)"),
}
_OLD_SUFFIXES = (".safetensors", ".npz")


def _old(fmt, path: Path) -> StdistillError:
    what, how = _OLD.get(fmt, ("a model file from an older stdistill", "train it again and save it as a folder"))
    return StdistillError(f"this is {what} written by an older stdistill; models are bundle folders now "
                          f"({CONFIG} + {WEIGHTS}): {how}", path)


# ---------------------------------------------------------------------------------------------- write
def check_target(path: str | os.PathLike) -> Path:
    """Refuse ``path`` as a place to save a model unless it is free, an empty folder or a bundle
    (which is replaced): one StdistillError naming it. Call it before a long fit."""
    path = Path(path)
    if path.suffix in _OLD_SUFFIXES:
        raise StdistillError(f"a model is saved as a folder ({CONFIG} + {WEIGHTS}); give a folder name "
                             f"without the {path.suffix} suffix", path)
    if path.is_dir():
        if any(path.iterdir()) and not _is_bundle(path):
            raise StdistillError("exists and is not a model bundle (it holds other files); choose another folder "
                                 "or remove it", path)
    elif path.exists() or path.is_symlink():
        raise StdistillError("exists and is a file, not a model bundle folder; choose another path or remove it", path)
    return path


def _is_bundle(path: Path) -> bool:
    try:
        fmt = json.loads((path / CONFIG).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return False
    return fmt in _READERS or fmt in _OLD


def _tensors(parts: dict) -> tuple[dict, list[str]]:
    """Torch tensors (CPU, contiguous, own memory) for safetensors from tensors or NumPy arrays,
    and the names of the arrays held in Fortran order (restored on reading: BLAS results depend
    on the memory order, so this keeps a reloaded model's numbers bit-identical)."""
    import torch

    out, fortran = {}, []
    for k, v in parts.items():
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "fiub":
                raise StdistillError(f"array {k!r} has dtype {v.dtype}; only numbers go to {WEIGHTS}")
            if v.ndim > 1 and v.flags.f_contiguous and not v.flags.c_contiguous:
                fortran.append(str(k))
            v = torch.from_numpy(np.ascontiguousarray(v))
        out[str(k)] = v.detach().cpu().clone().contiguous()
    return out, fortran


def _write_folder(path: Path, config: dict, tensors: dict, fortran: list[str]) -> None:
    """``path/config.json`` + ``path/model.safetensors``, written in a temporary sibling folder and
    renamed onto ``path`` (an existing bundle there is replaced only once the new one is complete)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"fortran_order": json.dumps(fortran)})
        (tmp / CONFIG).write_text(json.dumps(config, indent=1, allow_nan=False))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "m")
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old / "m", path)
            raise
    finally:
        for p in (tmp, old):
            if p is not None and p.exists():
                shutil.rmtree(p, ignore_errors=True)


def save_bundle(model, path: str | os.PathLike) -> Path:
    """Write a fitted estimator as a bundle folder (``config.json`` + ``model.safetensors``),
    atomically; returns ``path``. Refuses (one StdistillError) a path ending in ``.safetensors``
    or ``.npz`` and an existing file or non-bundle folder; an existing bundle is replaced."""
    path = check_target(path)
    fmt = getattr(type(model), "_bundle_format", None)
    if fmt not in _READERS or _READERS[fmt][1] != type(model).__name__:
        raise StdistillError(f"{type(model).__name__} cannot be saved as a bundle")
    config, tensors, record = model._bundle_parts()
    if record.get("recipe") != _READERS[fmt][2]:
        raise StdistillError(f"{type(model).__name__}: record recipe {record.get('recipe')!r} is not {_READERS[fmt][2]!r}")
    clash = {"format", "bundle"} & set(config)
    if clash:
        raise StdistillError(f"{type(model).__name__}: its config may not use the keys {sorted(clash)}")
    doc = jsonable({"format": fmt, "bundle": record, **config}, finite=True)
    try:
        _write_folder(path, doc, *_tensors(tensors))
    except OSError as e:
        raise StdistillError(f"cannot write the model ({e.strerror or e}); nothing was left at the target", path) from None
    return path


# ---------------------------------------------------------------------------------------------- read
def _peek_file(path: Path) -> str | None:
    """The format recorded in an older single-file model (safetensors metadata or an .npz's meta)."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return json.loads(bytes(z["meta"]).decode()).get("format")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - corrupt or foreign files
        return None


def _read_config(path: Path) -> dict:
    if path.is_file():
        if path.suffix in _OLD_SUFFIXES:
            fmt = _peek_file(path)
            if fmt in _OLD:
                raise _old(fmt, path)
            raise StdistillError(f"not a stdistill model: a {path.suffix} file, not a bundle folder "
                                 f"({CONFIG} + {WEIGHTS})", path)
        raise StdistillError(f"not a model bundle: a file, not a folder with {CONFIG} + {WEIGHTS}", path)
    if not path.is_dir():
        raise StdistillError(f"no such model bundle (expected a folder with {CONFIG} + {WEIGHTS})", path)
    if not (path / CONFIG).is_file():
        raise StdistillError(f"not a model bundle ({CONFIG} missing)", path)
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise StdistillError(f"{CONFIG} is unreadable ({type(e).__name__}: {e})", path) from None
    if not isinstance(config, dict):
        raise StdistillError(f"{CONFIG} is not a JSON object", path)
    return config


def _reader(config: dict, path: Path, expect: type | None):
    fmt = config.get("format")
    if not isinstance(fmt, str) or fmt not in _READERS:
        if isinstance(fmt, str) and fmt in _OLD and "bundle" not in config:
            raise _old(fmt, path)
        raise StdistillError(f"not a stdistill model bundle (format {str(fmt)[:80]!r}; known: {sorted(_READERS)})", path)
    module, name, recipe = _READERS[fmt]
    if expect is not None and expect.__name__ != name:
        raise StdistillError(f"this is a {name} bundle, not a {expect.__name__} one; load it with {name}.load "
                             "or stdistill.bundle.load_bundle", path)
    record = config.get("bundle")
    if not isinstance(record, dict):
        raise StdistillError(f"{CONFIG} has no bundle record", path)
    if record.get("recipe") != recipe:
        raise StdistillError(f"{CONFIG}: a {fmt} model must have recipe {recipe!r}, not {str(record.get('recipe'))[:80]!r}",
                             path)
    return getattr(importlib.import_module(module), name)


def _read_tensors(path: Path) -> dict:
    """CPU tensors of ``model.safetensors``; arrays saved in Fortran order come back in it."""
    from safetensors import safe_open

    if not (path / WEIGHTS).is_file():
        raise StdistillError(f"not a complete model bundle ({WEIGHTS} missing)", path)
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            fortran = json.loads((fh.metadata() or {}).get("fortran_order", "[]"))
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files
        raise StdistillError(f"{WEIGHTS} is unreadable ({type(e).__name__}: {str(e)[:200]})", path) from None
    for k in fortran if isinstance(fortran, list) else ():
        t = tensors.get(k)
        if t is not None and t.ndim > 1:
            rev = tuple(reversed(range(t.ndim)))
            tensors[k] = t.permute(rev).contiguous().permute(rev)
    return tensors


def load_bundle(path: str | os.PathLike, *, device: str = "cpu", encoder=None, expect: type | None = None,
                **load_kw) -> Bundle:
    """Load any saved estimator (a bundle folder); returns :class:`Bundle` (path, model, record).

    ``encoder``: a name or loaded Encoder for adapted-encoder models whose encoder is not in the
    registry; ``expect``: refuse a bundle of another class; ``load_kw``: passed to the
    estimator's ``_from_bundle`` (e.g. ``cache_dir`` for PEKA/STAMP). Every problem (missing or
    unreadable files, an unknown format, an older single-file or record-less model, tensors that
    do not fit the config) is one StdistillError naming ``path``.
    """
    path = Path(path)
    config = _read_config(path)
    cls = _reader(config, path, expect)
    tensors = _read_tensors(path)
    what = cls.__name__
    rec = as_record(config, path, what)
    record = rec.pop("bundle")
    rec.pop("format")
    try:
        model = cls._from_bundle(rec, Record(tensors, path, what), record, path, device=device, encoder=encoder,
                                 **load_kw)
    except StdistillError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise StdistillError(f"the saved {what} does not fit its config ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})", path) from None
    return Bundle(path, model, dict(config["bundle"]))


def check_shapes(tensors: dict, shapes: dict[str, tuple], path, what: str) -> dict[str, int]:
    """Check arrays read from a bundle: ``shapes`` maps a name to its shape (``None``: any), each
    entry an int or a letter that must stand for the same size everywhere (optional names end in
    ``?``); every array named must be floating point. Returns the letters' sizes. One StdistillError naming the array."""
    dims: dict[str, int] = {}
    for name, want in shapes.items():
        key = name.rstrip("?")
        if key not in tensors:
            if name.endswith("?"):
                continue
            raise StdistillError(f"this saved {what} lacks the array {key!r}", path)
        got = tuple(tensors[key].shape)
        ok = want is None or len(got) == len(want)
        for g, w in zip(got, want) if ok and want is not None else ():
            ok = ok and (g == dims.setdefault(w, g) if isinstance(w, str) else g == w)
        if not ok:
            sizes = tuple(dims.get(w, w) if isinstance(w, str) else w for w in want)
            raise StdistillError(f"{what} array {key!r} has shape {got} in the file, its config needs {sizes}", path)
        if not tensors[key].is_floating_point():
            raise StdistillError(f"{what} array {key!r} is {str(tensors[key].dtype).replace('torch.', '')}, "
                                 "expected floating point", path)
    return dims


class Bundled:
    """Mixin giving an estimator that follows the bundle protocol its ``save`` and ``load``."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted estimator as the bundle folder ``path`` (``config.json`` +
        ``model.safetensors``, atomically; see :mod:`stdistill.bundle`). Returns ``path``."""
        return save_bundle(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, **load_kw):
        """Load an estimator written by :meth:`save` (safetensors + JSON; nothing is unpickled).
        ``load_kw``: see :func:`load_bundle` (``device``, ``encoder``, ...)."""
        return load_bundle(path, expect=cls, **load_kw).model
