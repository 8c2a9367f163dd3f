"""A cohort: every slide of a folder or a CSV, one output folder per slide, one summary table.

Layout of ``OUT``: ``cohort.json`` (model and settings), ``<slide_id>/`` per slide (the outputs
of :func:`~stdistill.slide.predict_slide` plus ``status.json``: ok or the error, and the slide's
summary values) and ``summary.csv`` (one row per slide of the whole cohort, rebuilt from the
``status.json`` files at the end of every run).

Restarting the same command skips finished slides (same file size and time, model and settings)
and resumes a killed slide from its finished chunks; failed slides are tried again. With
``shard=(i, n)`` a run takes every n-th slide (sorted by id) starting at the i-th, so n jobs of a
SLURM array split a cohort with no overlap; each rewrites ``summary.csv`` when it ends (slides of
other shards still running show as ``pending``), and :func:`merge_summary` rebuilds it at any time.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._errors import StdistillError, require_file
from .._utils import atomic_path, file_digest
from ..io._image import WSI_SUFFIXES
from ._inputs import check_out

#: image files a folder cohort picks up (by extension)
IMAGE_SUFFIXES = tuple(sorted(WSI_SUFFIXES | {".jpg", ".jpeg", ".png"}))
STATUS = "status.json"
#: first columns of summary.csv; summary values (niche shares, mean predictions, ...) follow
COLUMNS = ["slide_id", "patient", "path", "status", "error", "n_tiles", "unreadable_tiles", "seconds"]
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class CohortSlide:
    slide_id: str
    path: Path
    mpp: float | None = None
    patient: str | None = None


@dataclass
class CohortRun:
    """What a :func:`predict_cohort` run did with its slides (its shard)."""

    out_dir: Path
    summary: Path
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    n_slides: int = 0


def _from_folder(folder: Path) -> list[CohortSlide]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise StdistillError(f"no slide images here (looked for {', '.join(IMAGE_SUFFIXES)})", folder)
    return [CohortSlide(p.stem, p) for p in files]


def _from_csv(path: Path) -> list[CohortSlide]:
    try:
        t = pd.read_csv(path, dtype={"slide_id": str, "patient": str, "path": str})
    except Exception as e:  # noqa: BLE001 - pandas raises many types for broken files
        raise StdistillError(f"unreadable cohort table ({type(e).__name__}: {e})", path) from None
    if "path" not in t.columns:
        raise StdistillError(f"a cohort table needs a 'path' column (optional: mpp, slide_id, patient); has "
                             f"{list(t.columns)}", path)
    if t.empty:
        raise StdistillError("the cohort table has no rows", path)
    mpp = pd.to_numeric(t["mpp"], errors="coerce") if "mpp" in t.columns else pd.Series(np.nan, index=t.index)
    if "mpp" in t.columns and (bad := t.index[mpp.isna() & t["mpp"].notna()]).size:
        raise StdistillError(f"mpp of row {int(bad[0]) + 2} is not a number: {t['mpp'][bad[0]]!r}", path)
    out = []
    for i, row in t.iterrows():
        p = Path(str(row["path"]))
        p = p if p.is_absolute() else path.parent / p
        sid = row.get("slide_id") if isinstance(row.get("slide_id"), str) else p.stem
        patient = row.get("patient") if isinstance(row.get("patient"), str) else None
        out.append(CohortSlide(sid, p, None if np.isnan(mpp[i]) else float(mpp[i]), patient))
    return out


def list_slides(source: str | os.PathLike) -> list[CohortSlide]:
    """The slides of a cohort: image files of a folder (by extension, ids = file stems) or the rows
    of a CSV (column ``path``, relative to the CSV's folder; optional ``mpp``, ``slide_id``,
    ``patient``), sorted by id. Ids must be unique and usable as folder names."""
    src = Path(source)
    if src.is_dir():
        slides = _from_folder(src)
    else:
        require_file(src, "cohort folder or CSV")
        slides = _from_csv(src)
    ids = [s.slide_id for s in slides]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise StdistillError(f"slide ids occur more than once: {dup[:10]} (give a slide_id column)", src)
    bad = [i for i in ids if not _SAFE_ID.match(i)]
    if bad:
        raise StdistillError(f"slide ids must be plain folder names (letters, digits, . _ + -): {bad[:5]}", src)
    return sorted(slides, key=lambda s: s.slide_id)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n, as SLURM_ARRAY_TASK_ID of ``--array=0-(n-1)``) -> ``(i, n)``."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise StdistillError(f"--shard must be i/n with 0 <= i < n (e.g. 0/8 ... 7/8), got {text!r}")
    return int(m[1]), int(m[2])


def shard_of(slides: list[CohortSlide], shard: tuple[int, int] | None) -> list[CohortSlide]:
    """Slide k (in id order) belongs to shard ``k % n``."""
    if shard is None:
        return slides
    i, n = shard
    return [s for k, s in enumerate(slides) if k % n == i]


def _inputs(s: CohortSlide, bundle, settings: dict) -> dict:
    """What decides whether a finished slide can be kept: its file (size, time), model, settings."""
    try:
        st = s.path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
    except OSError:
        stamp = None
    cfg = bundle.path / "config.json" if bundle.path.is_dir() else bundle.path
    return {"path": str(s.path), "file": stamp, "bundle_config_digest": file_digest(cfg),
            "mpp": s.mpp, **settings}


def read_status(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STATUS).read_text())
    except (OSError, ValueError):
        return None


def _write_status(folder: Path, status: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / STATUS) as tmp:
        tmp.write_text(json.dumps(status, indent=1))


def _one(s: CohortSlide, bundle, out: Path, inputs: dict, mpp: float | None, slide_kw: dict) -> dict:
    """Predict one slide; its status record (``"ok"`` with the summary values, or ``"error"``)."""
    from ._run import predict_slide

    base = {"slide_id": s.slide_id, "patient": s.patient, "path": str(s.path), "inputs": inputs}
    t0 = time.perf_counter()
    try:
        r = predict_slide(s.path, bundle, out / s.slide_id, mpp=s.mpp if s.mpp is not None else mpp,
                          name=s.slide_id, **slide_kw)
    except StdistillError as e:
        return {**base, "status": "error", "error": str(e), "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # noqa: BLE001 - one slide's failure must not stop the cohort
        (out / s.slide_id).mkdir(parents=True, exist_ok=True)
        (out / s.slide_id / "error.txt").write_text(traceback.format_exc())
        return {**base, "status": "error", "error": f"{type(e).__name__}: {e} (traceback in error.txt)",
                "seconds": round(time.perf_counter() - t0, 2)}
    return {**base, "status": "ok", "error": "", "n_tiles": r.n_tiles, "unreadable_tiles": r.n_unreadable,
            "seconds": round(r.seconds, 2), "values": r.summary}


def merge_summary(out_dir: str | os.PathLike, slides: list[CohortSlide]) -> Path:
    """Rebuild ``OUT/summary.csv``: one row per slide of the cohort from its ``status.json``
    (``pending`` for slides without one yet), written atomically."""
    out = Path(out_dir)
    rows = []
    for s in slides:
        st = read_status(out / s.slide_id) or {"status": "pending", "error": ""}
        row = {"slide_id": s.slide_id, "patient": s.patient, "path": str(s.path), **{k: st.get(k) for k in COLUMNS[3:]}}
        rows.append({**row, **(st.get("values") or {})})
    frame = pd.DataFrame(rows)
    frame = frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]
    for c in ("n_tiles", "unreadable_tiles"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("Int64")
    path = out / "summary.csv"
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return path


def _cohort_manifest(out: Path, source, bundle, settings: dict, n: int, overwrite: bool, command: str | None) -> None:
    """``OUT/cohort.json``; refuses another model or settings in the same folder unless ``overwrite``."""
    want = {"source": str(Path(source).resolve()), "bundle": str(bundle.path.resolve()), "settings": settings}
    path = out / "cohort.json"
    if path.is_file() and not overwrite:
        have = json.loads(path.read_text())
        diff = sorted(k for k in want if have.get(k) != want[k])
        if diff:
            raise StdistillError(f"holds a cohort run with other inputs ({', '.join(diff)}); use another --out or "
                                 "--overwrite", out)
    from .._utils import versions

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**want, "n_slides": n, "about": {"command": command or "", "versions": versions()}},
                                  indent=1))


def predict_cohort(
    source: str | os.PathLike,
    bundle,
    out_dir: str | os.PathLike,
    *,
    shard: str | tuple[int, int] | None = None,
    mpp: float | None = None,
    min_tissue: float = 0.5,
    chunk_tiles: int = 256,
    force: bool = False,
    max_unreadable: float = 0.1,
    overwrite: bool = False,
    merge_only: bool = False,
    clinical: str | os.PathLike | None = None,
    command: str | None = None,
    log=None,
    **slide_kw,
) -> CohortRun:
    """Predict every slide of a cohort (see the module text for the layout, resuming and shards).

    A slide that fails is recorded (``status`` = error, ``error`` = the one-line reason) and the
    run goes on. Returns a :class:`CohortRun`; :attr:`CohortRun.failed` holds the failures.

    Parameters
    ----------
    source
        A folder of slide images (by extension) or a CSV with a ``path`` column (optional ``mpp``,
        ``slide_id``, ``patient``).
    bundle, out_dir
        The model bundle (loaded once) and the cohort's output folder.
    shard
        ``"i/n"`` or ``(i, n)``: only this run's share of the slides (``0 <= i < n``).
    mpp
        Microns per pixel for slides whose metadata (and CSV row) gives none.
    merge_only
        Only rebuild ``summary.csv`` from the slides' ``status.json`` (after a SLURM array).
    clinical
        Survival models: a CSV with ``patient`` (or ``slide_id``), ``time`` and ``event``; writes
        Kaplan-Meier curves of the predicted groups and the log-rank p (``km.png``, ``km.json``).
    log
        Called with one line per slide (``"B4: ok, 790 tiles in 41 s"``), e.g. ``print``.
    slide_kw
        Passed to :func:`~stdistill.slide.predict_slide` (``batch_size``, ``num_workers``,
        ``device``, ``map_genes``, ``quiet``, ``zarr``).
    """
    from ._run import _bundle, _check_args

    out = Path(out_dir)
    check_out(out)
    slides = list_slides(source)
    part = shard_of(slides, parse_shard(shard) if isinstance(shard, str) else shard)
    if merge_only:
        return _survival_curves(CohortRun(out, merge_summary(out, slides), n_slides=len(slides)), clinical)
    _check_args(chunk_tiles, slide_kw.get("batch_size", 32), slide_kw.get("num_workers", 0), max_unreadable,
                slide_kw.get("zarr", False))
    b = _bundle(bundle, slide_kw.get("device", "cpu"))
    _check_clinical(b, clinical)
    settings = {"mpp": mpp, "min_tissue": float(min_tissue), "chunk_tiles": int(chunk_tiles), "force": bool(force),
                "max_unreadable": float(max_unreadable)}
    out.mkdir(parents=True, exist_ok=True)
    _cohort_manifest(out, source, b, settings, len(slides), overwrite, command)
    run = CohortRun(out, out / "summary.csv", n_slides=len(slides))
    say = log or (lambda line: None)
    kw = {**slide_kw, "min_tissue": min_tissue, "chunk_tiles": chunk_tiles, "force": force,
          "max_unreadable": max_unreadable, "overwrite": overwrite, "command": command}
    _run_slides(run, part, b, settings, mpp, kw, say)
    run.summary = merge_summary(out, slides)
    return _survival_curves(run, clinical)


def _run_slides(run: CohortRun, part: list[CohortSlide], b, settings: dict, mpp, kw: dict, say) -> None:
    """Predict each slide of ``part`` not finished earlier with the same inputs; record it in ``run``."""
    out = run.out_dir
    for s in part:
        inputs = _inputs(s, b, settings)
        have = read_status(out / s.slide_id)
        if have and have.get("status") == "ok" and have.get("inputs") == inputs and (out / s.slide_id / "run.json").is_file():
            run.reused.append(s.slide_id)
            run.ok.append(s.slide_id)
            say(f"{s.slide_id}: finished earlier, kept")
            continue
        st = _one(s, b, out, inputs, mpp, kw)
        _write_status(out / s.slide_id, st)
        if st["status"] == "ok":
            run.ok.append(s.slide_id)
            say(f"{s.slide_id}: ok, {st['n_tiles']} tiles in {st['seconds']:.0f} s")
        else:
            run.failed[s.slide_id] = st["error"]
            say(f"{s.slide_id}: failed: {st['error']}")


def _check_clinical(b, clinical) -> None:
    """Refuse ``clinical`` before hours of work: it needs a survival model and an existing file."""
    if clinical is not None and b.recipe != "survival":
        raise StdistillError("--clinical needs a survival model", b.path)
    if clinical is not None and not Path(clinical).is_file():
        raise StdistillError("no such clinical table", clinical)


def _survival_curves(run: CohortRun, clinical) -> CohortRun:
    """``run``, after writing Kaplan-Meier curves of its predicted risk groups when ``clinical`` is given."""
    if clinical is not None:
        from ._km import km_report

        km_report(run.summary, clinical, run.out_dir)
    return run
