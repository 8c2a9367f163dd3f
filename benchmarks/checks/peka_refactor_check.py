"""PEKA before and after a refactor: the same HER2ST fold, candidate and seed, printed to compare.

Runs one leave-one-patient-out fold of ``expression_her2st.py`` with a single PEKA setting (the
fold-A ``peka_miss_kd`` choice: MiSS, lr 1e-4, KD weight 0.1, rank 128, 4 epochs): the two inner
validation curves of the setting search (inner genes, inner teacher and inner KD classifier, as
the benchmark), then the final fit on the training patients and its held-out HEST-probe Pearson,
with a digest of the adapted features. Run it on two checkouts and compare the printed lines::

    python benchmarks/checks/peka_refactor_check.py --root ../shared/data/her2st
    PYTHONPATH=<other checkout>/src python benchmarks/checks/peka_refactor_check.py --root ../shared/data/her2st
    python benchmarks/checks/peka_refactor_check.py --smoke --out /tmp/smoke   # 30 spots per section, 1 epoch

Identical lines mean the refactor did not move PEKA's numbers on the machine that ran both (it needs
``stdistill.recipes.PEKA``, ``PekaConfig`` and ``select_peka``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402
import stdistill as sd  # noqa: E402
from stdistill.recipes import PEKA, PekaConfig, select_peka  # noqa: E402
from stdistill.teachers import ExpressionTeacher  # noqa: E402
from stdistill.teachers.expression import teacher_targets  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test-patient", default="A")
    ap.add_argument("--max-epochs", type=int, default=4)
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    _common.smoke(args, max_epochs=1)
    results = _common.Results(args, seeds=[0], precision="fp32")
    t0 = time.time()
    print(f"stdistill from {_common._rel(Path(sd.__file__).parent)}")
    full = _common.her2st(args.root, args.smoke)
    img = sd.io.subset_sections(full, [s for s in sd.io.sections(full) if sd.io.has_image(full, s)])
    fold = next(f for f in sd.pp.folds(img) if f.patients_of("test") == [args.test_patient])
    tr_pats = fold.patients_of("train")
    genes = sd.pp.hest_genes(img, 50, sections=list(fold.train))
    full_tr = full[full.obs["patient"].astype(str).isin(tr_pats).to_numpy()].copy()
    teacher = ExpressionTeacher("pca", n_components=32).fit(full_tr)
    tr = sd.io.subset_sections(img, list(fold.train))
    T = teacher.transform(tr)
    base = PekaConfig(max_epochs=args.max_epochs, patience=2, train_positions=16, head_ridge=10.0, seed=0)
    setting = {"adapter": "miss", "lr": 1e-4, "w_kd": 0.1, "rank": 128}

    def inner(inner_tr, val_p):
        keep = full.obs["patient"].astype(str)
        full_in = full[((keep != val_p) & keep.isin(tr_pats)).to_numpy()].copy()
        t_in = ExpressionTeacher("pca", n_components=32).fit(full_in)
        return {"teacher": t_in.transform(inner_tr), "genes": sd.pp.hest_genes(inner_tr, 50),
                "kd_classifier": teacher_targets(t_in.transform(full_in), n_clusters=base.n_clusters, seed=0)[:2]}

    table = select_peka(tr, T, genes, [setting], base=base, inner=inner).table
    rows = []
    for r in table.itertuples():
        print(f"inner val {r.split}: " + " ".join(f"{x:.6f}" for x in r.curve))
        rows.append([f"inner validation {r.split}", " ".join(f"{x:.6f}" for x in r.curve)])
    kd = teacher_targets(teacher.transform(full_tr), n_clusters=base.n_clusters, seed=0)[:2]
    cfg = PekaConfig(**{**base.__dict__, **setting})
    m = PEKA("effnet-lite0-imagenet", cfg).fit(tr, T, genes, kd_classifier=kd)
    m.transform(img, key_added="X_peka")
    f = img.obsm["X_peka"]
    res = sd.bench.expression(img, "X_peka", folds=[fold], genes=genes, svd_solver="covariance_eigh", key_added=None)
    sha = hashlib.sha1(np.ascontiguousarray(f).tobytes()).hexdigest()[:16]
    print(f"test {args.test_patient}: HEST-probe Pearson {res.mean:.6f}; features sha1 {sha}; {time.time() - t0:.0f} s")
    rows += [[f"test {args.test_patient}: HEST-probe Pearson", f"{res.mean:.6f}"], ["adapted features sha1", sha]]
    results.table("lines", rows, ["what", "value"])
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
