"""How stable is the HEST probe on HER2ST? Same encoder, same folds, features that differ only by
compute precision (fp32 vs bf16 autocast) or by a tiny perturbation; and HEST's alpha vs alpha by
inner patient cross-validation. Differences between these rows are the noise floor against which
an encoder's (or PEKA's) gain must be read.

Usage::

    python benchmarks/expression_her2st_probe_noise.py --root ../shared/data/her2st
    python benchmarks/expression_her2st_probe_noise.py --smoke --out /tmp/smoke   # 30 spots of A1, B4, C2; fold A
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import stdistill as sd  # noqa: E402
from stdistill.recipes import PekaConfig  # noqa: E402

import _common  # noqa: E402
from expression_her2st import frozen_features  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gene", default="ERBB2")
    ap.add_argument("--svd-solver", default="covariance_eigh", choices=["covariance_eigh", "full"], help="PCA solver of every HEST probe here (exact either way; --smoke: full, cheaper for a few dozen spots)")
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    _common.smoke(args, svd_solver="full")
    results = _common.Results(args, seeds=[0], precision="fp32; bf16 in the X_bf16 rows")
    t0 = time.time()
    full = _common.her2st(args.root, args.smoke, images_only=True)
    full.obsm["X_fp32"] = frozen_features(full, PekaConfig())
    sd.features.extract(full, "effnet-lite0-imagenet", key_added="X_bf16", precision="bf16")  # bf16 autocast on the CPU
    rng = np.random.default_rng(0)
    for i in range(3):  # +- 0.1% of each feature's spread
        full.obsm[f"X_fp32_jitter{i}"] = full.obsm["X_fp32"] + 1e-3 * full.obsm["X_fp32"].std(0) * rng.normal(size=full.obsm["X_fp32"].shape)
    folds = sd.pp.folds(full)[:1] if args.smoke else None  # --smoke: the first fold only
    rows = []
    for key in ["X_fp32", "X_bf16", "X_fp32_jitter0", "X_fp32_jitter1", "X_fp32_jitter2"]:
        for alpha in ("hest", "cv"):
            r = sd.bench.expression(full, key, folds=folds, alpha=alpha, extra_genes=[args.gene], svd_solver=args.svd_solver,
                                    key_added=None)
            pf = r.per_fold.set_index("test_patients")
            rows.append({"features": key, "alpha": alpha, **{f"r_{p}": pf.loc[p, "pearson_mean"] for p in pf.index},
                         "mean": r.mean, "std": r.std, f"{args.gene}_mean": pf[f"r_{args.gene}"].mean(),
                         **{f"alpha_{p}": pf.loc[p, "alpha"] for p in pf.index}})
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(df.round(4).to_string(index=False))
    print(f"precision effect on the mean (hest alpha): "
          f"{(df.iloc[2]['mean'] - df.iloc[0]['mean']) / df.iloc[0]['mean'] * 100:+.1f}% (bf16 vs fp32); "
          f"jitter range {df[(df.alpha == 'hest') & df.features.str.contains('jitter')]['mean'].agg(['min', 'max']).round(4).tolist()}")
    print(f"total {time.time() - t0:.0f}s")
    results.table("probe_noise", df, digits={c: 4 for c in df.columns if not c.startswith("alpha_")})
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
