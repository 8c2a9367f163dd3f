"""Peak memory of ``stdistill predict`` at two synthetic pyramidal slide sizes 4x apart in area.

Writes two tiled pyramidal TIFFs (generated tile by tile, so the writer never holds a slide),
trains a small niche student on simulated spots with the offline ImageNet encoder
(effnet-lite0-imagenet: not a pathology model; the numbers are about memory and speed only),
then runs ``stdistill.slide.predict_slide`` on each slide in a fresh process and reports that
process's peak RSS and tiles/s. Streaming means the ratio of peak RSS (large / small) stays near 1.

    python benchmarks/slide_memory.py [--side 6144] [--threads 2] [--workdir DIR]
    python benchmarks/slide_memory.py --smoke --out /tmp/smoke     # 768 px slides, a tiny student
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common

TILE = 256
MPP = 0.5  # um/px of the synthetic slides (a 20x scan)


def _block(x0: int, y0: int, w: int, h: int, down: int, W: int, H: int) -> np.ndarray:
    """RGB uint8 pixels [x0, x0+w) x [y0, y0+h) of pyramid level ``down`` (level-0 px = ``down`` x these):
    glass, with an elliptic tissue piece (pink stroma, dark nuclei) covering about half the slide."""
    rng = np.random.default_rng([x0, y0, down])
    ys, xs = np.mgrid[y0:y0 + h, x0:x0 + w] * down
    inside = ((xs - W / 2) / (0.45 * W)) ** 2 + ((ys - H / 2) / (0.42 * H)) ** 2 < 1
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (244, 244, 246)
    tissue = np.array([214, 140, 196], np.uint8)
    img[inside] = tissue
    nuclei = inside & (rng.random((h, w)) < 0.08)
    img[nuclei] = (92, 60, 140)
    return img


def _tiles(W: int, H: int, down: int):
    w, h = -(-W // down), -(-H // down)
    for y in range(0, h, TILE):
        for x in range(0, w, TILE):
            yield _block(x, y, TILE, TILE, down, W, H)


def write_slide(path: Path, W: int, H: int, levels: int = 4) -> Path:
    """A tiled, zlib-compressed pyramidal TIFF of W x H px at ``MPP`` um/px, written tile by tile."""
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(_tiles(W, H, 1), shape=(H, W, 3), dtype=np.uint8, tile=(TILE, TILE), subifds=levels - 1,
                 photometric="rgb", compression="zlib", resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
        for k in range(1, levels):
            d = 2**k
            tw.write(_tiles(W, H, d), shape=(-(-H // d), -(-W // d), 3), dtype=np.uint8, tile=(TILE, TILE),
                     subfiletype=1, photometric="rgb", compression="zlib")
    return path


def make_bundle(path: Path, side: int = 5, epochs: int = 3) -> Path:
    """A niche student on simulated colour spots, effnet-lite0-imagenet features at 112 um / 224 px."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _io_helpers import colour_sections

    import stdistill as sd
    from stdistill.students import NicheStudent
    from stdistill.teachers import NicheTeacher

    a = colour_sections(2, side, seed=0)
    sd.features.extract(a, "effnet-lite0-imagenet", size_um=112, px=224, device="cpu", precision="fp32", cache_dir=False)
    NicheTeacher(3, seed=0).fit_predict(a)
    s = NicheStudent(feature_key="X_effnet-lite0-imagenet", radius_um=250, max_epochs=epochs, val_patients=None, n_pcs=8)
    sd.bundle.save_bundle(s.fit(a), path)
    return path


def child(slide: str, bundle: str, out: str, threads: int) -> None:
    """Predict one slide in this process; print JSON with peak RSS (MiB), tiles and seconds."""
    import resource

    import torch

    torch.set_num_threads(threads)
    import stdistill as sd

    t0 = time.perf_counter()
    r = sd.slide.predict_slide(slide, bundle, out, quiet=True)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"tiles": r.n_tiles, "seconds": sec, "peak_rss_mib": peak}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=6144, help="width of the small slide in px (height 3/4 of it)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--workdir", type=Path, default=None, help="where slides and outputs go (default: a temp folder)")
    ap.add_argument("--child", nargs=3, metavar=("SLIDE", "BUNDLE", "OUT"), help=argparse.SUPPRESS)
    _common.add_args(ap)
    args = ap.parse_args()
    if args.child:
        child(*args.child, threads=args.threads)
        return 0
    small = _common.smoke(args, side=768, threads=1)
    if small and args.workdir is None:
        args.workdir = args.out / "work"
    results = _common.Results(args, seeds=[0], precision="fp32")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stdistill_slide_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(work / "bundle", *((3, 1) if small else ()))
    rows = []
    for f in (1, 2):  # 2x each side: 4x the area
        W, H = args.side * f, args.side * 3 // 4 * f
        slide = write_slide(work / f"slide_{W}x{H}.tif", W, H)
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", str(slide), str(bundle),
                              str(work / f"out_{W}x{H}")], capture_output=True, text=True)
        row = {"slide px": f"{W}x{H}", "area mm2": W * H * MPP**2 / 1e6}
        if out.returncode != 0:
            rows.append({**row, "error": f"exit {out.returncode}: {(out.stderr or out.stdout).strip().splitlines()[-1:]}"})
            print(f"{W}x{H} px: {rows[-1]['error']}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({**row, "tiles": r["tiles"], "seconds": r["seconds"], "tiles/s": r["tiles"] / r["seconds"],
                     "peak RSS MiB": r["peak_rss_mib"], "error": None})
        print(f"{W}x{H} px ({row['area mm2']:.1f} mm^2): {r['tiles']} tiles in {r['seconds']:.1f} s "
              f"({rows[-1]['tiles/s']:.1f} tiles/s), peak RSS {r['peak_rss_mib']:.0f} MiB")
    ok = [r for r in rows if not r["error"]]
    ratio = ok[1]["peak RSS MiB"] / ok[0]["peak RSS MiB"] if len(ok) == 2 else float("nan")
    print(f"peak RSS ratio (4x area): {ratio:.3f} ({'OK' if ratio <= 1.2 else 'ABOVE'} the 1.2 bound); "
          f"threads {args.threads}; encoder effnet-lite0-imagenet fp32, 112 um / 224 px")
    print(f"benchmark run time: {time.perf_counter() - results.t0:.0f} s (outputs in {work})")
    results.table("slides", rows, digits={"area mm2": 1, "seconds": 1, "tiles/s": 1, "peak RSS MiB": 0})
    results.table("ratio", [[ratio, args.threads]], ["peak RSS ratio (4x area)", "threads"], {"peak RSS ratio (4x area)": 3})
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
