"""``stdistill predict`` side by side with LazySlide (the scverse whole-slide toolkit) on one slide.

The slide: HER2ST section B4's H&E JPEG written as a tiled pyramidal TIFF (JPEG tiles, quality
90, 256 px, 4 levels) at 0.6875 um/px (derived from the 200 um spot pitch). The encoder:
``effnet-lite0-imagenet`` from stdistill's registry (ImageNet weights, not a pathology model),
fp32, batches of 32, on 112 um tiles resampled to 224 px. Every run is a fresh process with one
torch thread (OMP_NUM_THREADS=1):

- ``stdistill``: ``stdistill.slide.predict_slide`` end to end (tissue detection, tiling,
  features, a niche student's prediction, .h5ad/GeoJSON/maps), with ``num_workers`` 0 and W
  tile-reading processes;
- ``lazyslide, stdistill's tiles``: ``zs.tl.feature_extraction`` alone on the same tiles
  (written into the WSIData as a tiles element; LazySlide reads them at level 0 and resizes
  them to 224 px), ``num_workers=0`` (its default); once with the encoder as the registry loads
  it, once with its batch norms folded into the convolutions as ``stdistill predict`` runs it;
- ``lazyslide, own tiles``: ``zs.pp.find_tissues`` + ``zs.pp.tile_tissues`` (163 px tiles at the
  slide's own mpp: LazySlide does not up-sample) + feature extraction; the encoder resizes.

Speed: tiles per wall-clock second, and tiles per CPU second (the process and its reaped
workers; less sensitive to other jobs on the cores), of the timed step: ``predict_slide`` as a
whole for stdistill, ``feature_extraction`` alone for LazySlide. Each process first imports
the modules its run will load (``import_s``, reported apart: Python imports are the same
whatever the slide's size). Peak memory: the highest resident set (RSS,
``VmHWM``) of the main process, and the highest sum of proportional set sizes (PSS) over its
process tree (main + workers, shared pages counted once), sampled every 50 ms. Tile counts: stdistill's tissue detector with and without pale-fat
growth (``pale=False``: the detector before it), and LazySlide's ``find_tissues`` + tiles.
LazySlide rows are skipped, with the reason, where it is not installed
(``pip install 'stdistill[bench-wsi]'``). Other jobs may share the cores: compare rows of one run.

    python benchmarks/wsi_peers.py [--workers 2] [--repeats 2] [--smoke --out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

import _common

HERE = Path(__file__).resolve().parent
B4 = Path("data/ST-imgs/B/B4/BT10737_D2_HE.jpg")
MPP = 0.6875  # B4's um/px from the 200 um spot pitch (stdistill.io.legacy_st.pitch_pixels)
SIZE_UM, PX, BATCH = 112.0, 224, 32
ENCODER = "effnet-lite0-imagenet"


# ------------------------------------------------------------------------------------ inputs
def write_slide(work: Path, smoke: bool) -> Path:
    """B4 as a pyramidal TIFF (``--smoke``: 2000 x 2000 px of it, below the centre)."""
    from PIL import Image

    from stdistill.io import write_pyramid_tiff

    path = work / ("B4_smoke.tif" if smoke else "B4.tif")
    if path.is_file():
        return path
    src = _common.dataset("her2st") / B4
    if not src.is_file():
        raise _common.missing("HER2ST's B4 H&E", src)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(src) as im:
        a = np.asarray(im.convert("RGB"))
    if smoke:
        h, w = a.shape[:2]
        a = np.ascontiguousarray(a[h // 2: h // 2 + 2000, w // 2 - 1000: w // 2 + 1000])
    return write_pyramid_tiff(path, a, MPP, levels=4, tile=256, compression="jpeg", compressionargs={"level": 90})


def bundle(work: Path) -> Path:
    """A niche student on simulated spots with the encoder's features (as benchmarks/slide_memory.py)."""
    sys.path.insert(0, str(HERE))
    from slide_memory import make_bundle

    path = work / "bundle"
    return path if (path / "config.json").is_file() else make_bundle(path)


# ------------------------------------------------------------------------------------ memory
def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (t / "children").read_text().split()]
            except OSError:
                pass
    return out


def _pss_mib(pid: int) -> float:
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_child(args: list[str], timeout: float) -> dict:
    """Run this script with ``--child ...`` in a fresh one-thread process; its JSON result plus
    ``peak_pss_mib`` of its process tree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "STDISTILL_PROGRESS": "0",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _pss_mib(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate(timeout=timeout)
    t.join()
    if proc.returncode != 0:
        return {"error": (err.strip().splitlines() or ["failed"])[-1][:300]}
    return {**json.loads(out.strip().splitlines()[-1]), "peak_pss_mib": round(peak[0])}


# ------------------------------------------------------------------------------------ children
def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _one_thread():
    import torch

    torch.set_num_threads(1)


class _Timed:
    """Wall seconds and CPU seconds (this process and the workers it started and reaped) of a block."""

    def __enter__(self):
        import resource

        self.t, self.c = time.perf_counter(), time.process_time()
        self.k = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        import resource

        k = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.seconds = time.perf_counter() - self.t
        self.cpu_s = time.process_time() - self.c + (k.ru_utime - self.k.ru_utime) + (k.ru_stime - self.k.ru_stime)


def _imports(*modules: str) -> float:
    """Import ``modules`` (what a run loads lazily); their wall seconds, reported apart from the run."""
    import importlib

    t0 = time.perf_counter()
    for m in modules:
        importlib.import_module(m)
    return time.perf_counter() - t0


def child_stdistill(slide: str, bundle_dir: str, out: str, workers: str) -> dict:
    _one_thread()
    import_s = _imports("stdistill", "stdistill.slide", "stdistill.slide._models", "stdistill.bundle",
                        "stdistill.students.niche", "stdistill.encoders", "timm", "sklearn.decomposition",
                        "matplotlib.figure", "tiffslide")
    import stdistill as sd

    with _Timed() as t:
        r = sd.slide.predict_slide(slide, bundle_dir, out, quiet=True, num_workers=int(workers), batch_size=BATCH)
    return {"tiles": r.n_tiles, "seconds": t.seconds, "cpu_s": t.cpu_s, "import_s": import_s}


def _to_chw(img):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(img)[..., :3].transpose(2, 0, 1)))


def _lazy_wsi(slide: str):
    import wsidata

    return wsidata.open_wsi(slide, reader="tiffslide", store=str(Path(slide).with_suffix(".lazyslide.zarr")))


def _extract(wsi, folded: bool) -> _Timed:
    """LazySlide's feature extraction with the registry's encoder (``folded``: batch norms folded
    into the convolutions, as stdistill runs it)."""
    import lazyslide as zs

    from stdistill.encoders import load
    from stdistill.slide._tiles import inference_encoder

    enc = load(ENCODER, device="cpu")
    enc = inference_encoder(enc) if folded else enc
    with _Timed() as t:
        zs.tl.feature_extraction(wsi, model=enc, model_name="enc", transform=_to_chw, batch_size=BATCH, num_workers=0,
                                 device="cpu", amp=False, pbar=False)
    return t


_LAZY_IMPORTS = ("lazyslide", "wsidata", "stdistill.encoders", "stdistill.slide._tiles", "timm", "tiffslide")


def child_lazy_ours(slide: str, tiles_h5ad: str, folded: str) -> dict:
    """LazySlide's feature extraction on stdistill's tiles (read at level 0, resized to 224 px)."""
    _one_thread()
    import_s = _imports(*_LAZY_IMPORTS)
    import anndata as ad
    from wsidata import TileSpec
    from wsidata.io import add_tiles

    a = ad.read_h5ad(tiles_h5ad, backed="r")
    xy = np.asarray(a.obsm["spatial"], dtype=float)
    side = SIZE_UM / MPP
    wsi = _lazy_wsi(slide)
    down = (round(side) + 1e-6) / PX
    spec = TileSpec(height=PX, width=PX, stride_height=PX, stride_width=PX, mpp=SIZE_UM / PX, ops_level=0,
                    ops_downsample=down, base_downsample=down)
    add_tiles(wsi, "tiles", np.round(xy - side / 2), spec, tissue_ids=np.zeros(len(xy), int))
    t = _extract(wsi, folded == "1")
    return {"tiles": len(xy), "seconds": t.seconds, "cpu_s": t.cpu_s, "import_s": import_s}


def child_lazy_own(slide: str) -> dict:
    """LazySlide's own tissue detection and tiles (163 px at the slide's mpp), then features."""
    _one_thread()
    import_s = _imports(*_LAZY_IMPORTS)
    import lazyslide as zs

    wsi = _lazy_wsi(slide)
    t0 = time.perf_counter()
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, int(round(SIZE_UM / MPP)))
    t_tiles = time.perf_counter() - t0
    t = _extract(wsi, False)
    return {"tiles": len(wsi.shapes["tiles"]), "seconds": t.seconds, "cpu_s": t.cpu_s, "import_s": import_s,
            "seconds_tissue_tiles": t_tiles}


def child(mode: str, *args: str) -> None:
    fn = {"stdistill": child_stdistill, "lazy_ours": child_lazy_ours, "lazy_own": child_lazy_own}[mode]
    r = fn(*args)
    print(json.dumps({**r, "peak_rss_mib": round(_hwm_mib())}))


# ------------------------------------------------------------------------------------ main
def tile_counts(slide: Path) -> list[dict]:
    """Tiles of stdistill's detector with and without pale-fat growth (same grid, 50% tissue)."""
    import stdistill as sd

    rows = []
    for pale, what in ((True, "stdistill (pale fat grown in)"), (False, "stdistill without pale-fat growth")):
        t = sd.pp.tile(str(slide), size_um=SIZE_UM, px=PX, microns_per_pixel=MPP, pale=pale)
        rows.append({"detector": what, "tiles": t.n_obs})
    return rows


def lazyslide_missing() -> str | None:
    import importlib.util

    for mod in ("lazyslide", "wsidata"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'stdistill[bench-wsi]')"
    return None


def run_rows(slide: Path, bundle_dir: Path, work: Path, workers: int, repeats: int, timeout: float) -> list[dict]:
    """Every timed run, ``repeats`` times in turn (so both tools see the same load)."""
    import shutil

    skip = lazyslide_missing()
    rows = []
    for rep in range(repeats):
        for w in sorted({0, workers}):
            out = work / f"out_w{w}"
            shutil.rmtree(out, ignore_errors=True)
            r = run_child(["stdistill", str(slide), str(bundle_dir), str(out), str(w)], timeout)
            rows.append({"tool": "stdistill", "run": f"predict end to end, {w} workers", "repeat": rep, **r})
        h5ad = next((work / f"out_w{workers}").glob("*.h5ad"), None)
        for mode, what, extra in (("lazy_ours", "feature extraction, stdistill's tiles", [str(h5ad), "0"]),
                                  ("lazy_ours", "feature extraction, stdistill's tiles, batch norm folded",
                                   [str(h5ad), "1"]),
                                  ("lazy_own", "feature extraction, own tissue + tiles", [])):
            if skip:  # an optional peer not installed: the row says so, it is not a failure
                rows.append({"tool": "lazyslide", "run": what, "repeat": rep, "note": f"not run: {skip}"})
                continue
            if h5ad is None:
                rows.append({"tool": "lazyslide", "run": what, "repeat": rep, "error": "no stdistill tiles"})
                continue
            shutil.rmtree(slide.with_suffix(".lazyslide.zarr"), ignore_errors=True)
            rows.append({"tool": "lazyslide", "run": what, "repeat": rep, **run_child([mode, str(slide), *extra], timeout)})
    return rows


def _joined(values) -> str:
    """The distinct strings of a column, joined (NaN where a run had none)."""
    return "; ".join(sorted({str(x) for x in values if isinstance(x, str)}))


def summarise(rows: list[dict]):
    import pandas as pd

    t = pd.DataFrame(rows)
    for c in ("tiles", "seconds", "cpu_s", "import_s", "peak_rss_mib", "peak_pss_mib", "error", "note"):
        if c not in t:
            t[c] = np.nan
    t["tiles_per_s"] = t["tiles"] / t["seconds"]
    t["tiles_per_cpu_s"] = t["tiles"] / t["cpu_s"]
    agg = t.groupby(["tool", "run"], sort=False).agg(
        tiles=("tiles", "first"), tiles_per_s=("tiles_per_s", "median"), tiles_per_cpu_s=("tiles_per_cpu_s", "median"),
        seconds=("seconds", "median"), import_s=("import_s", "median"),
        peak_rss_mib=("peak_rss_mib", "max"), peak_pss_mib=("peak_pss_mib", "max"),
        error=("error", _joined), note=("note", _joined)).reset_index()
    return t, agg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="stdistill's tile-reading processes (besides 0)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each row, in turn (the median is shown)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    _common.add_args(ap, out="results/wsi_peers")
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    res = _common.Results(args, seeds=[0], precision="fp32")
    if _common.smoke(args, repeats=1):
        print("--smoke: a 2000 x 2000 px crop of B4, one repeat")
    args.out.mkdir(parents=True, exist_ok=True)
    slide = write_slide(args.out, args.smoke)
    counts = tile_counts(slide)
    rows = run_rows(slide, bundle(args.out), args.out, args.workers, args.repeats, args.timeout)
    lazy_tiles = next((r["tiles"] for r in rows if r.get("run", "").endswith("own tissue + tiles") and "tiles" in r), None)
    counts.append({"detector": "lazyslide find_tissues + tile_tissues", "tiles": lazy_tiles})
    runs, table = summarise(rows)
    print(f"slide {'B4 crop' if args.smoke else 'B4'} at {MPP} um/px; {ENCODER} fp32, batch {BATCH}, {SIZE_UM:g} um -> "
          f"{PX} px; one torch thread per run; medians of {args.repeats} repeat(s)")
    digits = {"tiles_per_s": 2, "tiles_per_cpu_s": 2, "seconds": 1, "import_s": 1, "peak_rss_mib": 0,
              "peak_pss_mib": 0}
    table["error"] = [e or None for e in table["error"]]
    table["note"] = [n or "" for n in table["note"]]
    for name, t, d in (("speed", table, digits), ("tiles", pd.DataFrame(counts), {}), ("runs", runs, digits)):
        res.table(name, t, digits=d)
    from stdistill.recipes.niches import markdown

    print(markdown(table, "{:.2f}") + "\n\n" + markdown(pd.DataFrame(counts)))
    print(f"benchmark run time: {time.perf_counter() - res.t0:.0f} s")
    sys.exit(res.finish())


if __name__ == "__main__":
    main()
