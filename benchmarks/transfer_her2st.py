"""Patient-shift ablation of the niche student: none / +stain norm / +views / +refinement / all.

    python benchmarks/transfer_her2st.py --quick            # small simulated data, 1 seed, K=3 (minutes on 2 CPUs)
    python benchmarks/transfer_her2st.py --smoke --out /tmp/smoke   # --quick on 30 spots per section, 1 view, 2 epochs, 1 fold
    python benchmarks/transfer_her2st.py --root ../shared/data/her2st         # default: 3 seeds, 20 epochs, 4 views, all arms
    python benchmarks/transfer_her2st.py --root ../shared/data/her2st --seeds 0 1 2 3 4   # docs/transfer.md's run
                                                                               # (74 min on 2 busy CPUs)

For every student configuration (plain or stain-normalised features, with or without augmented
views), leave-one-patient-out over the patients with images: the niche teacher (fitted once on
all sections, section-standardised) gives soft labels; the student is trained on the other
patients and predicts the held-out one, raw and refined (``refine="auto"``: the test-time
refinement chosen at fit on the student's validation patient, inside the training patients; the
test patient is never used to choose it). Neighbourhood k-means (same features, same radius) is
the baseline. Prints per arm and K the mean over held-out patients of ARI and NMI against the
teacher for the student and the baseline and the paired student - baseline difference as mean
and sd over seeds, once over all held-out patients and once without patient A (on HER2ST its
images are 3.2 um/px copies: a resolution shift as much as a patient shift), plus the fold-A
rows apart. Also: the extraction cost and NMI(feature clusters, patient) with and without stain
normalisation, and which refinement was chosen how often.

``+context``: the student gets one extra token per spot, the features of a 224 um field of view
(2x the patch) around it; the baselines get the same information: patch and context features
side by side. ``all``: stain-normalised patch and context features, augmented views, and (in
``all +refine``) the refinement.

Not done here (see docs/transfer.md): the expression probe / PEKA arms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

ENCODER = "effnet-lite0-imagenet"
KEY = f"X_{ENCODER}"
CONFIGS = {  # student configuration: (stain normalised features, augmented views, context token)
    "none": (False, False, False),
    "+stain": (True, False, False),
    "+views": (False, True, False),
    "+stain+views": (True, True, False),
    "+context": (False, False, True),
    "all": (True, True, True),
}
CONTEXT_UM = 224.0  # context field of view: 2x the 112 um patch, resized to the encoder's 224 px
# each configuration is scored raw and refined: arm = config (+ " +refine"); "all" = +stain+views +refine
ARMS = [c + r for r in ("", " +refine") for c in CONFIGS]
APART = "A"  # HER2ST patient whose images are 3.2 um/px copies: reported apart


def load(args):
    import stdistill as sd

    if args.smoke:
        return _common.simulated_small()
    if args.quick or args.data == "simulated":
        return sd.datasets.simulated(n_sections=3, n_patients=3, spots_per_section=120, seed=0)
    a = _common.her2st(args.root)
    return sd.io.subset_sections(a, [s for s in sd.io.sections(a) if sd.io.has_image(a, s)])


def features(a, args):
    """Plain and stain-normalised features (with views) and the context features; prints each pass's cost."""
    import numpy as np

    import stdistill as sd

    kw = dict(precision=args.precision, views=args.views, view_seed=0)
    plain = sd.features.run_extraction(a, ENCODER, key_added=KEY, **kw)
    norm = sd.features.run_extraction(a, ENCODER, key_added=KEY + "_macenko", stain_norm="macenko", **kw)
    for config in args.configs:
        stain, _, context = CONFIGS[config]
        key = _key(stain, context=True)
        if context and key not in a.obsm:
            ctx = sd.features.run_extraction(a, ENCODER, key_added=key, size_um=CONTEXT_UM, precision=args.precision,
                                             stain_norm="macenko" if stain else None)
            print(f"extraction context ({CONTEXT_UM:.0f} um{', macenko' if stain else ''}): {ctx.seconds_clean:.1f} s "
                  f"({ctx.patches_computed} patches computed)")
            side = _key(stain) + "+ctx"  # the baselines' input: patch and context features side by side
            a.obsm[side] = np.hstack([np.asarray(a.obsm[_key(stain)]), np.asarray(a.obsm[key])])
    for name, r in (("plain", plain), ("macenko", norm)):
        print(f"extraction {name}: clean pass {r.seconds_clean:.1f} s, {r.views} views {r.seconds_views:.1f} s "
              f"({r.patches_computed} patches computed, {r.precision}, {os.cpu_count()} CPU cores)")


def _key(stain: bool, context: bool = False) -> str:
    return KEY + ("_ctx" if context else "") + ("_macenko" if stain else "")


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


def one_fold(a, test_patient: str, k: int, config: str, seed: int, args) -> list[dict]:
    """Student (raw and refined) and neighbourhood k-means on one held-out patient."""
    import stdistill as sd
    from stdistill.metrics import apply_map, ari, majority_map, niche_id_accuracy, nmi
    from stdistill.recipes.niches import kmeans_niches
    from stdistill.students import NicheStudent

    stain, views, context = CONFIGS[config]
    key = _key(stain)
    base_key = key + "+ctx" if context else key
    secs = sd.io.sections(a)
    pats = a.obs.groupby("section", observed=True)["patient"].first().astype(str)
    tr = sd.io.subset_sections(a, [s for s in secs if pats[s] != test_patient])
    te = sd.io.subset_sections(a, [s for s in secs if pats[s] == test_patient])
    st = NicheStudent(k, feature_key=key, views=views, context_key=_key(stain, context=True) if context else None,
                      max_epochs=args.max_epochs, seed=seed)
    st.fit(tr, probs_key="niche_teacher_probs")
    st.predict(te, key_added="student", refine="auto")
    base = kmeans_niches(a, base_key, k, radius_um=st.info_["radius_um"], seed=seed, inplace=False)
    plain = kmeans_niches(a, base_key, k, radius_um=None, seed=seed, inplace=False)
    teach = te.obs["niche_teacher"].astype(str).to_numpy()
    is_te = a.obs["patient"].astype(str).to_numpy() == test_patient
    t_all = a.obs["niche_teacher"].astype(str).to_numpy()
    common = {"k": k, "seed": seed, "patient": test_patient, "refine_chosen": _refine_name(st.info_["refine"])}
    for name, codes in (("kmeans_nbr", base), ("kmeans", plain)):
        c = codes.astype(str)  # niche-ID accuracy: cluster -> teacher niche by majority on the training patients
        mapped = apply_map(c[is_te], majority_map(c[~is_te], t_all[~is_te]), default="-1").astype(str)
        common.update({f"{name}_ari": ari(teach, c[is_te]), f"{name}_nmi": nmi(teach, c[is_te]),
                       f"{name}_acc": niche_id_accuracy(teach, mapped)})
    raw = {"raw_ari": ari(teach, te.obs["student"]), "raw_nmi": nmi(teach, te.obs["student"])}
    return [dict(common, **raw, arm=config + suffix, student_ari=ari(teach, te.obs[col]), student_nmi=nmi(teach, te.obs[col]),
                 student_acc=niche_id_accuracy(teach, te.obs[col].astype(str).to_numpy()))
            for suffix, col in (("", "student"), (" +refine", "student_refined"))]


def _refine_name(r: dict) -> str:
    return " ".join(f"{v}" if k == "method" else f"{k}={v}" for k, v in r.items())


def table(rows, patients: list[str] | None = None, results=None, name: str = ""):
    """Per arm and K: means over the held-out ``patients`` (all: None), paired differences over seeds."""
    import pandas as pd

    df = pd.DataFrame(rows)
    if patients is not None:
        df = df[df["patient"].isin(patients)]
    per_seed = df.groupby(["arm", "k", "seed"]).mean(numeric_only=True)
    per_seed["d_ari"] = per_seed["student_ari"] - per_seed["kmeans_nbr_ari"]
    per_seed["d_nmi"] = per_seed["student_nmi"] - per_seed["kmeans_nbr_nmi"]
    g = per_seed.groupby(["arm", "k"])
    out = g[["student_ari", "kmeans_nbr_ari", "kmeans_ari", "student_nmi", "kmeans_nbr_nmi", "student_acc",
             "kmeans_nbr_acc", "kmeans_acc"]].mean().round(3)
    for d in ("d_ari", "d_nmi"):
        out[f"{d} mean"] = g[d].mean().round(3)
        out[f"{d} sd"] = g[d].std(ddof=1).round(3) if g.size().min() > 1 else float("nan")
    out = out.reindex([a for a in ARMS if a in set(df["arm"])], level=0)
    if results is not None:
        results.table(name, out, digits=dict.fromkeys(out.columns, 3))
    return out


def report(rows, patients: list[str], results) -> None:
    """The tables: all held-out patients, without patient A, and A alone (when A is held out)."""
    import pandas as pd

    print(f"== mean over held-out patients {patients} ==")
    print(table(rows, None, results, "all").to_string())
    if APART in patients and len(patients) > 1:
        rest = [p for p in patients if p != APART]
        print(f"== mean over held-out patients {rest} (fold {APART} apart: its images are 3.2 um/px copies) ==")
        print(table(rows, rest, results, "without_" + APART).to_string())
        print(f"== held-out patient {APART} alone ==")
        print(table(rows, [APART], results, APART).to_string())
    df = pd.DataFrame(rows)
    ref = df[df["arm"].str.endswith("+refine")].groupby(["arm", "k", "seed"]).mean(numeric_only=True)
    eff = pd.DataFrame({"ari": ref["student_ari"] - ref["raw_ari"], "nmi": ref["student_nmi"] - ref["raw_nmi"]})
    g = eff.groupby(["arm", "k"])
    print(f"refined - raw student, mean over held-out patients {patients}, mean and sd over seeds:")
    refined = pd.concat({"mean": g.mean(), "sd": g.std(ddof=1)}, axis=1)
    print(refined.round(3).to_string())
    refined.columns = [f"{a} {b}" for a, b in refined.columns]
    results.table("refined_minus_raw", refined, digits=dict.fromkeys(refined.columns, 3))
    raw = df[~df["arm"].str.endswith("+refine")]
    print("refinement chosen on the validation patient (folds x seeds):")
    chosen = raw.groupby(["arm", "k"])["refine_chosen"].value_counts().unstack(fill_value=0)
    print(chosen.to_string())
    chosen.columns.name = None
    results.table("refine_chosen", chosen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small simulated data, 1 seed, K=3, 2 views, 15 epochs, every configuration")
    ap.add_argument("--data", choices=["her2st", "simulated"], default="her2st")
    ap.add_argument("--root", default=None, help="the her2st folder (default: $STDISTILL_DATA/her2st, else ../shared/data/her2st)")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--views", type=int, default=4, help="augmented views per patch (0: no view arms)")
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["none", "+stain", "+views", "+context", "all"],
                    help="student configurations (view ones need --views > 0)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    _common.add_args(ap, out="results/transfer_her2st")
    args = ap.parse_args()
    if args.quick:
        args.k, args.seeds, args.views, args.max_epochs, args.configs = [3], [0], 2, 15, list(CONFIGS)
    _common.smoke(args, k=[3], seeds=[0], views=1, max_epochs=2, configs=list(CONFIGS), threads=1)
    results = _common.Results(args, seeds=args.seeds, precision=args.precision,
                              variant="quick" if args.quick else None if args.data == "her2st" else args.data)

    import torch

    torch.set_num_threads(args.threads)
    from stdistill.teachers import NicheTeacher

    t0 = time.perf_counter()
    print(f"seeds {args.seeds}, K {args.k}, views {args.views}, max_epochs {args.max_epochs}, {args.precision}", flush=True)
    a = load(args)
    features(a, args)
    print(f"NMI(feature clusters, patient): plain {patient_nmi(a, KEY):.3f}, macenko {patient_nmi(a, KEY + '_macenko'):.3f}",
          flush=True)
    rows = []
    patients = sorted(a.obs["patient"].astype(str).unique())[: 1 if args.smoke else None]  # --smoke: one held-out patient
    configs = [c for c in args.configs if args.views > 0 or not CONFIGS[c][1]]
    for k in args.k:
        NicheTeacher(k, seed=0).fit_predict(a, key_added="niche_teacher")
        for config in configs:
            for seed in args.seeds:
                for p in patients:
                    rows += one_fold(a, p, k, config, seed, args)
            print(f"K={k} {config} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    report(rows, patients, results)
    print(f"{len(patients)} held-out patients, seeds {args.seeds}, wall {time.perf_counter() - t0:.0f} s "
          f"({os.cpu_count()} CPU cores, {args.threads} torch thread(s))")
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
