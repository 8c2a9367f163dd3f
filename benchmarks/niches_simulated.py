"""Niche distillation on the simulated default data (what ``stdistill demo`` runs), with timings.

    python benchmarks/niches_simulated.py [--k 5] [--seed 0] [--out results/niches_simulated]
    python benchmarks/niches_simulated.py --smoke --out /tmp/smoke   # 3 small sections, 2 epochs

Simulated sections (``stdistill.datasets.simulated()``: 6 sections, 3 patients, known niches in
``obs["niche_true"]``), features from the offline encoder (cached after the first run), then
``stdistill.recipes.niches.run``: leave-one-patient-out teacher -> student -> baselines -> metrics
-> figures. Also prints the teacher's ARI against the simulated ground truth.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import _common

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=None, help="niches (default: the number of simulated niches)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/niches_simulated"))
    ap.add_argument("--precision", default="fp32", help="feature extraction precision (fixed, so numbers reproduce)")
    _common.add_args(ap)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import stdistill as sd
    from stdistill.metrics import ari
    from stdistill.recipes import niches

    student = {"max_epochs": 2, "min_epochs": 1} if _common.smoke(args) else None
    results = _common.Results(args, seeds=[args.seed], precision=args.precision)
    t0 = time.perf_counter()
    a = _common.simulated_small() if args.smoke else sd.datasets.simulated()
    sd.features.extract(a, "effnet-lite0-imagenet", precision=args.precision)
    print(f"features: effnet-lite0-imagenet, precision {args.precision}", flush=True)
    t_feat = time.perf_counter() - t0
    k = args.k or a.obs["niche_true"].nunique()
    t1 = time.perf_counter()
    df, figs = niches.run(a, "X_effnet-lite0-imagenet", k, out_dir=args.out, seed=args.seed, student_kwargs=student)
    t_run = time.perf_counter() - t1
    print(niches.format_table(df))
    mean = niches.summary(df).reset_index()
    print("\nmean over held-out patients:\n" + niches.markdown(mean))
    truth = {"K": k, "teacher ARI vs truth": ari(a.obs["niche_true"], a.obs["niche_teacher"]),
             "NMI(niche, patient)": df.attrs["teacher_nmi_patient"]}
    print(f"\nteacher vs simulated truth: ARI {truth['teacher ARI vs truth']:.3f}; "
          f"NMI(niche, patient) {truth['NMI(niche, patient)']:.3f}")
    three = dict.fromkeys(["ari", "nmi", "id_acc", "seen_share", "macro_f1", "teacher ARI vs truth", "NMI(niche, patient)"], 3)
    results.table("folds", df[["fold", "method", "ari", "nmi", "id_acc", "seen_share", "macro_f1", "teacher_sizes",
                               "single_niche"]], digits=three)
    results.table("mean", mean, digits=three)
    results.table("teacher", [truth], digits=three)
    print(f"data + features {t_feat:.0f} s, recipe {t_run:.0f} s (K={k}, seed {args.seed}, {os.cpu_count()} CPU cores)")
    for p in figs:
        print(f"figure: {p}")
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
