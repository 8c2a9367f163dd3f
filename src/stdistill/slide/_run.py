"""Whole-slide prediction: tissue tiles -> chunks of features/predictions on disk -> outputs.

Work is done in chunks of tiles (row-major order). Each finished chunk is written atomically to
``OUT/chunks/``; a killed run started again with the same arguments skips finished chunks and
ends with the same outputs. Only one chunk of patches (plus, for niche students, the features of
a neighbourhood halo) is in memory at a time, so peak memory does not grow with slide size.
Tiles are read and decoded in ``num_workers`` worker processes while the encoder runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._errors import StdistillError
from .._utils import file_digest, progress_display, versions
from ._chunks import chunk_bounds, record_result, write_manifest
from ._inputs import check_out, check_scale, open_source
from ._models import Job
from ._predictors import PREDICTORS, check_bundle


@dataclass
class SlideRun:
    """Where a :func:`predict_slide` run wrote its outputs, and what it found."""

    out_dir: Path
    n_tiles: int
    h5ad: Path
    geojson: Path
    maps: list[Path] = field(default_factory=list)
    zarr: Path | None = None
    chunks_reused: int = 0
    seconds: float = 0.0
    #: tissue tiles that could not be decoded (skipped; their ids in ``run.json`` and ``uns["predict"]``)
    n_unreadable: int = 0
    #: per-slide summary values (niche shares, mean predictions), as in a cohort's summary.csv
    summary: dict = field(default_factory=dict)
    #: tables written into a ``wsidata.WSIData`` given as the slide
    wsi_tables: list[str] = field(default_factory=list)


def _check_args(chunk_tiles: int, batch_size: int, num_workers: int, max_unreadable: float, zarr: bool) -> None:
    for what, value, least in (("chunk_tiles", chunk_tiles, 1), ("batch_size", batch_size, 1),
                               ("num_workers", num_workers, 0)):
        if value < least:
            raise StdistillError(f"{what} must be >= {least}, got {value}")
    if not 0.0 <= max_unreadable <= 1.0:
        raise StdistillError(f"max_unreadable must be in [0, 1], got {max_unreadable}")
    if zarr and importlib.util.find_spec("spatialdata") is None:  # say so before hours of work, not after
        raise StdistillError("zarr output needs the optional spatialdata package: pip install 'stdistill[spatialdata]'")


def _bundle(bundle, device: str):
    from ..bundle import Bundle, load_bundle

    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device=device)
    check_bundle(b)
    return b


def _skipped(tiles, ok: np.ndarray, max_unreadable: float, label: str) -> dict:
    """``{"n": ..., "ids": [...]}`` of the tiles that could not be decoded; one line when they are
    more than ``max_unreadable`` of the tissue tiles (the file is damaged, not a few tiles)."""
    bad = np.flatnonzero(~ok)
    if len(bad) > max_unreadable * len(ok) or len(bad) == len(ok):
        raise StdistillError(f"{len(bad)} of {len(ok)} tissue tiles cannot be decoded (more than "
                             f"{max_unreadable:.0%}); the file is damaged: copy or export it again", label)
    return {"n": int(len(bad)), "ids": [str(t) for t in tiles.obs_names[bad][:1000]]}


def predict_slide(
    slide,
    bundle,
    out_dir: str | os.PathLike,
    *,
    mpp: float | None = None,
    name: str | None = None,
    chunk_tiles: int = 256,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "cpu",
    min_tissue: float = 0.5,
    map_genes: list[str] | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    force: bool = False,
    max_unreadable: float = 0.1,
    command: str | None = None,
    zarr: bool = False,
    window_mm: float = 6.5,
) -> SlideRun:
    """Predict a student's outputs on every tissue tile of an H&E slide and write maps.

    Parameters
    ----------
    slide
        H&E image: a path (pyramidal TIFF/OME-TIFF/SVS through tiffslide, ``pip install
        'stdistill[wsi]'``; JPEG/PNG/plain TIFF), an open reader (:func:`stdistill.io.open_image`,
        a ``tiffslide.TiffSlide`` or ``openslide.OpenSlide``), an RGB array, or a LazySlide
        ``wsidata.WSIData`` (read through its own reader; predictions are also written into it:
        ``shapes["stdistill_tiles"]`` and ``tables["<kind>_stdistill_tiles"]``).
    bundle
        A model bundle folder or a loaded :class:`stdistill.bundle.Bundle`.
    out_dir
        Output folder: ``<name>.h5ad``, ``<name>.geojson``, ``maps/*.png``, ``run.json`` and
        ``chunks/`` (finished chunks, reused when the same run is started again).
    mpp, name
        Microns per pixel of the full-resolution image (default: the slide's metadata); output
        file stem (default: the slide file's stem).
    chunk_tiles, batch_size
        Tiles per chunk (memory holds about one chunk of patches); patches per forward pass.
    num_workers
        Processes reading and decoding tiles while the encoder runs (each opens the slide
        itself); 0 reads them in a background thread. Outputs do not depend on it.
    min_tissue
        Keep tiles with at least this tissue fraction (0-1).
    map_genes
        Genes drawn as expression maps (default: the first four the bundle predicts).
    quiet, overwrite
        No progress bars; start afresh when ``out_dir`` holds a run made with other inputs.
    force
        Accept a scale outside 0.1-10 um/px, or tiles under 16 px (refused by default: almost
        always a typo or wrong metadata).
    max_unreadable
        Largest share of tissue tiles that may fail to decode (skipped and counted); above it
        the slide is refused as damaged.
    zarr, window_mm
        Also write ``<name>.zarr``, a SpatialData store (``pip install 'stdistill[spatialdata]'``);
        GenST: side of the windows ranked by predicted uncertainty (where to sequence next).
    command
        The command line recorded in ``run.json`` (default: this Python call), for ``stdistill report``.

    Nothing is written when the slide is refused (unreadable, truncated, implausible scale, no
    tissue, too damaged); a folder created by this call is removed again.
    """
    t0 = time.perf_counter()
    _check_args(chunk_tiles, batch_size, num_workers, max_unreadable, zarr)
    out = Path(out_dir)
    check_out(out)
    b = _bundle(bundle, device)
    src = open_source(slide, name)
    fresh = not out.exists()
    try:
        return _run(src, b, out, t0, mpp=mpp, chunk_tiles=chunk_tiles, batch_size=batch_size, num_workers=num_workers,
                    device=device, min_tissue=min_tissue, map_genes=map_genes, quiet=quiet, overwrite=overwrite,
                    force=force, max_unreadable=max_unreadable, command=command, zarr=zarr, window_mm=window_mm)
    except StdistillError:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(src, b, out: Path, t0: float, *, mpp, chunk_tiles, batch_size, num_workers, device, min_tissue, map_genes,
         quiet, overwrite, force, max_unreadable, command, zarr, window_mm) -> SlideRun:
    from ..pp.tile import tile
    from ._export import write_outputs
    from ._summary import slide_summary

    um = check_scale(src, mpp, b.size_um, force)
    tiles = tile(src.reader, size_um=b.size_um, px=b.px, microns_per_pixel=um, section=src.name, min_tissue=min_tissue)
    chunks = chunk_bounds(tiles.n_obs, chunk_tiles)
    write_manifest(out, {"slide": str(src.path.resolve()) if src.path else src.name, "slide_digest": src.digest(),
                         "bundle": str(b.path.resolve()), "bundle_config_digest": file_digest(b.path / "config.json")
                         if b.path.is_dir() else file_digest(b.path),
                         "mpp": um, "min_tissue": float(min_tissue), "chunk_tiles": int(chunk_tiles),
                         "n_tiles": int(tiles.n_obs), "recipe": b.recipe}, overwrite,
                   about={"command": command or f"stdistill.slide.predict_slide({src.label()!r}, {str(b.path)!r}, "
                                                f"{str(out)!r}, chunk_tiles={chunk_tiles})",
                          "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    with progress_display(quiet) as bar:
        job = Job(tiles, b, out, chunks, src.reader, batch_size, num_workers, device, bar)
        outputs, ok, reused = PREDICTORS[b.recipe](job)
        skipped = _skipped(tiles, ok, max_unreadable, src.label())
        outputs = {k: v[ok] for k, v in outputs.items()}
        paths = write_outputs(tiles[ok].copy(), b, outputs, out, src.name, map_genes=map_genes, zarr=zarr,
                              skipped=skipped, slide=job.slide, window_mm=window_mm)
    a = paths["adata"]
    summary = slide_summary(a, b, outputs)
    record_result(out, {"n_tiles_predicted": int(a.n_obs), "unreadable_tiles": skipped,
                        "seconds": round(time.perf_counter() - t0, 2), "summary": summary})
    tables = []
    if src.wsi is not None:
        from ._wsidata import write_wsidata

        tables = write_wsidata(src.wsi, a)
    return SlideRun(out_dir=out, n_tiles=int(a.n_obs), h5ad=paths["h5ad"], geojson=paths["geojson"], maps=paths["maps"],
                    zarr=paths["zarr"], chunks_reused=reused, seconds=time.perf_counter() - t0,
                    n_unreadable=skipped["n"], summary=summary, wsi_tables=tables)
