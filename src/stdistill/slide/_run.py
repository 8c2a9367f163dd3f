"""Whole-slide prediction: tissue tiles -> chunks of features/predictions on disk -> outputs.

Work is done in chunks of tiles (row-major order). Each finished chunk is written atomically to
``OUT/chunks/``; a killed run started again with the same arguments skips finished chunks and
ends with the same outputs. Only one chunk of patches (plus, for niche students, the features of
a neighbourhood halo) is in memory at a time, so peak memory does not grow with slide size.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np

from .._errors import StdistillError
from .._utils import (
    atomic_path,
    file_digest,
    load_npz,
    progress_display,
    save_npz,
    versions,
)

_CHUNK_FMT = "stdistill.slide-chunk/1"
#: seconds to pause after each chunk (only for tests of resuming a killed run)
_PAUSE_ENV = "STDISTILL_CHUNK_PAUSE_S"


@dataclass
class SlideRun:
    """Where a :func:`predict_slide` run wrote its outputs."""

    out_dir: Path
    n_tiles: int
    h5ad: Path
    geojson: Path
    maps: list[Path] = field(default_factory=list)
    zarr: Path | None = None
    chunks_reused: int = 0
    seconds: float = 0.0


def _open_slide(slide: str | os.PathLike, mpp: float | None):
    """The slide's reader and its microns per pixel (``mpp`` or the file's own metadata)."""
    from ..io._image import open_image
    from ..pp.tile import slide_mpp

    reader = open_image(slide)
    um = mpp if mpp is not None else slide_mpp(reader)
    if um is None or not np.isfinite(um) or um <= 0:
        raise StdistillError("the slide records no microns per pixel; pass --mpp (e.g. 0.5 for a 20x scan)", slide)
    return reader, float(um)


def _manifest(out: Path, want: dict, overwrite: bool, about: dict | None = None) -> None:
    """Write ``run.json``; refuse to resume a run made with other inputs unless ``overwrite``.
    ``about`` (command, versions) is recorded under ``"about"`` but never compared."""
    import shutil

    path = out / "run.json"
    if path.is_file():
        have = json.loads(path.read_text())
        same = {k: have.get(k) for k in want} == want
        if not same and not overwrite:
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise StdistillError(f"holds a run with other inputs ({', '.join(diff)}); use another --out or --overwrite", out)
        if not same:
            shutil.rmtree(out / "chunks", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**want, "about": about or {}}, indent=1))


def _chunk_paths(out: Path, stage: str):
    """``i -> out/chunks/<stage>_<i>.npz``."""
    def path(i: int) -> Path:
        return out / "chunks" / f"{stage}_{i:05d}.npz"
    return path


def _chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _extract_chunk(tiles: ad.AnnData, rows: np.ndarray, enc, kwargs: dict, *, batch_size: int, device: str) -> np.ndarray:
    """(len(rows), F) encoder features of the tiles ``rows`` made with ``kwargs`` (patch size,
    precision, stain normalisation; no feature cache: each chunk once)."""
    from ..features import extract

    sub = tiles[rows].copy()
    extract(sub, **{**kwargs, "encoder": enc}, batch_size=batch_size, device=device, cache_dir=False, key_added="X")
    return sub.obsm["X"]


def _slide_extraction(tiles: ad.AnnData, made: dict, precision: str | None) -> dict:
    """:func:`stdistill.features.extract` arguments making a slide's features as the training ones
    were made (``made``: their record): the training stain reference, and one stain estimate for
    the whole slide (from tiles spread over it), so every chunk is normalised alike."""
    from ..features import extraction_kwargs, stain_estimates

    kw = extraction_kwargs(made)
    kw["precision"] = made.get("precision") or precision or "fp32"
    if kw.get("stain_norm"):
        kw["stain_sources"] = stain_estimates(tiles, kw["stain_norm"], size_um=kw["size_um"], px=kw["px"])
    return kw


def _stage(name: str, tiles, chunks, path_of, compute, bar, pause: float) -> int:
    """Run ``compute(start, stop) -> dict of arrays`` for each chunk without a finished file; returns
    the number of chunks reused from an earlier run."""
    task = bar.add_task(name, total=len(chunks))
    reused = 0
    for i, (a, b) in enumerate(chunks):
        p = path_of(i)
        if p.is_file():
            reused += 1
        else:
            save_npz(p, compute(a, b), {"format": _CHUNK_FMT, "start": a, "stop": b})
            if pause:
                time.sleep(pause)
        bar.advance(task)
    return reused


def _load_chunk(path: Path, key: str) -> np.ndarray:
    z, _ = load_npz(path, _CHUNK_FMT, "slide chunk")
    return z[key]


def _feature_stats(paths: list[Path], key: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd over every tile's features (``key`` of the chunks), streamed chunk by chunk (float64 sums)."""
    s = ss = None
    n = 0
    for p in paths:
        f = _load_chunk(p, key).astype(np.float64)
        f = f[np.all(np.isfinite(f), axis=1)]
        s = f.sum(0) if s is None else s + f.sum(0)
        ss = (f**2).sum(0) if ss is None else ss + (f**2).sum(0)
        n += len(f)
    mean = s / max(n, 1)
    sd = np.sqrt(np.maximum(ss / max(n, 1) - mean**2, 0))
    sd[sd < 1e-6] = 1.0
    return mean.astype(np.float32), sd.astype(np.float32)


def _niche_chunk(tiles, chunks, feat_path, a: int, b: int, model, stats, made: dict) -> dict:
    """Niche probabilities of tiles [a, b), with neighbour tiles within the student's radius as context.

    ``stats``: ``{"features": (mean, sd), "context": (mean, sd) or None}`` over the whole slide;
    ``made``: ``{"features": record, "context": record or None}``."""
    rows_all = tiles.obs["tile_row"].to_numpy()
    side = float(tiles.uns["spatial"][tiles.obs["section"].iloc[0]]["metadata"]["tile_size_um"])
    halo = int(np.ceil(model.info_["radius_um"] / side)) + 1
    lo, hi = rows_all[a:b].min() - halo, rows_all[a:b].max() + halo
    need = np.flatnonzero((rows_all >= lo) & (rows_all <= hi))
    ids = sorted({i for i, (s, e) in enumerate(chunks) if s <= need.max() and e > need.min()})
    first = chunks[ids[0]][0]
    sub = tiles[need].copy()
    sub.uns["features"] = {}
    for what, key in (("features", model.config.feature_key), ("context", model.config.context_key)):
        if key:
            sub.obsm[key] = np.concatenate([_load_chunk(feat_path(i), what) for i in ids])[need - first]
            sub.uns["features"][key] = made[what]
    probs = model.predict_proba(sub, extract=False, stats=stats["features"], context_stats=stats["context"])
    return {"probs": probs[np.searchsorted(need, np.arange(a, b))]}


def _predict_niches(tiles, bundle, out: Path, chunks, enc, *, batch_size, device, bar, pause) -> tuple[dict, int]:
    model = bundle.model
    feat_path, pred_path = _chunk_paths(out, "features"), _chunk_paths(out, "niches")
    prec = bundle.record.get("precision")
    made = {"features": {**model.feature_record(), "size_um": bundle.size_um, "px": bundle.px}}
    made["context"] = model.feature_record(context=True) if model.config.context_key else None
    kw = {what: _slide_extraction(tiles, rec, prec) for what, rec in made.items() if rec}

    def features(a, b):
        return {what: _extract_chunk(tiles, np.arange(a, b), enc, k, batch_size=batch_size, device=device)
                for what, k in kw.items()}

    reused = _stage("features", tiles, chunks, feat_path, features, bar, pause)
    paths = [feat_path(i) for i in range(len(chunks))]
    stats = {what: _feature_stats(paths, what) if what in kw else None for what in ("features", "context")}
    made = {what: rec and {**rec, "weights_digest": enc.weights_digest} for what, rec in made.items()}
    reused += _stage("niches", tiles, chunks, pred_path,
                     lambda a, b: _niche_chunk(tiles, chunks, feat_path, a, b, model, stats, made), bar, pause)
    probs = np.concatenate([_load_chunk(pred_path(i), "probs") for i in range(len(chunks))])
    return {"niches": probs}, reused


def _predict_adapted(tiles, bundle, out: Path, chunks, *, bar, pause) -> tuple[dict, int]:
    """Adapted-encoder students (PEKA, STAMP) predict from the tile patches directly."""
    model = bundle.model
    path = _chunk_paths(out, "pred")

    def compute(a, b):
        frame = model.predict(tiles[np.arange(a, b)].copy(), inplace=False)
        return {"pred": np.asarray(getattr(frame, "to_numpy", lambda: frame)(), dtype=np.float32)}

    reused = _stage("predict", tiles, chunks, path, compute, bar, pause)
    pred = np.concatenate([_load_chunk(path(i), "pred") for i in range(len(chunks))])
    return {model.targets_key: pred}, reused


def predict_slide(
    slide: str | os.PathLike,
    bundle,
    out_dir: str | os.PathLike,
    *,
    mpp: float | None = None,
    chunk_tiles: int = 256,
    batch_size: int = 32,
    device: str = "cpu",
    min_tissue: float = 0.5,
    map_genes: list[str] | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    zarr: bool = False,
) -> SlideRun:
    """Predict a student's outputs on every tissue tile of an H&E slide and write maps.

    Parameters
    ----------
    slide
        H&E image: pyramidal TIFF/OME-TIFF/SVS (tiffslide, ``pip install 'stdistill[wsi]'``) or
        JPEG/PNG/plain TIFF.
    bundle
        A model bundle folder or a loaded :class:`stdistill.bundle.Bundle`.
    out_dir
        Output folder: ``<slide>.h5ad``, ``<slide>.geojson``, ``maps/*.png``, ``run.json`` and
        ``chunks/`` (finished chunks, reused when the same run is started again).
    mpp
        Microns per pixel of the full-resolution image; read from the slide's metadata when omitted.
    chunk_tiles
        Tiles per chunk (memory holds about one chunk of patches).
    min_tissue
        Keep tiles with at least this tissue fraction (0-1).
    map_genes
        Genes drawn as expression maps (default: the first four the bundle predicts).
    quiet
        No progress bars.
    overwrite
        Start afresh when ``out_dir`` holds a run made with other inputs.
    zarr
        Also write ``<slide>.zarr``, a SpatialData store (``pip install 'stdistill[spatialdata]'``).
    command
        The command line recorded in ``run.json`` (default: this Python call), for ``stdistill report``.
    """
    from ..bundle import Bundle, load_bundle
    from ..pp.tile import tile
    from ._export import write_outputs

    t0 = time.perf_counter()
    if chunk_tiles < 1:
        raise StdistillError(f"chunk_tiles must be >= 1, got {chunk_tiles}")
    if zarr and importlib.util.find_spec("spatialdata") is None:  # say so before hours of work, not after
        raise StdistillError("zarr output needs the optional spatialdata package: pip install 'stdistill[spatialdata]'")
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device=device)
    reader, um = _open_slide(slide, mpp)
    out = Path(out_dir)
    name = Path(slide).stem
    tiles = tile(reader, size_um=b.size_um, px=b.px, microns_per_pixel=um, section=name, min_tissue=min_tissue)
    chunks = _chunk_bounds(tiles.n_obs, chunk_tiles)
    _manifest(out, {"slide": str(Path(slide).resolve()), "slide_digest": file_digest(slide),
                    "bundle": str(b.path.resolve()), "bundle_config_digest": file_digest(b.path / "config.json")
                    if b.path.is_dir() else file_digest(b.path),
                    "mpp": um, "min_tissue": float(min_tissue), "chunk_tiles": int(chunk_tiles),
                    "n_tiles": int(tiles.n_obs), "recipe": b.recipe}, overwrite,
              about={"command": command or f"stdistill.slide.predict_slide({str(slide)!r}, {str(b.path)!r}, "
                                           f"{str(out_dir)!r}, chunk_tiles={chunk_tiles})",
                     "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    with progress_display(quiet) as bar:
        if b.recipe == "niches":
            from ..encoders import load as load_encoder

            enc = load_encoder(b.encoder, device=device)
            b.check_features(_made_by(enc, b), "X")
            outputs, reused = _predict_niches(tiles, b, out, chunks, enc, batch_size=batch_size, device=device,
                                              bar=bar, pause=pause)
        else:
            outputs, reused = _predict_adapted(tiles, b, out, chunks, bar=bar, pause=pause)
        paths = write_outputs(tiles, b, outputs, out, name, map_genes=map_genes, zarr=zarr)
    return SlideRun(out_dir=out, n_tiles=int(tiles.n_obs), h5ad=paths["h5ad"], geojson=paths["geojson"],
                    maps=paths["maps"], zarr=paths["zarr"], chunks_reused=reused, seconds=time.perf_counter() - t0)


def _made_by(enc, b) -> ad.AnnData:
    """An empty AnnData whose ``uns["features"]["X"]`` describes features ``enc`` would make at the
    bundle's patch size: :meth:`Bundle.check_features` then refuses an encoder with other weights."""
    a = ad.AnnData(np.zeros((0, 0), np.float32))
    a.uns["features"] = {"X": {"encoder": enc.spec.name, "size_um": b.size_um, "px": b.px,
                               "weights_digest": enc.weights_digest}}
    return a
