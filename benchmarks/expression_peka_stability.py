"""Diagnostic: PEKA's held-out Pearson after every epoch, per seed, for one fold and one setting.

Not a way to choose anything (it looks at the test patient on purpose): it shows *when* a run that
``expression_her2st.py`` reported as unstable goes wrong. For each seed it trains on the fold's
training patients for ``--max-epochs`` epochs (no early stopping) and prints, after each epoch,
the HEST probe's Pearson on the held-out patient (epoch 0 = frozen encoder) and the mean training
loss terms (regression, KD, structure alignment).

Usage (the simulated fold whose seed 0 collapsed in ``results/expression_simulated``)::

    python benchmarks/expression_peka_stability.py --dataset simulated --test simP2 --lr 1e-4 --w-kd 1 --rank 32 --inspect 0 1 2
    python benchmarks/expression_peka_stability.py --smoke --out /tmp/smoke   # 3 small sections, 2 epochs, --inspect
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import pandas as pd

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import _common  # noqa: E402
import stdistill as sd  # noqa: E402
from stdistill.recipes import PEKA, PekaConfig  # noqa: E402
from stdistill.teachers import ExpressionTeacher  # noqa: E402
from stdistill.teachers.expression import teacher_targets  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["her2st", "simulated"], default="simulated")
    ap.add_argument("--test", default=None, help="held-out patient (required)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--w-kd", type=float, default=1.0)
    ap.add_argument("--w-sa", type=float, nargs="+", default=[1.0, 0.0])
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--max-epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--inspect", type=int, nargs=3, metavar=("SEED", "W_SA", "EPOCHS"), default=None,
                    help="also retrain one run and look at its held-out predictions: Pearson vs Spearman, "
                         "without the 5 most extreme spots, and with the clipped probe")
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    if _common.smoke(args, dataset="simulated", test="simP2", seeds=[0], max_epochs=2, rank=8, inspect=[0, 1, 1]):
        full = _common.simulated_small()
    elif args.test is None:
        ap.error("--test is required")
    else:
        full = _common.her2st(args.root) if args.dataset == "her2st" else sd.datasets.simulated(6, 3, seed=0)
    results = _common.Results(args, seeds=args.seeds, precision="fp32")
    img = sd.io.subset_sections(full, [s for s in sd.io.sections(full) if sd.io.has_image(full, s)])
    pats = img.obs["patient"].astype(str)
    tr_secs = sorted(set(img.obs.loc[(pats != args.test).to_numpy(), "section"].astype(str)))
    te_secs = sorted(set(img.obs.loc[(pats == args.test).to_numpy(), "section"].astype(str)))
    tr, te = sd.io.subset_sections(img, tr_secs), sd.io.subset_sections(img, te_secs)
    full_tr = full[(full.obs["patient"].astype(str) != args.test).to_numpy()].copy()
    genes = sd.pp.hest_genes(tr, 50)
    teacher = ExpressionTeacher("pca", n_components=32).fit(full_tr)
    ref, T = teacher.transform(full_tr), teacher.transform(tr)
    rows = []
    for w_sa in args.w_sa:
        for seed in args.seeds:
            cfg = PekaConfig(adapter="miss", lr=args.lr, w_kd=args.w_kd, w_sa=w_sa, rank=args.rank, seed=seed,
                             max_epochs=args.max_epochs, patience=args.max_epochs + 1, train_positions=16, head_ridge=10.0)
            m = PEKA("effnet-lite0-imagenet", cfg).fit(tr, T, genes, kd_classifier=teacher_targets(ref, 16, seed=seed)[:2], val=te)
            for h in m.history_:
                rows.append({"w_sa": w_sa, "seed": seed, "epoch": h["epoch"], "test_r": h["val_ridge_pearson"],
                             **{k[6:]: h[k] for k in ("train_reg", "train_kd", "train_sa") if k in h}})
    d = pd.DataFrame(rows)
    print(f"{args.dataset}, test {args.test}: {tr.n_obs} training spots ({len(tr_secs)} sections), lr {args.lr:g}, "
          f"w_kd {args.w_kd:g}, rank {args.rank}; test_r = HEST probe Pearson on the held-out patient")
    curves = d.pivot_table(index=["w_sa", "seed"], columns="epoch", values="test_r")
    print(curves.round(4).to_string())
    print("\nmean training loss terms per epoch (seed x w_sa rows):")
    cols = [c for c in ("reg", "kd", "sa") if c in d]
    losses = d[d["epoch"] > 0].pivot_table(index=["w_sa", "seed"], columns="epoch", values=cols)
    print(losses.round(3).to_string())
    curves.columns = [f"epoch {e}" for e in curves.columns]
    losses.columns = [f"{term} epoch {e}" for term, e in losses.columns]
    results.table("test_r", curves, digits=dict.fromkeys(curves.columns, 4))
    results.table("losses", losses, digits=dict.fromkeys(losses.columns, 3))
    if args.inspect:
        results.table("inspect", inspect(args, tr, te, T, ref, genes), digits=dict.fromkeys(
            ["Pearson", "Spearman", "Pearson without 5 extreme spots", "largest |prediction - median|",
             "median spot |prediction - median|"], 4))
    return results.finish()


def inspect(args, tr, te, T, ref, genes) -> list[dict]:
    """Why one run's held-out Pearson collapses: a few spots with wild predictions, or all of them?"""
    from scipy.stats import spearmanr

    from stdistill.bench import HestRidge
    from stdistill.pp.genes import log1p_targets

    seed, w_sa, epochs = args.inspect
    cfg = PekaConfig(adapter="miss", lr=args.lr, w_kd=args.w_kd, w_sa=float(w_sa), rank=args.rank, seed=seed,
                     max_epochs=epochs, train_positions=16, head_ridge=10.0)
    m = PEKA("effnet-lite0-imagenet", cfg).fit(tr, T, genes, kd_classifier=teacher_targets(ref, 16, seed=seed)[:2])
    Ftr, Fte = m.transform(tr, inplace=False), m.transform(te, inplace=False)
    Ytr, Yte = log1p_targets(tr, genes), log1p_targets(te, genes)
    sd_tr = Ftr.std(0)
    z = np.abs(Fte - Ftr.mean(0)) / np.maximum(sd_tr, 1e-12)
    print(f"\nseed {seed}, w_sa {w_sa}, {epochs} epochs: {int((sd_tr < 1e-6).sum())} of {Ftr.shape[1]} features have "
          f"training sd < 1e-6; largest standardised held-out value {z.max():.3g}")
    rows = []
    for clip in (False, True):
        P = HestRidge(latent_dim=256, seed=1, svd_solver="covariance_eigh", clip=clip).fit(Ftr, Ytr).predict(Fte)
        dev = np.abs(P - np.median(P, 0)).max(1)
        keep = np.argsort(dev)[:-5]
        r = np.nanmean([np.corrcoef(P[:, j], Yte[:, j])[0, 1] for j in range(len(genes))])
        rho = np.nanmean([spearmanr(P[:, j], Yte[:, j])[0] for j in range(len(genes))])
        r5 = np.nanmean([np.corrcoef(P[keep, j], Yte[keep, j])[0, 1] for j in range(len(genes))])
        print(f"  {'clipped' if clip else 'HEST   '} probe: Pearson {r:.4f}, Spearman {rho:.4f}, Pearson without the 5 most "
              f"extreme spots {r5:.4f}; largest |prediction - median| {dev.max():.3g} (median spot {np.median(dev):.3g})")
        rows.append({"probe": "clipped" if clip else "HEST", "Pearson": r, "Spearman": rho, "Pearson without 5 extreme spots": r5,
                     "largest |prediction - median|": dev.max(), "median spot |prediction - median|": np.median(dev)})
    return rows


if __name__ == "__main__":
    sys.exit(main())
