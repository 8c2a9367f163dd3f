"""Small shared helpers: atomic writes, seeding, devices, progress bars, digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Whatever fails inside the block, ``path`` is never left half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes | memoryview, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically with plain file I/O; raises ``OSError`` on failure.
    ``mode``: permission bits given to the file before it is renamed into place.

    Free space is checked first (``ENOSPC`` before anything is written). A write that still
    fails (quota, file-size limit) raises ``OSError`` and leaves neither ``path`` nor a temporary file.
    """
    import errno
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = memoryview(data).nbytes
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise OSError(errno.ENOSPC, f"no space left on device: needs {need / 1e6:.1f} MB, {free / 1e6:.1f} MB free")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def write_hdf5(path: str | os.PathLike, fill, mode: int | None = None) -> Path:
    """Build an HDF5 file in memory with ``fill(h5py.File)``, then :func:`write_bytes` it to ``path``.

    HDF5 never touches the disk, so a full disk or a file-size limit gives a plain ``OSError``
    instead of the crash h5py hits when closing a file whose writes failed (h5py issues 914,
    2160). Costs one copy of the (compressed) file in memory.
    """
    import io

    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    return write_bytes(path, buf.getbuffer(), mode=mode)


_UMASK: int | None = None


def umask_mode() -> int:
    """The permissions a plain new file gets under the user's umask (``0o666 & ~umask``), read once."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file written through a 0600 temporary file (:func:`atomic_path`) the permissions of the
    user's umask, as a plain write would have."""
    os.chmod(path, umask_mode())


def env_bytes(name: str, default: float, unit: int) -> int:
    """Bytes from environment variable ``name`` given in ``unit`` bytes (e.g. ``2**30`` for GB),
    ``default`` units when unset; one clear error when it is not a number."""
    from ._errors import StdistillError

    v = os.environ.get(name, "")
    try:
        return int((float(v) if v else default) * unit)
    except ValueError:
        raise StdistillError(f"${name} must be a number, got {v!r}") from None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Keep torch's CPU thread count across the block (when torch is imported).

    The first parallel numba kernel of a process (scanpy's ``highly_variable_genes`` on a sparse
    matrix) starts an OpenMP pool sized to the machine, which also resets torch's thread count,
    overriding the caller's ``torch.set_num_threads`` or ``OMP_NUM_THREADS``.
    """
    import sys

    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


PROGRESS_ENV = "STDISTILL_PROGRESS"  #: "0" turns every progress display off (``stdistill --quiet`` sets it)


def progress_enabled(quiet: bool = False) -> bool:
    """False when ``quiet`` or ``STDISTILL_PROGRESS=0``; progress goes to stderr otherwise."""
    return not quiet and os.environ.get(PROGRESS_ENV, "1") != "0"


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", disable: bool | None = None) -> Iterable[T]:
    """A rich progress bar (count, elapsed time, ETA) over ``iterable``, on stderr; silent when
    ``disable`` or ``STDISTILL_PROGRESS=0``."""
    if disable is None:
        disable = not progress_enabled()
    if disable:
        yield from iterable
        return
    with progress_display() as p:
        yield from p.track(iterable, total=total, description=desc or "working")


@contextlib.contextmanager
def progress_display(quiet: bool = False) -> Iterator:
    """A rich ``Progress`` (description, bar, done/total, elapsed, ETA) on stderr, removed when
    done; a no-op object with ``add_task``/``advance``/``update``/``track`` when progress is off."""
    if not progress_enabled(quiet):
        yield _NullProgress()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as p:
        yield p


class _NullProgress:
    """Stands in for rich's ``Progress`` when progress is off."""

    def add_task(self, *a, **k) -> int:
        return 0

    def advance(self, *a, **k) -> None:
        pass

    def update(self, *a, **k) -> None:
        pass

    def track(self, iterable, *a, **k):
        return iterable


def file_digest(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """BLAKE2b-128 hex digest of a file's bytes (memoised on path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def array_digest(arr: np.ndarray) -> str:
    """BLAKE2b-128 hex digest of an array's shape, dtype and bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((arr.shape, str(arr.dtype))).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


_DIGESTS: dict[tuple, str] = {}


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``arrays`` plus JSON ``meta`` to an .npz atomically (no pickle); returns the path.
    For intermediate files (the slide runner's chunks); models are bundles (:mod:`stdistill.bundle`)."""
    import json

    path = Path(path)
    arrays = {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


class Record(dict):
    """A dict read from a model file: a missing key is a StdistillError naming the file, not a KeyError."""

    def __init__(self, data=(), source="", what: str = "model"):  # defaults: dataclasses.asdict rebuilds it from pairs
        super().__init__(data)
        self.source, self.what = str(source), what

    def __missing__(self, key):
        from ._errors import StdistillError

        raise StdistillError(f"this saved {self.what} lacks {key!r} (written by another version, or edited?)",
                             self.source)


def as_record(obj, source, what: str):
    """``obj`` with every nested dict turned into a :class:`Record`."""
    if isinstance(obj, dict):
        return Record({k: as_record(v, source, what) for k, v in obj.items()}, source, what)
    return obj


def load_npz(path: str | os.PathLike, fmt: str, what: str) -> tuple[Record, Record]:
    """Read an .npz written by :func:`save_npz` (``allow_pickle=False``); returns ``(arrays, meta)``.

    Every array is read here, so a truncated or corrupt file is one StdistillError naming
    ``path`` (not ``BadZipFile`` later); so is a missing file, a file that is not a ``what``
    file or not of format ``fmt``, and (through :class:`Record`) a missing key.
    """
    import json

    from ._errors import StdistillError, require_file

    path = require_file(path, f"{what} file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(bytes(arrays.pop("meta")).decode())
    except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, ValueError, KeyError ...
        raise StdistillError(f"not a readable stdistill {what} file ({type(e).__name__}: {e})", path) from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise StdistillError(f"unknown format {got!r}; expected {fmt}", path)
    return Record(arrays, path, what), as_record(meta, path, what)


def check_state(own: dict, state: dict, source, what: str, strict: bool = True) -> None:
    """Check a state dict read from a file against a module's own (``net.state_dict()``): with
    ``strict``, the same names; always, equal shapes, and floating-point tensors where the module
    has them (integer weights are refused, not cast silently). Raises one StdistillError naming
    ``source``, the tensor and both shapes (or dtypes)."""
    from ._errors import StdistillError

    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own] if strict else []
    if missing or unexpected:
        parts = ([f"{len(missing)} tensors missing (e.g. {missing[0]!r})"] if missing else []) + (
            [f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})"] if unexpected else [])
        raise StdistillError(f"{what} weights do not match its config: " + "; ".join(parts), source)
    for k, got in state.items():
        want = own.get(k)
        if want is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            raise StdistillError(f"{what} weights do not match its config: tensor {k!r} has shape "
                                 f"{tuple(got.shape)} in the file, the model expects {tuple(want.shape)}", source)
        if want.is_floating_point() and not got.is_floating_point():
            raise StdistillError(f"{what} weights: tensor {k!r} is {str(got.dtype).replace('torch.', '')}, "
                                 f"expected floating point ({str(want.dtype).replace('torch.', '')})", source)


def load_state(net, state: dict, source, what: str) -> None:
    """``net.load_state_dict(state)`` (strict) after :func:`check_state`."""
    check_state(net.state_dict(), state, source, what)
    net.load_state_dict(state, strict=True)


#: Packages whose versions :func:`versions` records (a missing one is left out).
VERSIONED = ("stdistill", "torch", "timm", "anndata", "scanpy", "numpy", "peft", "lightning")


def versions(packages: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    """Installed versions of ``packages`` plus Python's, read from package metadata (no imports)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    from . import __version__

    out["stdistill"] = __version__  # the source tree in use, not whatever is installed
    return out
