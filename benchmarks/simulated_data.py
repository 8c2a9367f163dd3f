"""Speed and ground-truth sanity of the simulated default data (datasets.simulated).

    python benchmarks/simulated_data.py [--seed 0] [--repeats 3]
    python benchmarks/simulated_data.py --smoke --out /tmp/smoke    # 3 small sections, once

Prints: generation time (best of --repeats, wall and CPU), sizes, sparsity, library sizes,
niche spatial coherence (6-NN agreement vs chance), how strongly patients dominate raw
expression (k-means NMI with niche / patient, before and after per-section standardisation),
and how much niche information simple image statistics carry (5-fold logistic regression on
patch colour + dark-pixel fraction, grouped by patient). All numbers are computed here.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import _common


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    _common.add_args(ap)
    args = ap.parse_args()
    small = dict(n_sections=3, n_patients=3, spots_per_section=30) if _common.smoke(args, repeats=1) else {}
    results = _common.Results(args, seeds=[args.seed])
    rows = []

    def say(what: str, value, unit: str = "", digits: int = 2) -> None:
        rows.append([what, value, unit])
        print(f"  {what}: {value:.{digits}f} {unit}".rstrip() if isinstance(value, float) else f"  {what}: {value} {unit}".rstrip())

    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import normalized_mutual_info_score as nmi
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.neighbors import NearestNeighbors
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from stdistill import io
    from stdistill.datasets import simulated
    from stdistill.pp import PatchDataset

    walls, cpus = [], []
    for _ in range(args.repeats):
        w, c = time.perf_counter(), time.process_time()
        a = simulated(seed=args.seed, **small)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    print(f"simulated(seed={args.seed}{', small' if small else ''}), best of {args.repeats}:")
    say("generation, wall", min(walls), "s")
    say("generation, CPU", min(cpus), "s")
    sizes = [io.image(a, s).size for s in io.sections(a)]
    say("spots", a.n_obs)
    say("genes", a.n_vars)
    say("sections", len(sizes))
    say("largest image side", max(max(s) for s in sizes), "px")
    say("microns per pixel", float(io.microns_per_pixel(a, "sim0")), "um/px", 3)
    X = a.X
    lib = np.asarray(X.sum(1)).ravel()
    say("zero counts", float(1 - X.nnz / np.prod(X.shape)), "share", 3)
    say("UMIs per spot, median", float(np.median(lib)), "", 0)
    say("UMIs per spot, 5th percentile", float(np.percentile(lib, 5)), "", 0)
    say("UMIs per spot, 95th percentile", float(np.percentile(lib, 95)), "", 0)

    sec = a.obs["section"].astype(str).to_numpy()
    niche = a.obs["niche_true"].cat.codes.to_numpy()
    patient = a.obs["patient"].cat.codes.to_numpy()
    agree, chance = [], []
    for s in io.sections(a):
        m = sec == s
        xy = a.obsm["spatial"][m]
        nn = NearestNeighbors(n_neighbors=7).fit(xy).kneighbors(xy)[1][:, 1:]
        c = niche[m]
        agree.append((c[nn] == c[:, None]).mean())
        chance.append(((np.bincount(c) / len(c)) ** 2).sum())
    say("niche agreement with the 6 nearest spots", float(np.mean(agree)))
    say("niche agreement with 6 spots by chance", float(np.mean(chance)))

    dense = X.toarray().astype(float)
    L = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4)
    k = len(a.obs["niche_true"].cat.categories)
    raw = KMeans(k, n_init=10, random_state=0).fit_predict(PCA(20, random_state=0).fit_transform(L))
    Z = L.copy()
    for s in io.sections(a):
        m = sec == s
        Z[m] = (Z[m] - Z[m].mean(0)) / (Z[m].std(0) + 1e-6)
    std = KMeans(k, n_init=10, random_state=0).fit_predict(PCA(20, random_state=0).fit_transform(Z))
    say("k-means on log-expression PCA: NMI(niche)", float(nmi(niche, raw)))
    say("k-means on log-expression PCA: NMI(patient)", float(nmi(patient, raw)))
    say("the same after per-section standardisation: NMI(niche)", float(nmi(niche, std)))
    say("the same after per-section standardisation: NMI(patient)", float(nmi(patient, std)))

    ds = PatchDataset(a, size_um=112, px=56)
    feats = []
    for i in range(len(ds)):
        p = ds.read(i).reshape(-1, 3).astype(float)
        feats.append([*p.mean(0), *p.std(0), (p.mean(1) < 150).mean()])
    feats = np.asarray(feats)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = GroupKFold(n_splits=3)
    acc = cross_val_score(clf, feats, niche, groups=patient, cv=cv).mean()
    tum = np.isin(a.obs["niche_true"].astype(str), ["tumour_A_nest", "tumour_B_nest"])
    acc_ab = cross_val_score(clf, feats[tum], niche[tum], groups=patient[tum], cv=cv).mean()
    say("image statistics -> niche, leave-patient-out accuracy", float(acc))
    say("the same, majority class", float(np.bincount(niche).max() / len(niche)))
    say("image statistics -> tumour_A vs tumour_B nests, accuracy", float(acc_ab))
    say("the same, majority class", float(max(np.bincount(niche[tum])) / tum.sum()))
    results.table("summary", rows, ["measure", "value", "unit"])
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
