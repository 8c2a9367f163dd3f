"""What each kind of model bundle computes on a slide's tiles, chunk by chunk.

A predictor takes a :class:`Job` and returns ``(outputs, ok, reused)``: ``{output kind: array
with one row per tile}`` (NaN rows for unreadable tiles), the (n_tiles,) mask of tiles that
could be read, and the number of chunks reused from an earlier run; slide-level values (a
survival model's risk) go to :attr:`Job.slide`. :data:`stdistill.slide._predictors.PREDICTORS`
maps a bundle's recipe to its predictor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np

from ..io._pixels import UnreadableRegion
from ._chunks import chunk_paths, feature_stats, load_chunk, pause_s, readable, run_stage, save_chunk
from ._tiles import TilePatches, View, encode_chunks, inference_encoder


@dataclass
class Job:
    """One slide run: its tiles, the bundle, where chunks go, and how to read and compute."""

    tiles: ad.AnnData
    bundle: object
    out: Path
    chunks: list[tuple[int, int]]
    reader: object
    batch_size: int
    num_workers: int
    device: str
    bar: object
    #: slide-level values a predictor found (e.g. ``{"risk": ..., "risk_group": ...}``)
    slide: dict = field(default_factory=dict)


def _views(job: Job, made: dict, precision: str | None) -> list[View]:
    """One :class:`View` per features record in ``made`` (``{name: record}``): the training
    features' patch size, precision and stain normalisation (one estimate for the whole slide)."""
    from ..encoders import load as load_encoder
    from ..features import extraction_kwargs, stain_estimates
    from ..pp._stain import SectionStainTransform, StainNormalizer

    encoders: dict = {}
    views = []
    for name, rec in made.items():
        kw = extraction_kwargs(rec)
        enc_name = job.bundle.encoder
        if enc_name not in encoders:
            encoders[enc_name] = load_encoder(enc_name, device=job.device)
        tf = None
        if kw.get("stain_norm"):
            src = stain_estimates(job.tiles, kw["stain_norm"], size_um=kw["size_um"], px=kw["px"])
            tf = SectionStainTransform(StainNormalizer.from_state(kw["stain_reference"]), src,
                                       job.tiles.obs["section"].astype(str).to_numpy())
        views.append(View(name, kw["size_um"], kw["px"], tf, encoders[enc_name], rec.get("precision") or precision or "fp32"))
    return views


def encode_stage(job: Job, views: list[View]) -> int:
    """Encode the tiles of every chunk without a finished ``features`` file; returns chunks reused."""
    path = chunk_paths(job.out, "features")
    todo = [i for i in range(len(job.chunks)) if not path(i).is_file()]
    task = job.bar.add_task("features", total=len(job.chunks))
    job.bar.advance(task, len(job.chunks) - len(todo))
    ds = TilePatches(job.tiles, job.reader, [(v.size_um, v.px, v.transform) for v in views])

    pause = pause_s()

    def done(i, arrays):
        a, b = job.chunks[i]
        save_chunk(path(i), arrays, a, b)
        job.bar.advance(task)
        if pause:
            time.sleep(pause)

    encode_chunks(ds, views, job.chunks, todo, done, batch_size=job.batch_size, num_workers=job.num_workers,
                  device=job.device)
    return len(job.chunks) - len(todo)


def _niche_chunk(job: Job, ok: np.ndarray, a: int, b: int, stats, made: dict) -> dict:
    """Niche probabilities of tiles [a, b) (NaN for unreadable ones), with the readable neighbour
    tiles within the student's radius as context. ``stats``: ``{"features": (mean, sd), "context":
    (mean, sd) or None}`` over the whole slide; ``made``: ``{"features": record, "context": record or None}``."""
    model, tiles, chunks = job.bundle.model, job.tiles, job.chunks
    feat_path = chunk_paths(job.out, "features")
    rows_all = tiles.obs["tile_row"].to_numpy()
    side = float(tiles.uns["spatial"][tiles.obs["section"].iloc[0]]["metadata"]["tile_size_um"])
    halo = int(np.ceil(model.info_["radius_um"] / side)) + 1
    lo, hi = rows_all[a:b].min() - halo, rows_all[a:b].max() + halo
    need = np.flatnonzero((rows_all >= lo) & (rows_all <= hi))
    ids = sorted({i for i, (s, e) in enumerate(chunks) if s <= need.max() and e > need.min()})
    first = chunks[ids[0]][0]
    need = need[ok[need]]
    probs = np.full((b - a, int(model.config.n_niches)), np.nan, np.float32)
    mine = need[(need >= a) & (need < b)]
    if not len(mine):
        return {"probs": probs}
    sub = tiles[need].copy()
    sub.uns["features"] = {}
    for what, key in (("features", model.config.feature_key), ("context", model.config.context_key)):
        if key:
            sub.obsm[key] = np.concatenate([load_chunk(feat_path(i), what) for i in ids])[need - first]
            sub.uns["features"][key] = made[what]
    p = model.predict_proba(sub, extract=False, stats=stats["features"], context_stats=stats["context"])
    probs[mine - a] = p[np.searchsorted(need, mine)]
    return {"probs": probs}


def encode_features(job: Job, made: dict) -> tuple[list[View], list[Path], np.ndarray, int]:
    """Encoder features of every tile, made as the training features were (``made``: ``{name:
    features record}``; the first is checked against the bundle's encoder weights). Returns the
    views, the ``features`` chunk files, the (n_tiles,) readable mask and the chunks reused."""
    b = job.bundle
    views = _views(job, made, b.record.get("precision"))
    b.check_features(_made_by(views[0].encoder, b), "X")
    fast = {}
    for v in views:  # the same weights, batch norms folded for speed (checked to match)
        v.encoder = fast.setdefault(id(v.encoder), inference_encoder(v.encoder))
    reused = encode_stage(job, views)
    paths = [chunk_paths(job.out, "features")(i) for i in range(len(job.chunks))]
    return views, paths, readable(paths, job.chunks), reused


def predict_niches(job: Job) -> tuple[dict, np.ndarray, int]:
    """Niche students: encoder features of every tile (and of its context patch), then niche
    probabilities from each tile's neighbourhood."""
    b = job.bundle
    model = b.model
    made = {"features": {**model.feature_record(), "size_um": b.size_um, "px": b.px}}
    if model.config.context_key:
        made["context"] = model.feature_record(context=True)
    views, paths, ok, reused = encode_features(job, made)
    stats = {what: feature_stats(paths, what) if what in made else None for what in ("features", "context")}
    digest = views[0].encoder.weights_digest
    made = {"features": {**made["features"], "weights_digest": digest},
            "context": {**made["context"], "weights_digest": digest} if "context" in made else None}
    pred_path = chunk_paths(job.out, "niches")
    reused += run_stage("niches", job.chunks, pred_path, lambda a, e: _niche_chunk(job, ok, a, e, stats, made), job.bar)
    probs = np.concatenate([load_chunk(pred_path(i), "probs") for i in range(len(job.chunks))])
    return {"niches": probs}, ok, reused


def _made_by(enc, b) -> ad.AnnData:
    """An empty AnnData whose ``uns["features"]["X"]`` describes features ``enc`` would make at the
    bundle's patch size: :meth:`Bundle.check_features` then refuses an encoder with other weights."""
    a = ad.AnnData(np.zeros((0, 0), np.float32))
    a.uns["features"] = {"X": {"encoder": enc.spec.name, "size_um": b.size_um, "px": b.px,
                               "weights_digest": enc.weights_digest}}
    return a


def _tile_readable(job: Job, rows: np.ndarray) -> np.ndarray:
    """(len(rows),) bool: each tile's patch can be decoded."""
    ds = TilePatches(job.tiles, job.reader, [(job.bundle.size_um, job.bundle.px, None)])
    return np.array([ds[int(i)][2] for i in rows], bool)


def predict_adapted(job: Job) -> tuple[dict, np.ndarray, int]:
    """Adapted-encoder students (PEKA, STAMP) predict from the tile patches themselves; a chunk
    holding an unreadable tile is predicted without it."""
    model = job.bundle.model
    path = chunk_paths(job.out, "pred")

    def compute(a, b):
        rows = np.arange(a, b)
        try:
            ok = np.ones(len(rows), bool)
            frame = model.predict(job.tiles[rows].copy(), inplace=False)
        except UnreadableRegion:
            ok = _tile_readable(job, rows)
            frame = model.predict(job.tiles[rows[ok]].copy(), inplace=False) if ok.any() else None
        pred = np.full((len(rows), len(job.bundle.outputs[model.targets_key])), np.nan, np.float32)
        if frame is not None:
            pred[ok] = np.asarray(getattr(frame, "to_numpy", lambda: frame)(), dtype=np.float32)
        return {"pred": pred, "ok": ok}

    reused = run_stage("predict", job.chunks, path, compute, job.bar)
    paths = [path(i) for i in range(len(job.chunks))]
    pred = np.concatenate([load_chunk(p, "pred") for p in paths])
    return {model.targets_key: pred}, readable(paths, job.chunks), reused

