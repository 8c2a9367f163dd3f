"""One extraction's work: arguments resolved into a job, then passes over the patches (clean or an
augmented view), each section read from the cache or encoded and cached."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._keys import Key
from .._utils import array_digest, progress, resolve_device
from ..io._section import has_image, image, sections
from ._precision import autocast, resolve_precision
from ._prefetch import prefetch
from ._report import SectionStatus
from .cache import FeatureCache, entry_key

#: bumped whenever patch reading or preprocessing changes the numbers (part of cache keys)
PIPELINE_VERSION = 2


def _light(adata: ad.AnnData, secs: list[str]) -> tuple[ad.AnnData, np.ndarray]:
    """A counts-free AnnData of ``secs`` (what PatchDataset needs) and its rows in ``adata``."""
    sec = adata.obs[Key.obs.section].astype(str).to_numpy()
    rows = np.flatnonzero(np.isin(sec, secs))
    obs = pd.DataFrame({Key.obs.section: pd.Categorical(sec[rows], categories=secs)}, index=adata.obs_names[rows])
    light = ad.AnnData(obs=obs)
    light.obsm[Key.obsm.spatial] = np.asarray(adata.obsm[Key.obsm.spatial], dtype=np.float64)[rows]
    spatial = {}
    for s in secs:
        lib = adata.uns[Key.obsm.spatial][s]
        images = {k: v for k, v in lib.get("images", {}).items() if k == "fullres"}
        spatial[s] = {"scalefactors": dict(lib["scalefactors"]), "metadata": dict(lib.get("metadata", {})), "images": images}
    light.uns[Key.obsm.spatial] = spatial
    return light, rows


def _resolve_encoder(encoder, weights):
    """(spec, loaded Encoder or None, weights digest or None)."""
    from ..encoders import Encoder, get_spec
    from ..encoders._load import state_dict_digest, weights_digest

    if isinstance(encoder, Encoder):
        if weights is not None:
            raise StdistillError("weights= applies to encoder names; load the weights into your Encoder instead")
        now = state_dict_digest(encoder.backbone)
        if now == getattr(encoder, "loaded_state_digest", None):  # unchanged since load: same key as by name
            return encoder.spec, encoder, encoder.weights_digest
        return encoder.spec, encoder, now
    spec = get_spec(encoder)
    return spec, None, weights_digest(spec, weights)


@dataclass
class _Job:
    """What one extraction needs after its arguments are checked and resolved."""

    spec: Any
    enc: Any
    wdigest: str
    dev: str
    prec: str
    cache: FeatureCache | None
    light: ad.AnnData
    ds: Any
    sec: np.ndarray
    rows: np.ndarray
    digests: dict
    kwargs: dict


def _setup(adata, encoder, *, size_um, px, batch_size, device, precision, num_workers, cache_dir, weights,
           skip_missing, views, **kwargs) -> tuple[_Job, list[str], list[str]]:
    """Check the arguments, resolve device/precision/encoder/cache, build the patch dataset."""
    from ..pp.patches import PatchDataset

    if batch_size < 1:
        raise StdistillError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise StdistillError(f"num_workers must be >= 0, got {num_workers}")
    if views < 0:
        raise StdistillError(f"views must be >= 0, got {views}")
    secs = sections(adata)
    no_image = [s for s in secs if not has_image(adata, s)]
    if no_image and not skip_missing:
        raise StdistillError(
            f"{len(no_image)} section(s) have no H&E image: {no_image}; drop them "
            "(stdistill.io.subset_sections) or pass skip_missing=True (their features are NaN)"
        )
    imaged = [s for s in secs if s not in no_image]
    if not imaged:
        raise StdistillError("no section has an H&E image: nothing to encode")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    spec, enc, wdigest = _resolve_encoder(encoder, weights)
    if wdigest is None:  # hub weights not cached yet, or a module factory: build it to know
        from ..encoders import load

        enc = load(spec, weights=weights, device=dev)
        wdigest = enc.weights_digest
    cache = None if cache_dir is False else FeatureCache(None if cache_dir in (None, True) else cache_dir)
    light, rows = _light(adata, imaged)
    ds = PatchDataset(light, size_um=size_um, px=px)
    job = _Job(spec, enc, wdigest, dev, prec, cache, light, ds, light.obs[Key.obs.section].astype(str).to_numpy(), rows,
               {s: image(adata, s).digest() for s in imaged}, dict(batch_size=batch_size, num_workers=num_workers, weights=weights, **kwargs))
    return job, imaged, no_image


def _encode_pass(job: _Job, imaged: list[str], extra: dict[str, dict], transform, label: str):
    """Features (n_light, dim) of one pass over every imaged patch (clean or one augmented view):
    cache hits read, the rest encoded and cached. Returns (features, statuses, patches computed)."""
    spec = job.spec
    feats = np.full((job.light.n_obs, spec.dim), np.nan, dtype=np.float32)
    todo: list[dict] = []
    status: dict[str, SectionStatus] = {}
    for s in imaged:
        rows = np.flatnonzero(job.sec == s)
        parts = {
            "image": job.digests[s],
            "coords": array_digest(np.ascontiguousarray(job.light.obsm[Key.obsm.spatial][rows])),
            "mpp": float(job.light.uns[Key.obsm.spatial][s]["scalefactors"]["microns_per_pixel"]),
            "size_um": job.ds.size_um, "px": job.ds.px,
            "encoder": spec.name, "spec": spec.fingerprint(), "weights": job.wdigest, "precision": job.prec,
            "pipeline": PIPELINE_VERSION, **extra.get(s, {}),
        }
        key = entry_key(**parts)
        where = str(job.cache.path(spec.name, key)) if job.cache is not None else None
        hit = job.cache.get(spec.name, key, n=len(rows), dim=spec.dim) if job.cache is not None else None
        if hit is not None:
            feats[rows] = hit
            status[s] = SectionStatus(s, len(rows), f"cache hit{label}", where)
        else:
            todo.append({"section": s, "key": key, "rows": rows, "parts": parts})
            status[s] = SectionStatus(s, len(rows), f"computed{label}", where)
    if not todo:
        return feats, status, 0
    if job.enc is None:
        from ..encoders import load

        job.enc = load(spec, weights=job.kwargs["weights"], device=job.dev)
    rows_todo = np.concatenate([t["rows"] for t in todo])
    job.ds.transform = transform
    kw = dict(cache=job.cache, precision=job.prec, device=job.dev, batch_size=job.kwargs["batch_size"],
              num_workers=job.kwargs["num_workers"])
    try:
        if job.kwargs["strategy"]:
            from ._ddp import predict_distributed

            predict_distributed(job.ds, rows_todo, todo, job.enc, feats, strategy=job.kwargs["strategy"],
                                devices=job.kwargs["devices"] or 1, num_nodes=job.kwargs["num_nodes"], **kw)
        else:
            _predict_local(job.ds, rows_todo, todo, job.enc, feats, **kw)
    finally:
        job.ds.transform = None
    return feats, status, int(len(rows_todo))


def _views(job: _Job, imaged, n_views: int, seed: int, augment, stain_tf, stain_parts) -> tuple[np.ndarray, dict, int]:
    """(n_light, n_views, dim) features of augmented views, their settings and patches computed."""
    from ..pp._augment import PatchAugment, ViewTransform

    aug = augment if isinstance(augment, PatchAugment) else PatchAugment(**(augment or {}))
    out = np.full((job.light.n_obs, n_views, job.spec.dim), np.nan, dtype=np.float32)
    computed = 0
    names = job.light.obs_names.to_numpy()
    for k in range(n_views):
        tf = ViewTransform(aug, seed, names, k, before=stain_tf)
        extra = {s: {**stain_parts.get(s, {}), "view": k, "view_seed": int(seed), "augment": aug.params()} for s in imaged}
        out[:, k], _, n = _encode_pass(job, imaged, extra, tf, f" (view {k})")
        computed += n
    return out, {"n": int(n_views), "seed": int(seed), "augment": aug.params()}, computed



def _predict_local(ds, rows_todo, todo, enc, feats, *, cache, precision, device, batch_size, num_workers) -> None:
    """Single-process forward over ``rows_todo``; each finished section goes to the cache at once."""
    import torch

    loader = ds.loader(batch_size=batch_size, num_workers=num_workers, indices=rows_todo.tolist())
    sec_of_row = {}
    remaining = {}
    for t in todo:
        remaining[t["section"]] = len(t["rows"])
        for r in t["rows"]:
            sec_of_row[int(r)] = t["section"]
    by_section = {t["section"]: t for t in todo}
    was_training = enc.training
    enc.eval().to(device)
    batches = prefetch(loader) if num_workers == 0 else iter(loader)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for x, idx in progress(batches, total=len(loader), desc=f"{enc.spec.name}: encoding patches"):
                f = enc(x.to(device, non_blocking=True)).float().cpu().numpy()
                idx = idx.numpy()
                feats[idx] = f
                for i in idx:
                    s = sec_of_row[int(i)]
                    remaining[s] -= 1
                    if remaining[s] == 0 and cache is not None:
                        t = by_section[s]
                        cache.put(enc.spec.name, t["key"], feats[t["rows"]], section=s, key_parts=t["parts"])
    finally:
        if hasattr(batches, "close"):
            batches.close()
        enc.train(was_training)
