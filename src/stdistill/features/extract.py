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

    Returns
    -------
    ``adata``, modified in place: ``obsm[key_added]`` (float32), ``obs["patch_padded"]`` (bool:
    the patch reached beyond its image and was padded white), and
    ``uns["features"][key_added]`` (encoder, size_um, px, precision, weights digest).
    """
    _run(**locals())  # first statement: locals() holds exactly the arguments
    return adata


def run_extraction(adata: ad.AnnData, encoder: Any = DEFAULT_ENCODER, **kwargs: Any) -> ExtractionReport:
    """:func:`extract` (same arguments), returning an :class:`ExtractionReport` (cache hits,
    timings) instead of ``adata``."""
    try:
        bound = inspect.signature(extract).bind(adata, encoder, **kwargs)
    except TypeError as e:
        raise StdistillError(f"run_extraction: {e}") from None
    bound.apply_defaults()
    return _run(**bound.arguments)


def _run(adata, encoder, *, size_um, px, batch_size, device, precision, num_workers, cache_dir, key_added, weights,
         skip_missing, strategy, devices, num_nodes) -> ExtractionReport:
    """The work of :func:`extract` (its arguments and defaults are documented there)."""
    from ..pp.patches import PatchDataset

    t0 = time.perf_counter()
    if batch_size < 1:
        raise StdistillError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise StdistillError(f"num_workers must be >= 0, got {num_workers}")
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
    key_added = key_added or f"X_{spec.name}"
    if wdigest is None:  # hub weights not cached yet, or a module factory: build it to know
        from ..encoders import load

        enc = load(spec, weights=weights, device=dev)
        wdigest = enc.weights_digest
    cache = None if cache_dir is False else FeatureCache(None if cache_dir in (None, True) else cache_dir)
    report = ExtractionReport(encoder=spec.name, key_added=key_added, precision=prec, device=dev)

    light, rows_in_adata = _light(adata, imaged)
    ds = PatchDataset(light, size_um=size_um, px=px)
    light_sec = light.obs[SECTION_KEY].astype(str).to_numpy()
    n_light, dim = light.n_obs, spec.dim
    feats_light = np.full((n_light, dim), np.nan, dtype=np.float32)

    todo: list[dict] = []
    status: dict[str, SectionStatus] = {}
    for s in imaged:
        rows = np.flatnonzero(light_sec == s)
        parts = {
            "image": image(adata, s).digest(),
            "coords": array_digest(np.ascontiguousarray(light.obsm[SPATIAL_KEY][rows])),
            "mpp": float(light.uns[SPATIAL_KEY][s]["scalefactors"]["microns_per_pixel"]),
            "size_um": float(size_um), "px": int(px),
            "encoder": spec.name, "spec": spec.fingerprint(), "weights": wdigest, "precision": prec,
            "pipeline": PIPELINE_VERSION,
        }
        key = entry_key(**parts)
        hit = cache.get(spec.name, key, n=len(rows), dim=dim) if cache is not None else None
        if hit is not None:
            feats_light[rows] = hit
            status[s] = SectionStatus(s, len(rows), "cache hit", str(cache.path(spec.name, key)))
        else:
            todo.append({"section": s, "key": key, "rows": rows, "parts": parts})
            status[s] = SectionStatus(s, len(rows), "computed",
                                      str(cache.path(spec.name, key)) if cache is not None else None)

    if todo:
        if enc is None:
            from ..encoders import load

            enc = load(spec, weights=weights, device=dev)
        rows_todo = np.concatenate([t["rows"] for t in todo])
        if strategy:
            from .distributed import predict_distributed

            predict_distributed(
                ds, rows_todo, todo, enc, feats_light, cache=cache, precision=prec, device=dev,
                batch_size=batch_size, num_workers=num_workers, strategy=strategy,
                devices=devices or 1, num_nodes=num_nodes,
            )
        else:
            _predict_local(ds, rows_todo, todo, enc, feats_light, cache=cache, precision=prec, device=dev,
                           batch_size=batch_size, num_workers=num_workers)
        report.patches_computed = int(len(rows_todo))

    out = np.full((adata.n_obs, dim), np.nan, dtype=np.float32)
    out[rows_in_adata] = feats_light
    padded = np.zeros(adata.n_obs, dtype=bool)
    padded[rows_in_adata] = ds.padded
    adata.obsm[key_added] = out
    adata.obs[PADDED_KEY] = padded
    params = {
        "encoder": spec.name, "dim": int(dim), "size_um": float(size_um), "px": int(px),
        "precision": prec, "weights_digest": wdigest, "licence": spec.licence,
    }
    adata.uns.setdefault(UNS_KEY, {})
    adata.uns[UNS_KEY][key_added] = params
    for s in no_image:
        status[s] = SectionStatus(s, int((adata.obs[SECTION_KEY].astype(str) == s).sum()), "skipped (no image)")
    report.sections = [status[s] for s in secs]
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
