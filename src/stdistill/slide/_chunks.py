"""The on-disk state of a slide run: ``run.json`` (inputs, then the result) and finished chunks.

A chunk is a block of tiles in row-major order; each stage writes one ``chunks/<stage>_<i>.npz``
per chunk, atomically, so a killed run started again skips what is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .._errors import StdistillError
from .._utils import atomic_path, load_npz, save_npz

CHUNK_FMT = "stdistill.slide-chunk/1"
#: seconds to pause after each chunk (only for tests of resuming a killed run)
PAUSE_ENV = "STDISTILL_CHUNK_PAUSE_S"


def pause_s() -> float:
    return float(os.environ.get(PAUSE_ENV, "0") or 0)


def write_manifest(out: Path, want: dict, overwrite: bool, about: dict | None = None) -> None:
    """Write ``run.json``; refuse to resume a run made with other inputs unless ``overwrite``.
    ``about`` (command, versions) is recorded under ``"about"`` but never compared."""
    path = out / "run.json"
    if path.is_file():
        have = read_manifest(out)
        same = {k: have.get(k) for k in want} == want
        if not same and not overwrite:
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise StdistillError(f"holds a run with other inputs ({', '.join(diff)}); use another --out or --overwrite", out)
        if not same:
            shutil.rmtree(out / "chunks", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**want, "about": about or {}}, indent=1))


def read_manifest(out: Path) -> dict:
    """``run.json`` of a slide run folder ({} when there is none or it cannot be parsed)."""
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def record_result(out: Path, result: dict) -> None:
    """Add the run's ``"result"`` (tiles predicted, tiles skipped, seconds, finish time) to ``run.json``."""
    run = read_manifest(out)
    run["result"] = {**result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(run, indent=1))


def chunk_paths(out: Path, stage: str):
    """``i -> out/chunks/<stage>_<i>.npz``."""
    def path(i: int) -> Path:
        return out / "chunks" / f"{stage}_{i:05d}.npz"
    return path


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def save_chunk(path: Path, arrays: dict, a: int, b: int) -> None:
    save_npz(path, arrays, {"format": CHUNK_FMT, "start": a, "stop": b})


def load_chunk(path: Path, key: str, default=None) -> np.ndarray:
    """Array ``key`` of a finished chunk (``default`` when the chunk does not hold it)."""
    z, _ = load_npz(path, CHUNK_FMT, "slide chunk")
    if key not in z and default is not None:
        return default
    return z[key]


def run_stage(name: str, chunks, path_of, compute, bar) -> int:
    """Run ``compute(start, stop) -> dict of arrays`` for each chunk without a finished file; returns
    the number of chunks reused from an earlier run."""
    task = bar.add_task(name, total=len(chunks))
    reused, pause = 0, pause_s()
    for i, (a, b) in enumerate(chunks):
        p = path_of(i)
        if p.is_file():
            reused += 1
        else:
            save_chunk(p, compute(a, b), a, b)
            if pause:
                time.sleep(pause)
        bar.advance(task)
    return reused


def readable(paths: list[Path], chunks) -> np.ndarray:
    """(n_tiles,) bool: the tile could be read (chunks written before tiles were checked: all True)."""
    return np.concatenate([load_chunk(p, "ok", np.ones(b - a, bool)).astype(bool) for p, (a, b) in zip(paths, chunks)])


def feature_stats(paths: list[Path], key: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over every tile's features (``key`` of the chunks), streamed chunk by chunk
    (float64 sums; unreadable tiles, whose features are NaN, left out)."""
    s = ss = None
    n = 0
    for p in paths:
        f = load_chunk(p, key).astype(np.float64)
        f = f[np.all(np.isfinite(f), axis=1)]
        s = f.sum(0) if s is None else s + f.sum(0)
        ss = (f**2).sum(0) if ss is None else ss + (f**2).sum(0)
        n += len(f)
    mean = s / max(n, 1)
    sd = np.sqrt(np.maximum(ss / max(n, 1) - mean**2, 0))
    sd[sd < 1e-6] = 1.0
    return mean.astype(np.float32), sd.astype(np.float32)
