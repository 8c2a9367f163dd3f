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


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically with plain file I/O; raises ``OSError`` on failure.

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
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def write_hdf5(path: str | os.PathLike, fill) -> Path:
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
    return write_bytes(path, buf.getbuffer())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover
        pass


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", disable: bool | None = None) -> Iterable[T]:
    """A rich progress bar over ``iterable``; silent when not attached to a terminal or disabled."""
    if disable is None:
        disable = os.environ.get("STDISTILL_PROGRESS", "1") == "0"
    if disable:
        return iterable
    from rich.progress import track

    return track(iterable, total=total, description=desc or "working", transient=True)


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
    """Write ``arrays`` plus JSON ``meta`` to an .npz atomically (no pickle); returns the path."""
    import json

    path = Path(path)
    arrays = {**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load_npz(path: str | os.PathLike, fmt: str, what: str):
    """Read an .npz written by :func:`save_npz` (``allow_pickle=False``); returns ``(arrays, meta)``.

    Raises StdistillError naming ``path`` when it is not a ``what`` file or not of format ``fmt``.
    """
    import json

    from ._errors import StdistillError

    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError) as e:
        raise StdistillError(f"not a stdistill {what} file ({e})", path) from None
    if meta.get("format") != fmt:
        raise StdistillError(f"unknown format {meta.get('format')!r}; expected {fmt}", path)
    return z, meta


def save_safetensors_dir(path: str | os.PathLike, weights: str, tensors: dict, config: dict, framework: str = "pt") -> Path:
    """Write ``path/<weights>`` (safetensors; ``framework`` "pt" for torch tensors, "numpy" for
    arrays) and ``path/config.json``, each atomically; returns ``path``."""
    import json

    if framework == "pt":
        from safetensors.torch import save_file
    else:
        from safetensors.numpy import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / weights) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(path / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=1))
    return path


def load_safetensors_dir(path: str | os.PathLike, weights: str, fmt: str, what: str, framework: str = "pt",
                         device: str = "cpu") -> tuple[dict, dict]:
    """Read a folder written by :func:`save_safetensors_dir` (nothing is unpickled); returns
    ``(config, tensors)``. Raises StdistillError naming ``path`` when a file is missing or
    unreadable, or the config's format is not ``fmt`` (``what`` names the object in messages)."""
    import json

    from ._errors import StdistillError

    path = Path(path)
    for name in ("config.json", weights):
        if not (path / name).is_file():
            raise StdistillError(f"not a saved {what} ({name} missing)", path)
    try:
        config = json.loads((path / "config.json").read_text())
        if framework == "pt":
            from safetensors.torch import load_file

            tensors = load_file(str(path / weights), device=device)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(str(path / weights))
    except Exception as e:  # noqa: BLE001 - corrupt files
        raise StdistillError(f"cannot read a saved {what}: {e}", path) from None
    if config.get("format") != fmt:
        raise StdistillError(f"not a saved {what} (format {config.get('format')!r})", path)
    return config, tensors
