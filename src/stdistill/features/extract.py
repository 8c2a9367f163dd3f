"""Batched patch feature extraction with an on-disk cache: :func:`extract` and its variants.

The work is split into named steps: :mod:`._encode` (the job and its passes over the patches),
:mod:`._stain` (stain estimates and reference), :mod:`._precision`, :mod:`._prefetch`,
:mod:`._report`; multi-process runs go through :mod:`.distributed`.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from typing import Any

import anndata as ad
import numpy as np

from .._errors import StdistillError
from .._keys import Key
from ..io._section import sections
from ._encode import PIPELINE_VERSION, _encode_pass, _setup, _views
from ._precision import autocast, cpu_has_native_bf16, resolve_precision
from ._prefetch import prefetch
from ._report import ExtractionReport, SectionStatus
from ._stain import _stain, stain_estimates

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "effnet-lite0-imagenet"

__all__ = ["DEFAULT_ENCODER", "PIPELINE_VERSION", "ExtractionReport", "SectionStatus", "autocast", "cpu_has_native_bf16",
           "extract", "extraction_kwargs", "prefetch", "resolve_precision", "run_extraction", "stain_estimates"]


def extract(
    adata: ad.AnnData, encoder: Any = DEFAULT_ENCODER, *, size_um: float = 112.0, px: int = 224,
    batch_size: int = 64, device: str = "auto", precision: str = "auto", num_workers: int = 0,
    cache_dir: str | os.PathLike | bool | None = None, key_added: str | None = None,
    weights: str | os.PathLike | None = None, skip_missing: bool = False, strategy: str | None = None,
    devices: int | None = None, num_nodes: int = 1, stain_norm: str | None = None, stain_reference: Any = None,
    stain_sources: dict | None = None, views: int = 0, view_seed: int = 0, augment: Any = None, copy: bool = False,
) -> ad.AnnData | None:
    """Encode a patch around every spot: writes ``obsm["X_<encoder>"]`` (float32, n_spots x dim).

    Patches are ``size_um`` micrometres square, centred on ``obsm["spatial"]``, resampled to
    ``px`` pixels (:class:`stdistill.pp.PatchDataset`), then resized to the encoder's input size
    and normalised by the encoder. Each section's features are cached on disk, keyed by content
    (image digest, spot coordinates, ``size_um``, ``px``, encoder spec and weights digest,
    precision): a second call reads the cache.

    Parameters
    ----------
    adata
        Sections in the stdistill layout (``obs["section"]``, ``obsm["spatial"]`` in pixels, an image per section).
    encoder
        A registry name (``stdistill encoders list``), an :class:`~stdistill.encoders.EncoderSpec` or a loaded
        :class:`~stdistill.encoders.Encoder`. The default ``"effnet-lite0-imagenet"`` is an ImageNet model.
    size_um, px
        Patch side in micrometres and in pixels (HEST: 112 um at 224 px = 0.5 um/px).
    batch_size, num_workers
        Patches per forward pass; DataLoader worker processes (0: a background thread reads patches).
    device
        ``"auto"`` (CUDA when visible), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
    precision
        ``"auto"`` (:func:`resolve_precision`: bf16 autocast on GPUs, fp16 where bf16 is unsupported,
        fp32 on CPUs), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    cache_dir
        Feature cache folder; None: ``$STDISTILL_CACHE/features`` or ``~/.cache/stdistill/features``; False: none.
    key_added
        obsm key; default ``"X_<encoder name>"`` (:meth:`stdistill.keys.Key.obsm.features`).
    weights
        Local weights for the encoder (safetensors or a state dict; :func:`stdistill.encoders.load`).
    skip_missing
        Sections without an image get NaN features instead of raising.
    strategy, devices, num_nodes
        Multi-process extraction through Lightning ``Trainer.predict`` (``strategy="ddp", devices=4``, or
        ``"ddp_spawn"`` for notebooks and tests); the result equals a single-process run.
    stain_norm, stain_reference, stain_sources
        ``stain_norm``: None (default), ``"macenko"``, ``"reinhard"`` or ``"auto"`` (the encoder's registry
        choice) normalises every patch onto a reference stain before encoding (needs the ``stain`` extra);
        each section's estimate comes from up to 64 of its patches and is part of the cache key.
        ``stain_reference``: None (the first imaged section), a section name, a stored state
        (``uns["features"][key]["stain"]`` of the training data) or a fitted ``StainNormalizer``.
        ``stain_sources``: ``{section: estimate}`` used instead of estimating (:func:`stain_estimates`).
    views, view_seed, augment
        ``views`` > 0 also encodes that many augmented views of every patch (HED jitter, brightness/contrast,
        dihedral flip, scale jitter; ``augment``: a :class:`~stdistill.pp.PatchAugment` or its settings),
        seeded by (``view_seed``, spot, view), into ``obsm[key_added + "_views"]`` (n_spots x views x dim).
    copy
        Write into a copy of ``adata`` and return it.

    Returns
    -------
    None (``copy=True``: the copy). Writes ``obsm[key_added]`` (float32), ``obs["patch_padded"]`` (bool: the
    patch reached beyond its image and was padded white) and ``uns["features"][key_added]`` (encoder, dim,
    size_um, px, precision, weights digest, licence; ``"stain"``: method, reference and per-section
    estimates; ``"views"``: count, seed, augmentation settings).
    """
    kwargs = dict(locals())  # first statement: locals() holds exactly the arguments
    if kwargs.pop("copy"):
        kwargs["adata"] = adata.copy()
        _run(**kwargs)
        return kwargs["adata"]
    _run(**kwargs)
    return None


def extraction_kwargs(record: dict) -> dict:
    """:func:`extract` keyword arguments that make features the way a stored record says.

    ``record``: an ``uns["features"][key]`` entry (or its copy in a saved model): encoder,
    ``size_um``, ``px``, precision and, when the features were stain-normalised, the method and
    its stored reference (each new section gets its own estimate, mapped onto that reference).
    """
    try:
        kw = {"encoder": record["encoder"], "size_um": float(record["size_um"]), "px": int(record["px"])}
    except (KeyError, TypeError):
        raise StdistillError("a features record needs 'encoder', 'size_um' and 'px' (uns['features'][key])") from None
    if record.get("precision"):
        kw["precision"] = record["precision"]
    stain = record.get("stain")
    if stain:
        kw.update(stain_norm=stain["method"], stain_reference={"method": stain["method"], "reference": stain["reference"]})
    return kw


def run_extraction(adata: ad.AnnData, encoder: Any = DEFAULT_ENCODER, **kwargs: Any) -> ExtractionReport:
    """:func:`extract` (same arguments; it writes in place), returning an :class:`ExtractionReport`
    (cache hits, timings)."""
    try:
        bound = inspect.signature(extract).bind(adata, encoder, **kwargs)
    except TypeError as e:
        raise StdistillError(f"run_extraction: {e}") from None
    bound.apply_defaults()
    if bound.arguments.pop("copy"):
        raise StdistillError("run_extraction writes in place and returns its report; copy=True is extract's")
    return _run(**bound.arguments)


def _run(adata, encoder, *, size_um, px, batch_size, device, precision, num_workers, cache_dir, key_added, weights,
         skip_missing, strategy, devices, num_nodes, stain_norm, stain_reference, stain_sources, views, view_seed,
         augment) -> ExtractionReport:
    """The work of :func:`extract` (its arguments and defaults are documented there)."""
    t0 = time.perf_counter()
    job, imaged, no_image = _setup(
        adata, encoder, size_um=size_um, px=px, batch_size=batch_size, device=device, precision=precision,
        num_workers=num_workers, cache_dir=cache_dir, weights=weights, skip_missing=skip_missing, views=views,
        strategy=strategy, devices=devices, num_nodes=num_nodes)
    spec = job.spec
    key_added = key_added or Key.obsm.features(spec.name)
    report = ExtractionReport(encoder=spec.name, key_added=key_added, precision=job.prec, device=job.dev)
    if stain_norm == "auto":
        stain_norm = spec.stain_norm
        if stain_norm is None and stain_reference is not None:
            raise StdistillError(f"stain_norm='auto' resolves to None for encoder {spec.name!r} (its registry choice), "
                                 "but stain_reference is set; pass stain_norm='macenko' or 'reinhard'")
    stain_tf, stain_record, stain_parts = _stain(job, imaged, stain_norm, stain_reference, stain_sources)
    feats_light, status, report.patches_computed = _encode_pass(job, imaged, stain_parts, stain_tf, "")
    report.seconds_clean = time.perf_counter() - t0
    rows_in_adata = job.rows
    params = {
        "encoder": spec.name, "dim": int(spec.dim), "size_um": float(size_um), "px": int(px),
        "precision": job.prec, "weights_digest": job.wdigest, "licence": spec.licence,
    }
    if stain_record is not None:
        params["stain"] = stain_record
    if views:
        t1 = time.perf_counter()
        v, params["views"], n = _views(job, imaged, views, view_seed, augment, stain_tf, stain_parts)
        report.patches_computed += n
        report.views, report.seconds_views = int(views), time.perf_counter() - t1
        out_v = np.full((adata.n_obs, views, spec.dim), np.nan, dtype=np.float32)
        out_v[rows_in_adata] = v
        adata.obsm[Key.obsm.views(key_added)] = out_v
    out = np.full((adata.n_obs, spec.dim), np.nan, dtype=np.float32)
    out[rows_in_adata] = feats_light
    padded = np.zeros(adata.n_obs, dtype=bool)
    padded[rows_in_adata] = job.ds.padded
    adata.obsm[key_added] = out
    adata.obs[Key.obs.patch_padded] = padded
    adata.uns.setdefault(Key.uns.features, {})[key_added] = params
    for s in no_image:
        status[s] = SectionStatus(s, int((adata.obs[Key.obs.section].astype(str) == s).sum()), "skipped (no image)")
    report.sections = [status[s] for s in sections(adata)]
    report.seconds = time.perf_counter() - t0
    log.info("extracted %s: %s", key_added, ", ".join(f"{s.section} {s.status}" for s in report.sections))
    return report
