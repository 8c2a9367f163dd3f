"""Feature extraction over a manifest of many slides: isolate failures, resume after a kill.

A manifest is a tab-separated (``.tsv``) or comma-separated (``.csv``) table with a header:

``path`` (required)
    An input :func:`stdistill.io.load_any` reads: an ``.h5ad`` file, a Space Ranger ``outs/``
    folder, a her2st copy. Relative paths are relative to the manifest's folder.
``name`` (optional)
    The entry's output name (``<out_dir>/<name>.h5ad``); default: the path's stem (for a folder,
    its name). Names must be unique.

Empty lines and lines starting with ``#`` are ignored; other columns are kept but unused.

Each entry is loaded, its imaged sections encoded (:func:`stdistill.features.run_extraction`, so
finished sections come from the feature cache) and written atomically to ``<out_dir>/<name>.h5ad``.
An entry is *done* when its output exists and records the same input (path, size, mtime) and the
same extraction settings (``uns["features_manifest"]``): a rerun of a killed job skips done
entries without loading them, and recomputes nothing the cache already holds. An entry that fails
is logged, skipped and listed at the end (also in ``<out_dir>/features_summary.tsv``).
Two processes may run the same manifest at once (e.g. SLURM array jobs): each entry is taken
under an exclusive lock file (``<out_dir>/.<name>.lock``); an entry locked by another process is
reported as ``busy`` and left to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .._errors import StdistillError, one_line, require_file
from .._keys import Key

log = logging.getLogger(__name__)

#: ``uns`` key of an output that records its input and settings (a JSON string).
RECORD_KEY = Key.uns.features_manifest
SUMMARY = "features_summary.tsv"


@dataclass
class ManifestEntry:
    """One manifest row and what happened to it (``status``: done, skipped (done earlier), failed, busy)."""

    name: str
    path: str
    status: str = "pending"
    n_spots: int = 0
    seconds: float = 0.0
    message: str = ""


@dataclass
class ManifestReport:
    """What :func:`extract_manifest` did, entry by entry."""

    out_dir: str
    entries: list[ManifestEntry] = field(default_factory=list)

    @property
    def failed(self) -> list[ManifestEntry]:
        return [e for e in self.entries if e.status == "failed"]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([e.__dict__ for e in self.entries]).set_index("name")


def read_manifest(path: str | os.PathLike) -> list[ManifestEntry]:
    """Parse a manifest (see the module docstring); one StdistillError naming the file on bad input."""
    p = require_file(path, "manifest")
    sep = "," if p.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(p, sep=sep, comment="#", dtype=str, skip_blank_lines=True, keep_default_na=False)
    except Exception as e:
        raise StdistillError(f"cannot parse the manifest ({type(e).__name__}: {e})", p) from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    if "path" not in df.columns:
        kind = "comma" if sep == "," else "tab"
        raise StdistillError(f"manifest needs a 'path' column ({kind}-separated header), has {list(df.columns)}", p)
    entries = []
    for i, row in df.iterrows():
        raw = str(row["path"]).strip()
        if not raw:
            raise StdistillError(f"row {i + 2}: empty path", p)
        src = Path(raw).expanduser()
        src = src if src.is_absolute() else p.parent / src
        name = str(row.get("name", "") or "").strip() or src.name.removesuffix(".h5ad")
        if name in ("", ".", "..") or "/" in name or os.sep in name:
            raise StdistillError(f"row {i + 2}: bad entry name {name!r}", p)
        entries.append(ManifestEntry(name=name, path=str(src)))
    if not entries:
        raise StdistillError("manifest lists no inputs", p)
    seen: dict[str, int] = {}
    for e in entries:
        seen[e.name] = seen.get(e.name, 0) + 1
    dups = sorted(n for n, c in seen.items() if c > 1)
    if dups:
        raise StdistillError(f"entry names must be unique (add a 'name' column); repeated: {dups}", p)
    return entries


def _record(src: str, settings: dict) -> str:
    """The JSON stored in an output: input path, size and mtime, and the extraction settings."""
    st = Path(src).stat()
    return json.dumps({"source": str(Path(src).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "settings": settings}, sort_keys=True, default=str)


def _done(out: Path, record: str) -> bool:
    """``out`` exists and holds ``record`` (read from the HDF5 file without loading it)."""
    import h5py

    if not out.is_file():
        return False
    try:
        with h5py.File(out, "r") as f:
            got = f["uns"][RECORD_KEY][()]
    except Exception:  # unreadable or written by something else: redo it
        return False
    return (got.decode() if isinstance(got, bytes) else str(got)) == record


@contextlib.contextmanager
def _entry_lock(lock: Path) -> Iterator[bool]:
    """Yield True when this process holds ``lock`` exclusively, False when another process does."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no POSIX locks: no cross-process protection
        yield True
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _run_entry(entry: ManifestEntry, out: Path, record: str, encoder: Any, kwargs: dict) -> None:
    """Load, encode and write one entry (raises on failure)."""
    from ..io import has_image, load_any, sections, subset_sections, write_h5ad
    from .extract import run_extraction

    adata = load_any(entry.path)
    imaged = [s for s in sections(adata) if has_image(adata, s)]
    if not imaged:
        raise StdistillError("no section has an H&E image", entry.path)
    if len(imaged) < len(sections(adata)):
        adata = subset_sections(adata, imaged)
    run_extraction(adata, encoder, **kwargs)
    adata.uns[RECORD_KEY] = record
    write_h5ad(adata, out)
    entry.n_spots = int(adata.n_obs)


def extract_manifest(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    encoder: Any = "effnet-lite0-imagenet",
    **kwargs: Any,
) -> ManifestReport:
    """Extract features for every entry of ``manifest`` into ``out_dir/<name>.h5ad``.

    ``encoder`` and ``kwargs`` are those of :func:`stdistill.features.extract` (``size_um``,
    ``px``, ``precision``, ``cache_dir`` ...). Failing entries are logged and skipped, never
    raised: check :attr:`ManifestReport.failed`. Done entries (see the module docstring) are
    skipped. The summary is also written to ``out_dir/features_summary.tsv``.
    """
    from .._utils import resolve_device, write_bytes
    from .extract import resolve_precision

    entries = read_manifest(manifest)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise StdistillError("output folder expected for a manifest, but this is a file", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = encoder if isinstance(encoder, str) else getattr(getattr(encoder, "spec", None), "name", repr(encoder))
    settings = {
        "encoder": name, "size_um": float(kwargs.get("size_um", 112.0)), "px": int(kwargs.get("px", 224)),
        "precision": resolve_precision(kwargs.get("precision", "auto"), resolve_device(kwargs.get("device", "auto"))),
        "weights": str(kwargs.get("weights")), "key_added": kwargs.get("key_added"),
    }
    report = ManifestReport(out_dir=str(out_dir), entries=entries)
    for k, e in enumerate(entries, 1):
        out = out_dir / f"{e.name}.h5ad"
        t0 = time.perf_counter()
        try:
            record = _record(e.path, settings)
        except OSError as err:
            e.status, e.message = "failed", one_line(f"{e.path}: cannot read ({err.strerror or err})")
            log.error("[%d/%d] %s failed: %s", k, len(entries), e.name, e.message)
            continue
        if _done(out, record):
            e.status = "skipped (done earlier)"
            log.info("[%d/%d] %s: done earlier, skipped", k, len(entries), e.name)
            continue
        with _entry_lock(out_dir / f".{e.name}.lock") as mine:
            if not mine:
                e.status = "busy (another process)"
                log.info("[%d/%d] %s: another process holds it, skipped", k, len(entries), e.name)
                continue
            if _done(out, record):  # the other process finished it while we waited for the lock
                e.status = "skipped (done earlier)"
                continue
            try:
                _run_entry(e, out, record, encoder, kwargs)
                e.status = "done"
            except Exception as err:  # isolate the slide: log, skip, list at the end
                e.status = "failed"
                e.message = one_line(str(err) if isinstance(err, StdistillError) else f"{e.path}: {type(err).__name__}: {err}")
                log.error("[%d/%d] %s failed: %s", k, len(entries), e.name, e.message)
        e.seconds = time.perf_counter() - t0
        if e.status == "done":
            log.info("[%d/%d] %s: %d spots in %.1f s", k, len(entries), e.name, e.n_spots, e.seconds)
    try:
        write_bytes(out_dir / SUMMARY, report.table().to_csv(sep="\t").encode())
    except OSError as err:
        log.error("cannot write %s: %s", out_dir / SUMMARY, err)
    return report
