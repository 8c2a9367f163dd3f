"""How fit time and peak memory grow with the number of spots (synthetic data, CPU).

Cases, each measured in a fresh process (one case, one size per process):

- ``teacher``: :class:`stdistill.teachers.NicheTeacher` (``aggregate``: log-normalise, gene
  selection, per-section standardisation, PCA, ring aggregation, Gaussian mixture) on sparse counts.
- ``student``: :class:`stdistill.students.NicheStudent`, 2 epochs, no validation patient, on
  1280-d float32 features and synthetic teacher probabilities.
- ``probe``: HEST's probe :class:`stdistill.bench.HestRidge` (StandardScaler -> PCA(256) -> ridge)
  on the same features and log1p of 50 genes.
- ``trunk``: PEKA's trunk cache (:func:`stdistill.adapters._trunk.trunk_activations`): a cold
  call (activations made, written per section to the disk cache, assembled) then a warm call
  (read back from disk). The encoder's forward pass is replaced by synthetic activations of the
  real shape (effnet-lite0 cut ``blocks.6.0.conv_pwl``: 1152 x 7 x 7 float16, 113 KB per spot),
  since the forward pass is a fixed cost per patch measured elsewhere
  (``benchmarks/extract_throughput.py``). Run at a tenth of the other sizes: its activations
  alone are 11 GB at 100k spots.

Data: sections of 5,000 spots on a 100 um grid (1 um/px), 2 sections per patient, sparse
integer counts with 2,000 genes and about 10% non-zero (Visium-like depth after gene
filtering), features N(0, 1) float32 1280-d. Peak RSS is the high-water mark of the fit alone
(reset after the data are built, through ``/proc/self/clear_refs``), in GiB; "+/feat" is the
fit's own increase (peak minus the RSS before the fit, which already holds the data and about
0.6 GiB of imported libraries) divided by the feature matrix's size (for ``trunk``: by the
activations' size). The goal "peak RSS under 2x the feature matrix" is "+/feat" < 1. The exponent is
the slope of a log-log least-squares fit of time
(and of peak RSS) against spots.

    python benchmarks/scale.py                 # 10k and 100k spots (trunk: 1k, 10k)
    python benchmarks/scale.py --full          # adds 1M spots (trunk: 100k; needs > 24 GiB)
    python benchmarks/scale.py --sizes 5000,20000 --cases student,probe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import _common

SECTION_SPOTS = 5000
N_GENES = 2000
DENSITY = 0.1
DIM = 1280
K = 6
CASES = ("teacher", "student", "probe", "trunk")


_BASE = [0]


def _rss_reset() -> None:
    """Reset this process's peak RSS (Linux >= 4.0) and remember the RSS before the fit."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    _BASE[0] = _rss()


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; 0 when unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss() -> int:
    """Current RSS of this process in bytes (0 when unknown)."""
    return _status_bytes("VmRSS")


def _peak_rss() -> int:
    """Peak RSS of this process in bytes (VmHWM; else ru_maxrss)."""
    peak = _status_bytes("VmHWM")
    if peak:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cohort(n: int, seed: int = 0, counts: bool = True):
    """``n`` spots in sections of SECTION_SPOTS, sparse counts (or none), obsm['X_f'] features."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    import stdistill as sd

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(SECTION_SPOTS)))
    parts = []
    for k, start in enumerate(range(0, n, SECTION_SPOTS)):
        m = min(SECTION_SPOTS, n - start)
        ij = np.stack(np.unravel_index(np.arange(m), (side, side)), 1)
        xy = 200.0 + 100.0 * ij[:, ::-1].astype(np.float64)
        if counts:
            x = sp.random(m, N_GENES, density=DENSITY, format="csr", dtype=np.float32, random_state=rng,
                          data_rvs=lambda s: rng.poisson(3, s) + 1)
        else:
            x = None
        parts.append(sd.io.new_section(
            x, genes=[f"g{j}" for j in range(N_GENES)] if counts else [], spots=[f"s{k}_{i}" for i in range(m)],
            xy_px=xy, section=f"sec{k}", patient=f"p{k // 2}", microns_per_pixel=1.0, spot_diameter_um=55.0,
        ))
    adata = ad.concat(parts, uns_merge="unique") if len(parts) > 1 else parts[0]
    adata.obs = adata.obs.assign(section=pd.Categorical(adata.obs["section"]), patient=pd.Categorical(adata.obs["patient"]))
    adata.obsm["X_f"] = rng.standard_normal((adata.n_obs, DIM), dtype=np.float32)
    return adata


def _case_teacher(n: int) -> dict:
    from stdistill.teachers import NicheTeacher

    adata = _cohort(n)
    _rss_reset()
    t0 = time.perf_counter()
    NicheTeacher(n_niches=K, method="aggregate").fit_predict(adata)
    return {"seconds": time.perf_counter() - t0, "feature_bytes": adata.obsm["X_f"].nbytes,
            "counts_bytes": adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes}


def _case_student(n: int) -> dict:
    from stdistill.students import NicheStudent

    adata = _cohort(n, counts=False)
    rng = np.random.default_rng(1)
    adata.obsm["niche_probs"] = rng.dirichlet(np.ones(K), adata.n_obs).astype(np.float32)
    _rss_reset()
    t0 = time.perf_counter()
    NicheStudent(K, feature_key="X_f", max_epochs=2, min_epochs=1, val_patients=None, refit=False).fit(adata)
    return {"seconds": time.perf_counter() - t0, "feature_bytes": adata.obsm["X_f"].nbytes}


def _case_probe(n: int) -> dict:
    from stdistill.bench import HestRidge

    adata = _cohort(n)
    y = np.log1p(adata.X[:, :50].toarray())
    X = adata.obsm["X_f"]
    _rss_reset()
    t0 = time.perf_counter()
    HestRidge().fit(X, y)
    return {"seconds": time.perf_counter() - t0, "feature_bytes": X.nbytes}


def _case_trunk(n: int) -> dict:
    import tempfile

    import timm
    import torch

    import stdistill as sd
    from stdistill.adapters import _trunk
    from stdistill.adapters._config import AdapterConfig

    shape = (1, 1152, 7, 7)  # views, channels, 7 x 7: effnet-lite0 at blocks.6.0.conv_pwl, 224 px

    def synthetic(encoder, sub, cut, cfg, batch_size, device, stain=None):
        """Like ``_trunk._compute``: batch by batch into one preallocated float16 tensor."""
        g = torch.Generator().manual_seed(sub.n_obs)
        out = torch.empty((sub.n_obs, *shape), dtype=torch.float16)
        for i in range(0, sub.n_obs, batch_size):
            out[i:i + batch_size] = torch.randn((min(batch_size, sub.n_obs - i), *shape), generator=g)
        return out

    _trunk._compute = synthetic  # this process only: the forward pass is not what is measured
    _trunk._section_image_digest = lambda adata, s: s  # sections have no image here
    sd.encoders.register_module("scale-effnet", lambda: timm.create_model("tf_efficientnet_lite0", num_classes=0),
                                mean=(0.5,) * 3, std=(0.5,) * 3, input_px=224, dim=1280, overwrite=True)
    enc = sd.encoders.load("scale-effnet")
    adata = _cohort(n, counts=False)
    del adata.obsm["X_f"]
    # a budget below the activations at every size: the in-memory cache is skipped, as at scale
    os.environ["STDISTILL_TRUNK_MEMORY_GB"] = "0.05"
    with tempfile.TemporaryDirectory() as d:
        _rss_reset()
        t0 = time.perf_counter()
        a = _trunk.trunk_activations(enc, adata, AdapterConfig(), cache_dir=d)
        cold = time.perf_counter() - t0
        nbytes = a.numel() * a.element_size()
        del a
        t1 = time.perf_counter()
        _trunk.trunk_activations(enc, adata, AdapterConfig(), cache_dir=d)
        warm = time.perf_counter() - t1
    return {"seconds": cold, "warm_seconds": warm, "feature_bytes": nbytes}


def _child(case: str, n: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "2")))
    out = globals()[f"_case_{case}"](n)
    out["peak_rss"] = _peak_rss()
    out["base_rss"] = _BASE[0]
    print("RESULT " + json.dumps(out))


def _run(case: str, n: int, threads: int) -> dict:
    env = dict(os.environ, SCALE_THREADS=str(threads), OMP_NUM_THREADS=str(threads), STDISTILL_PROGRESS="0",
               HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", case, str(n)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return {"error": f"exit {r.returncode}: {tail[0][:200]}", "wall": wall}
    res = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    res["wall"] = wall
    return res


def _slope(ns: list[int], ys: list[float]) -> float:
    ok = [(a, b) for a, b in zip(ns, ys) if b > 0]
    if len(ok) < 2:
        return float("nan")
    x, y = np.log([a for a, _ in ok]), np.log([b for _, b in ok])
    return float(np.polyfit(x, y, 1)[0])


COLUMNS = ["case", "spots", "fit s", "peak GiB", "+/feat", "wall s", "note", "error"]
DIGITS = {"fit s": 1, "peak GiB": 2, "+/feat": 2, "wall s": 1}


def _row(case: str, m: int, res: dict) -> list:
    if "error" in res:
        return [case, m, None, None, None, res["wall"], "", res["error"]]
    note = f"warm read {res['warm_seconds']:.1f} s" if "warm_seconds" in res else ""
    return [case, m, res["seconds"], res["peak_rss"] / 2**30, (res["peak_rss"] - res["base_rss"]) / res["feature_bytes"],
            res["wall"], note, None]


def _print_row(r: list) -> None:
    def f(v, w, d):
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.{d}f}"

    print(f"{r[0]:8} {r[1]:>9} {f(r[2], 8, 1)} {f(r[3], 9, 2)} {f(r[4], 7, 2)} {f(r[5], 7, 1)}  {r[7] or r[6]}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma list of spot counts (trunk: a tenth)")
    ap.add_argument("--full", action="store_true", help="add 1,000,000 spots")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    _common.add_args(ap)
    a = ap.parse_args()
    if a.child:
        _child(a.child[0], int(a.child[1]))
        return 0
    _common.smoke(a, sizes="1000", full=False, threads=1)  # trunk: 100 spots; one size, so no exponent
    sizes = [int(s) for s in a.sizes.split(",")] + ([1_000_000] if a.full else [])
    results = _common.Results(a, seeds=[0], precision="fp32")
    import platform

    print(f"# stdistill benchmarks/scale.py on {platform.machine()} {os.cpu_count()} CPUs, {a.threads} threads; fp32")
    print(f"{'case':8} {'spots':>9} {'fit s':>8} {'peak GiB':>9} {'+/feat':>7} {'wall s':>7}  note")
    rows, slopes = [], []
    for case in a.cases.split(","):
        ns, ts, rs = [], [], []
        for n in sizes:
            m = n // 10 if case == "trunk" else n
            res = _run(case, m, a.threads)
            rows.append(_row(case, m, res))
            _print_row(rows[-1])
            if "error" not in res:
                ns.append(m)
                ts.append(res["seconds"])
                rs.append(res["peak_rss"])
        slopes.append([case, _slope(ns, ts), _slope(ns, rs)])
        print(f"{case:8} {'exponent':>9} {slopes[-1][1]:>8.2f} {slopes[-1][2]:>9.2f}")
    results.table("cases", rows, COLUMNS, DIGITS)
    results.table("exponents", slopes, ["case", "time exponent", "peak RSS exponent"],
                  {"time exponent": 2, "peak RSS exponent": 2})
    print(f"# total {time.perf_counter() - results.t0:.0f} s")
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
