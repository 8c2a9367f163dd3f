"""Throughput of feature extraction: the whole pipeline against the model's pure forward pass.

Usage (from the repository root)::

    nice -n 5 python benchmarks/extract_throughput.py [--encoder effnet-lite0-imagenet]
        [--batch-size 64] [--precision auto] [--device cpu] [--data ../shared/data/her2st]
    python benchmarks/extract_throughput.py --smoke --out /tmp/smoke   # 2 small simulated sections

In one run it prints

1. the ratio of the whole extraction's throughput to the model's pure forward throughput, with
   both throughputs (patches/s). Measured section by section, alternating: first the pure forward
   pass (backbone + pooling) on pre-made, already normalised tensors in exactly the batch shapes
   the section needs, then ``stdistill.features.run_extraction`` on that section into an empty
   cache folder (decode the image, crop, resample, normalise, forward, write the cache; no cache
   hit). Alternating keeps the two comparable on a machine shared with other jobs, whose load
   drifts over minutes. Goal: ratio >= 0.9 (reading patches must not starve the model);
2. the wall time of one ``stdistill.features.extract`` call, by encoder name (so loading the
   encoder counts too), over all HER2ST sections with an image, into an empty cache (simulated
   sections when the HER2ST copy is absent);
3. for context: patch reading alone (decode, crop, resample; one thread) and the pure forward in
   fp32 and bf16 (how much ``precision="bf16"`` would gain; ``precision="auto"`` is fp32 on every
   CPU, bf16 or fp16 on GPUs).

Data: ``--data``, default ``$STDISTILL_DATA/her2st``, else ``../shared/data/her2st``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("STDISTILL_PROGRESS", "0")

import _common  # noqa: E402


def load_sections(data: Path, smoke: bool = False):
    import stdistill as sd

    if smoke:
        return sd.datasets.simulated(n_sections=2, n_patients=2, spots_per_section=12, seed=0), "simulated (2 small sections)"
    if (data / "data" / "ST-cnts").is_dir():
        adata = sd.datasets.her2st(root=data, images_only=True)
        return adata, f"HER2ST, sections with an image ({data})"
    print(f"{data} is absent: the HER2ST wall time is skipped; using simulated sections instead")
    return sd.datasets.simulated(n_sections=4, n_patients=2, seed=0), "simulated (4 sections)"


def pure_forward(enc, batch_size: int, n_batches: int, precision: str, device: str) -> float:
    """patches/s of backbone + pooling on pre-made normalised tensors (one warm-up batch)."""
    import torch

    from stdistill.features.extract import autocast

    g = torch.Generator().manual_seed(0)
    xs = [enc.preprocess(torch.randint(0, 256, (batch_size, 3, enc.spec.input_px, enc.spec.input_px),
                                       dtype=torch.uint8, generator=g)).to(device)
          for _ in range(n_batches + 1)]
    with torch.inference_mode(), autocast(device, precision):
        enc.features(xs[0])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for x in xs[1:]:
            enc.features(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return n_batches * batch_size / dt


def forward_time(enc, n: int, batch_size: int, precision: str, device: str) -> float:
    """Seconds of backbone + pooling over ``n`` patches in batches of ``batch_size`` (pre-made, normalised)."""
    import torch

    from stdistill.features.extract import autocast

    g = torch.Generator().manual_seed(n)
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    px = enc.spec.input_px
    xs = [enc.preprocess(torch.randint(0, 256, (b, 3, px, px), dtype=torch.uint8, generator=g)).to(device) for b in sizes]
    with torch.inference_mode(), autocast(device, precision):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for x in xs:
            enc.features(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t


def reading_only(adata, size_um: float, px: int, limit: int) -> float:
    """patches/s of PatchDataset.read alone (fresh readers: includes decoding), one thread."""
    from stdistill.io._section import _open_cached
    from stdistill.pp import PatchDataset

    _open_cached.cache_clear()
    ds = PatchDataset(adata, size_um=size_um, px=px)
    n = min(limit, len(ds))
    idx = [round(i * (len(ds) - 1) / max(1, n - 1)) for i in range(n)]  # spread over all sections
    t = time.perf_counter()
    for i in idx:
        ds.read(i)
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="effnet-lite0-imagenet")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--size-um", type=float, default=112.0)
    p.add_argument("--px", type=int, default=224)
    p.add_argument("--data", type=Path, default=_common.data_root() / "her2st")
    _common.add_args(p)
    args = p.parse_args(argv)
    _common.smoke(args, batch_size=8)
    results = _common.Results(args, precision=args.precision)
    rows = []

    import torch

    import stdistill as sd
    from stdistill.features.extract import resolve_precision
    from stdistill.io._section import _open_cached

    device = sd._utils.resolve_device(args.device)
    prec = resolve_precision(args.precision, device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, precision {prec}, "
          f"encoder {args.encoder}, batch {args.batch_size}, {args.size_um:g} um -> {args.px} px, "
          f"num_workers {args.num_workers}")
    adata, what = load_sections(args.data, args.smoke)
    print(f"data: {what}: {adata.n_obs} spots in {len(sd.io.sections(adata))} sections")
    enc = sd.encoders.load(args.encoder, device=device)
    # warm-up: every batch shape once (oneDNN builds its kernels per shape on first use), so that
    # neither measurement below pays for building them
    shapes = {args.batch_size} | {n % args.batch_size for n in adata.obs["section"].value_counts()} - {0}
    for b in sorted(shapes):
        forward_time(enc, b, b, prec, device)

    # 1) alternate, section by section: pure forward on the same batch shapes, then the pipeline
    t_pure = t_pipe = 0.0
    for s in sd.io.sections(adata):
        one = sd.io.subset_sections(adata, [s])
        t_pure += forward_time(enc, one.n_obs, args.batch_size, prec, device)
        _open_cached.cache_clear()  # decode the image again inside the timed extraction
        with tempfile.TemporaryDirectory(prefix="stdistill-bench-cache-") as cache:
            t = time.perf_counter()
            rep = sd.features.run_extraction(
                one, enc, size_um=args.size_um, px=args.px, batch_size=args.batch_size, device=device,
                precision=prec, num_workers=args.num_workers, cache_dir=cache,
            )
            t_pipe += time.perf_counter() - t
        assert rep.patches_computed == one.n_obs, "the cache must start empty"
    fwd, pipe = adata.n_obs / t_pure, adata.n_obs / t_pipe
    print(f"pure forward (pre-made normalised tensors, same batch shapes): {fwd:.1f} patches/s ({t_pure:.1f} s)")
    print(f"whole extraction (decode, crop, resample, normalise, forward, cache write): {pipe:.1f} patches/s "
          f"({t_pipe:.1f} s)")
    print(f"ratio whole / pure forward: {pipe / fwd:.2f}  (goal >= 0.9)")
    rows += [["pure forward, same batch shapes", prec, adata.n_obs, t_pure, fwd],
             ["whole extraction, section by section", prec, adata.n_obs, t_pipe, pipe]]

    # 2) one call over all sections, by name, empty cache
    _open_cached.cache_clear()
    with tempfile.TemporaryDirectory(prefix="stdistill-bench-cache-") as cache:
        t = time.perf_counter()
        rep = sd.features.run_extraction(
            adata, args.encoder, size_um=args.size_um, px=args.px, batch_size=args.batch_size, device=device,
            precision=prec, num_workers=args.num_workers, cache_dir=cache,
        )
        wall = time.perf_counter() - t
    assert rep.patches_computed == adata.n_obs
    print(f"wall time to extract {what}: {wall:.1f} s for {adata.n_obs} patches ({adata.n_obs / wall:.1f} patches/s)")
    rows.append([f"features.extract by name, one call ({what})", prec, adata.n_obs, wall, adata.n_obs / wall])

    read = reading_only(adata, args.size_um, args.px, limit=400)
    print(f"context: patch reading alone (decode, crop, resample; 1 thread): {read:.1f} patches/s")
    rows.append(["patch reading alone (1 thread)", "", min(400, adata.n_obs), None, read])
    if device == "cpu":
        for p_ in ("fp32", "bf16"):
            speed = pure_forward(enc, args.batch_size, 3, p_, device)
            print(f"context: pure forward {p_}: {speed:.1f} patches/s")
            rows.append([f"pure forward {p_}", p_, 3 * args.batch_size, None, speed])
    results.table("throughput", rows, ["measure", "precision", "patches", "seconds", "patches/s"],
                  {"seconds": 1, "patches/s": 1})
    results.table("ratio", [[args.encoder, args.batch_size, pipe / fwd]], ["encoder", "batch", "whole / pure forward"],
                  {"whole / pure forward": 2})
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
