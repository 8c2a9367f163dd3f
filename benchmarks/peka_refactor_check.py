"""PEKA before and after a refactor: the same HER2ST fold, candidate and seed, printed to compare.

Runs one leave-one-patient-out fold of ``expression_her2st.py`` with a single PEKA setting (the
fold-A ``peka_miss_kd`` choice: MiSS, lr 1e-4, KD weight 0.1, rank 128, 4 epochs): the two inner
validation curves of the setting search (inner genes, inner teacher and inner KD classifier, as
the benchmark), then the final fit on the training patients and its held-out HEST-probe Pearson,
with a digest of the adapted features. Run it on two checkouts and compare the printed lines::

    python benchmarks/peka_refactor_check.py --root ../shared/data/her2st
    PYTHONPATH=<other checkout>/src python benchmarks/peka_refactor_check.py --root ../shared/data/her2st

It works with the API before ``stdistill.adapters`` existed (``stdistill.recipes.peka`` module) and
after it. Identical lines mean the refactor did not move PEKA's numbers on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import stdistill as sd  # noqa: E402
from stdistill.teachers import ExpressionTeacher  # noqa: E402
from stdistill.teachers.expression import teacher_targets  # noqa: E402

try:  # after the refactor
    from stdistill.recipes import PEKA, PekaConfig, select_peka
except ImportError:  # before: a callable module
    from stdistill.recipes.peka import PEKA, PekaConfig, select_peka


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.environ.get("STDISTILL_HER2ST", str(Path(__file__).resolve().parents[2] / "shared/data/her2st")))
    ap.add_argument("--test-patient", default="A")
    args = ap.parse_args()
    t0 = time.time()
    print(f"stdistill from {Path(sd.__file__).parent}")
    full = sd.datasets.her2st(root=args.root)
    img = sd.io.subset_sections(full, [s for s in sd.io.sections(full) if sd.io.has_image(full, s)])
    fold = next(f for f in sd.pp.folds(img) if f.patients_of("test") == [args.test_patient])
    tr_pats = fold.patients_of("train")
    genes = sd.pp.hest_genes(img, 50, sections=list(fold.train))
    full_tr = full[full.obs["patient"].astype(str).isin(tr_pats).to_numpy()].copy()
    teacher = ExpressionTeacher("pca", n_components=32).fit(full_tr)
    tr = sd.io.subset_sections(img, list(fold.train))
    T = teacher.transform(tr)
    base = PekaConfig(max_epochs=4, patience=2, train_positions=16, head_ridge=10.0, seed=0)
    setting = {"adapter": "miss", "lr": 1e-4, "w_kd": 0.1, "rank": 128}

    def inner(inner_tr, val_p):
        keep = full.obs["patient"].astype(str)
        full_in = full[((keep != val_p) & keep.isin(tr_pats)).to_numpy()].copy()
        t_in = ExpressionTeacher("pca", n_components=32).fit(full_in)
        return {"teacher": t_in.transform(inner_tr), "genes": sd.pp.hest_genes(inner_tr, 50),
                "kd_classifier": teacher_targets(t_in.transform(full_in), n_clusters=base.n_clusters, seed=0)[:2]}

    table = select_peka(tr, T, genes, [setting], base=base, inner=inner).table
    for r in table.itertuples():
        print(f"inner val {r.split}: " + " ".join(f"{x:.6f}" for x in r.curve))
    kd = teacher_targets(teacher.transform(full_tr), n_clusters=base.n_clusters, seed=0)[:2]
    cfg = PekaConfig(**{**base.__dict__, **setting})
    m = PEKA("effnet-lite0-imagenet", cfg).fit(tr, T, genes, kd_classifier=kd)
    m.transform(img, key_added="X_peka")
    f = img.obsm["X_peka"]
    res = sd.bench.expression(img, "X_peka", folds=[fold], genes=genes, svd_solver="covariance_eigh", key_added=None)
    print(f"test {args.test_patient}: HEST-probe Pearson {res.mean:.6f}; features sha1 "
          f"{hashlib.sha1(np.ascontiguousarray(f).tobytes()).hexdigest()[:16]}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
