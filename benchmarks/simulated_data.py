"""Speed and ground-truth sanity of the simulated default data (datasets.simulated).

    python benchmarks/simulated_data.py [--seed 0] [--repeats 3]

Prints: generation time (best of --repeats, wall and CPU), sizes, sparsity, library sizes,
niche spatial coherence (6-NN agreement vs chance), how strongly patients dominate raw
expression (k-means NMI with niche / patient, before and after per-section standardisation),
and how much niche information simple image statistics carry (5-fold logistic regression on
patch colour + dark-pixel fraction, grouped by patient). All numbers are computed here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

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
        a = simulated(seed=args.seed)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    print(f"simulated(seed={args.seed}): best of {args.repeats}: {min(walls):.2f} s wall, {min(cpus):.2f} s CPU")
    sizes = [io.image(a, s).size for s in io.sections(a)]
    print(f"  {a.n_obs} spots x {a.n_vars} genes, {len(sizes)} sections, images up to "
          f"{max(max(s) for s in sizes)} px at {io.microns_per_pixel(a, 'sim0'):g} um/px")
    X = a.X
    lib = np.asarray(X.sum(1)).ravel()
    print(f"  zeros {1 - X.nnz / np.prod(X.shape):.1%}; UMIs/spot median {np.median(lib):.0f} "
          f"(5-95%: {np.percentile(lib, 5):.0f}-{np.percentile(lib, 95):.0f})")

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
    print(f"  niche agreement with 6 nearest spots {np.mean(agree):.2f} (chance {np.mean(chance):.2f})")

    dense = X.toarray().astype(float)
    L = np.log1p(dense / dense.sum(1, keepdims=True) * 1e4)
    k = len(a.obs["niche_true"].cat.categories)
    raw = KMeans(k, n_init=10, random_state=0).fit_predict(PCA(20, random_state=0).fit_transform(L))
    Z = L.copy()
    for s in io.sections(a):
        m = sec == s
        Z[m] = (Z[m] - Z[m].mean(0)) / (Z[m].std(0) + 1e-6)
    std = KMeans(k, n_init=10, random_state=0).fit_predict(PCA(20, random_state=0).fit_transform(Z))
    print(f"  k-means on log-expression PCA: NMI(niche) {nmi(niche, raw):.2f}, NMI(patient) {nmi(patient, raw):.2f}; "
          f"after per-section standardisation: NMI(niche) {nmi(niche, std):.2f}, NMI(patient) {nmi(patient, std):.2f}")

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
    print(f"  image statistics -> niche, leave-patient-out accuracy {acc:.2f} (majority "
          f"{np.bincount(niche).max() / len(niche):.2f}); tumour_A vs tumour_B nests {acc_ab:.2f} "
          f"(majority {max(np.bincount(niche[tum])) / tum.sum():.2f})")


if __name__ == "__main__":
    main()
