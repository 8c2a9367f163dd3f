"""On-disk feature cache: one HDF5 file per (section, patch geometry, encoder, weights) entry.

An entry is keyed by content, never by name or path: the image's digest, the digest of the
section's spot coordinates, the patch size in micrometres and pixels, the encoder's spec
fingerprint and weights digest, and the compute precision. Entries are written atomically
(temporary file + rename) and carry a BLAKE2b checksum of their features plus HDF5's
Fletcher-32 filter: a corrupt or truncated entry is detected on read, removed and recomputed.

Several processes may share a cache (cohort jobs on one file system): a reader only ever sees a
whole entry (rename is atomic), a writer leaves an existing entry with the same checksum alone
(content check), and a corrupt entry is removed only if it is still the very file that was read
(same inode and mtime), so a good entry renamed into place meanwhile by another process survives.

Location: ``cache_dir`` argument, else ``$STDISTILL_CACHE/features`` (``STDISTILL_CACHE`` is the root
of all stdistill caches, as for dataset downloads), else ``~/.cache/stdistill/features``.
Layout: ``<root>/<encoder>/<key>.h5`` with dataset ``features`` (n_spots, dim) float32 and
attributes ``checksum``, ``section``, ``n``, ``dim``, ``format``, ``key_parts`` (JSON).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from .._errors import StdistillError
from .._utils import umask_mode, write_hdf5

FORMAT = 1
ENV = "STDISTILL_CACHE"


class CacheWarning(UserWarning):
    """A cache entry was unreadable or corrupt and is being recomputed."""


def default_cache_dir() -> Path:
    """``$STDISTILL_CACHE/features`` if ``STDISTILL_CACHE`` is set, else ``~/.cache/stdistill/features``."""
    env = os.environ.get(ENV)
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "stdistill") / "features"


def features_checksum(feats: np.ndarray) -> str:
    """BLAKE2b-128 of a float32 array's shape and bytes."""
    a = np.ascontiguousarray(feats, dtype=np.float32)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def entry_key(**parts) -> str:
    """Stable hex key of the keyword parts (JSON, sorted keys)."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "_"


class FeatureCache:
    """A folder of feature entries (see the module docstring).

    Parameters
    ----------
    root
        Folder; ``None`` uses :func:`default_cache_dir`.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self._read_stat: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    def path(self, encoder: str, key: str) -> Path:
        return self.root / _safe(encoder) / f"{key}.h5"

    def get(self, encoder: str, key: str, n: int | None = None, dim: int | None = None) -> np.ndarray | None:
        """The cached (n, dim) float32 features, or None when absent or corrupt (then removed)."""
        import h5py

        p = self.path(encoder, key)
        try:  # read the whole entry through one open file: another process may evict or replace it meanwhile
            with open(p, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except OSError:  # absent (or evicted before we opened it): a miss
            return None
        self._read_stat = (st.st_ino, st.st_mtime_ns)
        try:
            with h5py.File(io.BytesIO(data), "r") as f:
                feats = f["features"][()]
                checksum = f.attrs["checksum"]
                checksum = checksum.decode() if isinstance(checksum, bytes) else str(checksum)
                fmt = int(f.attrs.get("format", -1))
        except Exception as e:  # truncated file, failed Fletcher-32, missing dataset/attrs ...
            return self._corrupt(p, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        if fmt != FORMAT:
            return self._corrupt(p, f"format {fmt}, expected {FORMAT}")
        if feats.dtype != np.float32 or feats.ndim != 2:
            return self._corrupt(p, f"holds {feats.dtype} {feats.shape}, expected 2-D float32")
        if (n is not None and feats.shape[0] != n) or (dim is not None and feats.shape[1] != dim):
            return self._corrupt(p, f"holds shape {feats.shape}, expected ({n}, {dim})")
        if features_checksum(feats) != checksum:
            return self._corrupt(p, "checksum mismatch")
        return feats

    def _corrupt(self, p: Path, why: str) -> None:
        warnings.warn(f"feature cache entry {p} is corrupt ({why}); recomputing it", CacheWarning, stacklevel=3)
        try:
            st = p.stat()
            if (st.st_ino, st.st_mtime_ns) == self._read_stat:  # not replaced by another writer meanwhile
                p.unlink()
        except OSError:
            pass
        return None

    def _holds(self, p: Path, checksum: str) -> bool:
        """``p`` is an entry whose recorded checksum is ``checksum`` (a cheap content check)."""
        import h5py

        try:
            with h5py.File(p, "r") as f:
                got = f.attrs["checksum"]
        except Exception:
            return False
        return (got.decode() if isinstance(got, bytes) else str(got)) == checksum

    def put(self, encoder: str, key: str, feats: np.ndarray, *, section: str = "", key_parts: dict | None = None) -> Path:
        """Write an entry atomically; returns its path."""
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if feats.ndim != 2:
            raise StdistillError(f"cache entries hold (n, dim) features, got shape {feats.shape}")
        if not np.all(np.isfinite(feats)):
            raise StdistillError(f"encoder {encoder!r} produced non-finite features for section {section!r}; not caching them")
        p = self.path(encoder, key)
        checksum = features_checksum(feats)
        if p.is_file() and self._holds(p, checksum):  # another process wrote the same features
            return p

        def fill(f) -> None:
            f.create_dataset("features", data=feats, fletcher32=True,
                             chunks=(min(len(feats), 1024) or 1, feats.shape[1] or 1))
            f.attrs["checksum"] = checksum
            f.attrs["format"] = FORMAT
            f.attrs["section"] = str(section)
            f.attrs["encoder"] = str(encoder)
            f.attrs["n"] = feats.shape[0]
            f.attrs["dim"] = feats.shape[1]
            f.attrs["key_parts"] = json.dumps(key_parts or {}, sort_keys=True, default=str)

        try:
            write_hdf5(p, fill, mode=umask_mode())  # built in memory: a full disk is an OSError, not an h5py crash
        except OSError as e:
            raise StdistillError(f"cannot write the feature cache ({e}); pass cache_dir= or set {ENV}", p) from None
        return p

    def entries(self, encoder: str | None = None) -> list[Path]:
        """Entry files (of one encoder, or all)."""
        base = self.root / _safe(encoder) if encoder else self.root
        return sorted(base.rglob("*.h5")) if base.exists() else []
