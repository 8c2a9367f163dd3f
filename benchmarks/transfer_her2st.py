"""Patient-shift ablation of the niche student: none / +stain norm / +views / +refinement / all.

    python benchmarks/transfer_her2st.py --quick            # small simulated data, 1 seed, K=3 (minutes on 2 CPUs)
    python benchmarks/transfer_her2st.py --data her2st --k 4 6 8 --seeds 0 1 2 3 4   # the full run (hours)

For every arm, leave-one-patient-out over the patients with images: the niche teacher (fitted
once on all sections, section-standardised) gives soft labels; the student is trained on the
other patients and predicts the held-out one; neighbourhood k-means (same features, same
radius) is the baseline. Prints per arm and K the mean over held-out patients of ARI and NMI
against the teacher for the student and the baseline, and the paired student - baseline
difference as mean +- sd over seeds. Also: the extraction cost (clean pass, stain-normalised
pass, augmented views) and NMI(feature clusters, patient) with and without stain
normalisation (how much patient identity the features carry).

Not done here (see docs/transfer.md): the expression probe / PEKA arms, multi-scale context,
fold A reported apart on HER2ST.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

ENCODER = "effnet-lite0-imagenet"
KEY = f"X_{ENCODER}"
ARMS = {  # name: (stain normalised features, augmented views, test-time refinement)
    "none": (False, False, None),
    "+stain": (True, False, None),
    "+views": (False, True, None),
    "+refine": (False, False, "both"),
    "all": (True, True, "both"),
}


def load(args):
    import stdistill as sd

    if args.quick or args.data == "simulated":
        return sd.datasets.simulated(n_sections=3, n_patients=3, spots_per_section=120, seed=0)
    a = sd.datasets.her2st()
    return sd.io.subset_sections(a, [s for s in sd.io.sections(a) if sd.io.has_image(a, s)])


def features(a, args):
    """Plain and stain-normalised features (with views); prints the cost of each pass."""
    import stdistill as sd

    kw = dict(precision=args.precision, views=args.views, view_seed=0)
    plain = sd.features.run_extraction(a, ENCODER, key_added=KEY, **kw)
    norm = sd.features.run_extraction(a, ENCODER, key_added=KEY + "_macenko", stain_norm="macenko", **kw)
    for name, r in (("plain", plain), ("macenko", norm)):
        print(f"extraction {name}: clean pass {r.seconds_clean:.1f} s, {r.views} views {r.seconds_views:.1f} s "
              f"({r.patches_computed} patches computed, {r.precision}, {os.cpu_count()} CPU cores)")


def patient_nmi(a, key: str) -> float:
    """NMI between k-means clusters (one per patient) of z-scored PCA features and the patient."""
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from stdistill.metrics import nmi

    f = np.asarray(a.obsm[key], dtype=np.float64)
    f = (f - f.mean(0)) / (f.std(0) + 1e-6)
    x = PCA(20, random_state=0).fit_transform(f)
    pats = a.obs["patient"].astype(str).to_numpy()
    lab = KMeans(len(set(pats)), n_init=10, random_state=0).fit_predict(x)
    return float(nmi(pats, lab))


def one_fold(a, test_patient: str, k: int, arm: str, seed: int, args) -> dict:
    """Student and neighbourhood k-means on one held-out patient for one arm."""
    import stdistill as sd
    from stdistill.metrics import ari, nmi
    from stdistill.recipes.niches import kmeans_niches
    from stdistill.students import NicheStudent

    stain, views, refine = ARMS[arm]
    key = KEY + ("_macenko" if stain else "")
    secs = sd.io.sections(a)
    pats = a.obs.groupby("section", observed=True)["patient"].first().astype(str)
    tr = sd.io.subset_sections(a, [s for s in secs if pats[s] != test_patient])
    te = sd.io.subset_sections(a, [s for s in secs if pats[s] == test_patient])
    st = NicheStudent(k, feature_key=key, views=views, max_epochs=args.max_epochs, seed=seed)
    st.fit(tr, probs_key="niche_teacher_probs")
    st.predict(te, key_added="student", refine=refine)
    pred = te.obs["student_refined" if refine else "student"]
    base = kmeans_niches(a, key, k, radius_um=st.info_["radius_um"], seed=seed, key_added="kmeans_nbr")
    teach = te.obs["niche_teacher"]
    b = base[a.obs["patient"].astype(str).to_numpy() == test_patient]
    return {"arm": arm, "k": k, "seed": seed, "patient": test_patient,
            "student_ari": ari(teach, pred), "student_nmi": nmi(teach, pred),
            "kmeans_nbr_ari": ari(teach, b), "kmeans_nbr_nmi": nmi(teach, b)}


def table(rows):
    import pandas as pd

    df = pd.DataFrame(rows)
    per_seed = df.groupby(["arm", "k", "seed"]).mean(numeric_only=True)
    per_seed["d_ari"] = per_seed["student_ari"] - per_seed["kmeans_nbr_ari"]
    per_seed["d_nmi"] = per_seed["student_nmi"] - per_seed["kmeans_nbr_nmi"]
    g = per_seed.groupby(["arm", "k"])
    out = g[["student_ari", "kmeans_nbr_ari", "student_nmi", "kmeans_nbr_nmi"]].mean().round(3)
    for d in ("d_ari", "d_nmi"):
        out[f"{d} mean"] = g[d].mean().round(3)
        out[f"{d} sd"] = g[d].std(ddof=1).round(3) if g.size().min() > 1 else float("nan")
    return out.reindex(list(ARMS), level=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small simulated data, 1 seed, K=3, 2 views, 15 epochs")
    ap.add_argument("--data", choices=["her2st", "simulated"], default="her2st")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.k, args.seeds, args.views, args.max_epochs = [3], [0], 2, 15

    import torch

    torch.set_num_threads(args.threads)
    from stdistill.teachers import NicheTeacher

    t0 = time.perf_counter()
    a = load(args)
    features(a, args)
    print(f"NMI(feature clusters, patient): plain {patient_nmi(a, KEY):.3f}, macenko {patient_nmi(a, KEY + '_macenko'):.3f}")
    rows = []
    patients = sorted(a.obs["patient"].astype(str).unique())
    for k in args.k:
        NicheTeacher(k, seed=0).fit_predict(a, key_added="niche_teacher")
        for arm in ARMS:
            for seed in args.seeds:
                for p in patients:
                    rows.append(one_fold(a, p, k, arm, seed, args))
    print(table(rows).to_string())
    print(f"{len(patients)} held-out patients, seeds {args.seeds}, wall {time.perf_counter() - t0:.0f} s "
          f"({os.cpu_count()} CPU cores, {args.threads} torch thread(s))")


if __name__ == "__main__":
    main()
