"""Batched patch feature extraction with an on-disk cache."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._errors import StdistillError
from .._utils import array_digest, progress, resolve_device
from ..io._section import SECTION_KEY, SPATIAL_KEY, has_image, image, sections
from .cache import FeatureCache, entry_key

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "effnet-lite0-imagenet"
#: bumped whenever patch reading or preprocessing changes the numbers (part of cache keys)
PIPELINE_VERSION = 2
PADDED_KEY = "patch_padded"
UNS_KEY = "features"


# ---------------------------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------------------------

_PRECISIONS = {
    "fp32": "fp32", "32": "fp32", "32-true": "fp32", "float32": "fp32",
    "bf16": "bf16", "bf16-mixed": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "float16": "fp16",
}


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is faster.

    Measured here (2-core AMD EPYC with AVX512-BF16, tf_efficientnet_lite0, batch 64, channels
    last): bf16 about 1.3-2x the patches/s of fp32; ``benchmarks/extract_throughput.py`` prints
    both. Without native bf16 the emulation is slower than fp32.
    """
    import torch

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover
            pass
    return False


def resolve_precision(precision: str, device: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a GPU that supports it (else ``"fp16"``), ``"fp32"`` on a CPU.

    On a CPU "auto" is always fp32, so features (and every number computed from them) are the
    same on every processor: bf16 moves HEST scores by about 10% and is only faster on CPUs with
    native bf16 (:func:`cpu_has_native_bf16`); pass ``"bf16"`` explicitly for that speed. Other
    values: ``"fp32"``, ``"bf16"``, ``"fp16"`` (aliases like ``"bf16-mixed"`` are accepted).
    """
    import torch

    if precision == "auto":
        if str(device).startswith("cuda"):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    try:
        return _PRECISIONS[str(precision).lower()]
    except KeyError:
        raise StdistillError(f"unknown precision {precision!r}; use 'auto', 'fp32', 'bf16' or 'fp16'") from None


def autocast(device: Any, precision: str):
    """The autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    dev_type = torch.device(device).type
    return torch.autocast(device_type=dev_type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# background prefetch: read the next batches (decode, crop, resample) while the model computes
# ---------------------------------------------------------------------------------------------

class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(iterable: Iterable, depth: int = 3) -> Iterator:
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead.

    Image decoding (Pillow), resampling and ``torch.stack`` release the GIL, so patch reading
    overlaps with the forward pass. Exceptions are re-raised in the caller.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))

    t = threading.Thread(target=work, name="stdistill-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

@dataclass
class SectionStatus:
    section: str
    n_spots: int
    status: str  # "cache hit", "computed", "skipped (no image)"
    entry: str | None = None


@dataclass
class ExtractionReport:
    """What :func:`extract` did: per section, a cache hit, computed or skipped."""

    encoder: str
    key_added: str
    precision: str
    device: str
    seconds: float = 0.0
    patches_computed: int = 0
    sections: list[SectionStatus] = field(default_factory=list)
    #: seconds of the clean pass (stain estimates included), and of the ``views`` augmented passes
    seconds_clean: float = 0.0
    views: int = 0
    seconds_views: float = 0.0

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([s.__dict__ for s in self.sections]).set_index("section")


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------

def _light(adata: ad.AnnData, secs: list[str]) -> tuple[ad.AnnData, np.ndarray]:
    """A counts-free AnnData of ``secs`` (what PatchDataset needs) and its rows in ``adata``."""
    sec = adata.obs[SECTION_KEY].astype(str).to_numpy()
    rows = np.flatnonzero(np.isin(sec, secs))
    obs = pd.DataFrame({SECTION_KEY: pd.Categorical(sec[rows], categories=secs)}, index=adata.obs_names[rows])
    light = ad.AnnData(obs=obs)
    light.obsm[SPATIAL_KEY] = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[rows]
    spatial = {}
    for s in secs:
        lib = adata.uns[SPATIAL_KEY][s]
        images = {k: v for k, v in lib.get("images", {}).items() if k == "fullres"}
        spatial[s] = {"scalefactors": dict(lib["scalefactors"]), "metadata": dict(lib.get("metadata", {})), "images": images}
    light.uns[SPATIAL_KEY] = spatial
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


def extract(
    adata: ad.AnnData,
    encoder: Any = DEFAULT_ENCODER,
    *,
    size_um: float = 112.0,
    px: int = 224,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    num_workers: int = 0,
    cache_dir: str | os.PathLike | bool | None = None,
    key_added: str | None = None,
    weights: str | os.PathLike | None = None,
    skip_missing: bool = False,
    strategy: str | None = None,
    devices: int | None = None,
    num_nodes: int = 1,
    stain_norm: str | None = None,
    stain_reference: Any = None,
    stain_sources: dict | None = None,
    views: int = 0,
    view_seed: int = 0,
    augment: Any = None,
) -> ad.AnnData:
    """Encode a patch around every spot: writes ``obsm["X_<encoder>"]`` (float32, n_spots x dim).

    Patches are ``size_um`` micrometres square, centred on ``obsm["spatial"]``, resampled to
    ``px`` pixels (:class:`stdistill.pp.PatchDataset`), then resized to the encoder's input size
    and normalised by the encoder. Works on one or many sections. Each section's features are
    cached on disk, keyed by content (image digest, spot coordinates, ``size_um``, ``px``,
    encoder spec and weights digest, precision): a second call reads the cache.

    Parameters
    ----------
    adata
        Sections in the stdistill layout (``obs["section"]``, ``obsm["spatial"]`` in pixels, an
        image per section).
    encoder
        A registry name (``stdistill encoders list``), an :class:`~stdistill.encoders.EncoderSpec`
        or a loaded :class:`~stdistill.encoders.Encoder` (e.g. fine-tuned). The default
        ``"effnet-lite0-imagenet"`` is an ImageNet model, not a pathology model.
    size_um, px
        Patch side in micrometres and in pixels (HEST: 112 um at 224 px = 0.5 um/px).
    batch_size
        Patches per forward pass.
    device
        ``"auto"`` (CUDA when visible), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
    precision
        ``"auto"``: bf16 autocast on GPUs (fp16 where bf16 is unsupported) and on CPUs with
        native bf16, else fp32; or ``"fp32"``, ``"bf16"``, ``"fp16"``.
    num_workers
        DataLoader worker processes reading patches; 0 reads them in a background thread.
    cache_dir
        Feature cache folder; None: ``$STDISTILL_CACHE/features`` or
        ``~/.cache/stdistill/features``; False: no cache.
    key_added
        obsm key; default ``"X_<encoder name>"``.
    weights
        Local weights for the encoder (safetensors or a state dict; see
        :func:`stdistill.encoders.load`).
    skip_missing
        Sections without an image get NaN features instead of raising.
    strategy, devices, num_nodes
        Multi-process extraction through Lightning ``Trainer.predict``: e.g. ``strategy="ddp",
        devices=4`` (Lightning re-runs your script once per device; or launch with torchrun),
        or ``"ddp_spawn"`` (spawns workers from this process: notebooks, tests). Patches are
        sharded across ranks and gathered into the cache; the result equals a single-process run.
    stain_norm
        ``"auto"``: the encoder's own choice (its registry spec's ``stain_norm``: Macenko for the
        ImageNet models, None for pathology foundation models; ``stdistill encoders list``).
        ``"macenko"`` or ``"reinhard"``: normalise every patch's stain onto a reference before
        encoding (:mod:`stdistill.pp` ``StainNormalizer``; needs the ``stain`` extra). Each
        section's stain is estimated from up to 64 of its patches; the method applied, the
        reference and the section's estimate are part of the cache key (so ``"auto"`` and the
        method it resolves to share entries). None (default): no normalisation.
    stain_reference
        The reference stain: None (the first imaged section of ``adata``), a section name, a
        stored state (``uns["features"][key]["stain"]`` of the training data, so a new slide is
        normalised exactly as the training slides) or a fitted ``StainNormalizer``.
    stain_sources
        ``{section: estimate}`` used instead of estimating those sections' stains from their
        patches (:func:`stain_estimates`: one estimate for a slide encoded chunk by chunk).
    views, view_seed, augment
        ``views`` > 0 also encodes that many augmented views of every patch (HED jitter,
        brightness/contrast, dihedral flip, scale jitter; ``augment``: a
        :class:`~stdistill.pp.PatchAugment` or its settings as a dict), each seeded by
        (``view_seed``, spot name, view index), cached like the clean features, and written to
        ``obsm[key_added + "_views"]`` (float32, n_spots x views x dim). Costs ``views`` times
        the clean extraction.

    Returns
    -------
    ``adata``, modified in place: ``obsm[key_added]`` (float32), ``obs["patch_padded"]`` (bool:
    the patch reached beyond its image and was padded white), and
    ``uns["features"][key_added]`` (encoder, size_um, px, precision, weights digest; with
    ``stain_norm`` also ``"stain"``: method, reference and the per-section estimates; with
    ``views`` also ``"views"``: count, seed, augmentation settings).
    """
    _run(**locals())  # first statement: locals() holds exactly the arguments
    return adata


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
    """:func:`extract` (same arguments), returning an :class:`ExtractionReport` (cache hits,
    timings) instead of ``adata``."""
    try:
        bound = inspect.signature(extract).bind(adata, encoder, **kwargs)
    except TypeError as e:
        raise StdistillError(f"run_extraction: {e}") from None
    bound.apply_defaults()
    return _run(**bound.arguments)


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
    job = _Job(spec, enc, wdigest, dev, prec, cache, light, ds, light.obs[SECTION_KEY].astype(str).to_numpy(), rows,
               {s: image(adata, s).digest() for s in imaged}, dict(batch_size=batch_size, num_workers=num_workers, weights=weights, **kwargs))
    return job, imaged, no_image


def _section_estimates(ds, sec: np.ndarray, secs: list[str], norm, n_sample: int = 64) -> dict[str, dict]:
    """``{section: stain estimate}`` of ``norm``'s method, each from up to ``n_sample`` of the
    section's unpadded patches of ``ds`` (evenly spread over its rows)."""
    out = {}
    for s in secs:
        rows = np.flatnonzero(sec == s)
        clean = rows[~ds.padded[rows]]
        rows = clean if len(clean) else rows
        pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(n_sample, len(rows))).round().astype(int))]
        try:
            out[s] = norm.estimate([ds.read(int(i)) for i in pick])
        except StdistillError as e:
            raise StdistillError(f"section {s!r}: {e}") from None
    return out


def stain_estimates(adata: ad.AnnData, method: str, *, size_um: float = 112.0, px: int = 224,
                    n_sample: int = 64) -> dict[str, dict]:
    """Each imaged section's stain estimate, as :func:`extract` makes it (up to ``n_sample`` of its
    ``size_um`` patches at ``px``). Pass them back as ``extract(stain_sources=...)`` to normalise
    parts of a section (e.g. a slide encoded chunk by chunk) with one estimate."""
    from ..pp._stain import StainNormalizer
    from ..pp.patches import PatchDataset

    imaged = [s for s in sections(adata) if has_image(adata, s)]
    light, _ = _light(adata, imaged)
    ds = PatchDataset(light, size_um=size_um, px=px)
    return _section_estimates(ds, light.obs[SECTION_KEY].astype(str).to_numpy(), imaged, StainNormalizer(method), n_sample)


def _stain(job: _Job, imaged: list[str], method: str | None, reference: Any, stain_sources: dict | None = None,
           n_sample: int = 64):
    """(patch transform, uns record, per-section cache-key part); all None without ``method``."""
    from ..pp._stain import (
        SectionStainTransform,
        StainNormalizer,
        _rounded,
        check_method,
    )

    if method is None:
        if reference is not None or stain_sources:
            raise StdistillError("stain_reference or stain_sources is set but stain_norm is None; pass stain_norm='macenko' "
                                 "or 'reinhard'")
        return None, None, {}
    method = check_method(method)
    ref_section = ""
    if isinstance(reference, StainNormalizer):
        norm = reference
    elif isinstance(reference, dict):
        norm = StainNormalizer.from_state(reference)
    elif reference is None or isinstance(reference, str):
        ref_section = imaged[0] if reference is None else reference
        if ref_section not in imaged:
            raise StdistillError(f"stain_reference {ref_section!r} is not an imaged section here ({imaged}); "
                                 "pass a section name or a stored state (uns['features'][key]['stain'])")
        norm = StainNormalizer(method)
    else:
        raise StdistillError(f"stain_reference must be None, a section name, a stored state or a StainNormalizer, "
                             f"got {type(reference).__name__}")
    if norm.method != method:
        raise StdistillError(f"stain_reference was fitted with {norm.method!r}, but stain_norm is {method!r}")
    given = {s: _rounded(v) for s, v in (stain_sources or {}).items()}
    sources = {**_section_estimates(job.ds, job.sec, [s for s in imaged if s not in given], norm, n_sample),
               **{s: given[s] for s in imaged if s in given}}
    if ref_section:
        norm.reference = sources[ref_section]
    record = {**norm.state(), "reference_section": ref_section, "sections": sources}
    parts = {s: {"method": method, "reference": norm.reference, "source": sources[s], "n_sample": n_sample} for s in imaged}
    return SectionStainTransform(norm, sources, job.sec), record, parts


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
            "coords": array_digest(np.ascontiguousarray(job.light.obsm[SPATIAL_KEY][rows])),
            "mpp": float(job.light.uns[SPATIAL_KEY][s]["scalefactors"]["microns_per_pixel"]),
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
            from .distributed import predict_distributed

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
    key_added = key_added or f"X_{spec.name}"
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
        adata.obsm[f"{key_added}_views"] = out_v
    out = np.full((adata.n_obs, spec.dim), np.nan, dtype=np.float32)
    out[rows_in_adata] = feats_light
    padded = np.zeros(adata.n_obs, dtype=bool)
    padded[rows_in_adata] = job.ds.padded
    adata.obsm[key_added] = out
    adata.obs[PADDED_KEY] = padded
    adata.uns.setdefault(UNS_KEY, {})
    adata.uns[UNS_KEY][key_added] = params
    for s in no_image:
        status[s] = SectionStatus(s, int((adata.obs[SECTION_KEY].astype(str) == s).sum()), "skipped (no image)")
    report.sections = [status[s] for s in sections(adata)]
    report.seconds = time.perf_counter() - t0
    log.info("extracted %s: %s", key_added, ", ".join(f"{s.section} {s.status}" for s in report.sections))
    return report


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
