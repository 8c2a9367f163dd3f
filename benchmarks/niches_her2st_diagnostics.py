"""Diagnostics behind the HER2ST niche benchmark's choices (docs/niches.md, "What was investigated").

    python benchmarks/niches_her2st_diagnostics.py        # about 5 min on 2 CPU cores
    python benchmarks/niches_her2st_diagnostics.py --smoke --out /tmp/smoke   # 30 spots of A1, B1, B4, C2; K=3

1. Teacher batch correction, judged on the label-free NMI(niche, patient) over all 36 sections
   (no student result, no pathology label): global scaling, per-section standardisation with a
   full or a diagonal mixture, Harmony by section / patient (needs harmonypy), cell-type
   proportions.
2. The student's validation curves on the inner pairs B -> C and C -> B (the training patients of
   the A fold): per-epoch ARI and niche-id error against the teacher.
3. Cross-patient transfer with a plain supervised model: logistic regression on
   neighbourhood-averaged features, B -> C and C -> B, against k-means fitted on the target
   patient's own spots.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("STDISTILL_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import _common  # noqa: E402
from niches_her2st import KEY, load  # noqa: E402

BC = ["B4", "C2", "C3", "C4", "C5"]  # the imaged sections of patients B and C


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    ks, epochs = ((3,), 2) if _common.smoke(args) else ((4, 6, 8), 30)
    results = _common.Results(args, seeds=[0], precision="fp32")
    import torch

    torch.set_num_threads(1)
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from stdistill import io
    from stdistill.metrics import ari, niche_id_accuracy, nmi
    from stdistill.pp import aggregate_neighbors
    from stdistill.recipes.niches import kmeans_niches, markdown
    from stdistill.students import NicheStudent
    from stdistill.students.niche import normalise_features
    from stdistill.teachers import NicheTeacher

    t0 = time.perf_counter()
    a = load(None, str(_common.dataset("her2st", args.root)), smoke=args.smoke)  # fp32 features (cached under the user cache)
    bc_secs = [s for s in BC if s in io.sections(a)]
    pats = a.obs["patient"].astype(str).to_numpy()

    # 1 ------------------------------------------------------------------------------------
    variants = [
        ("global scaling (batch_correction=None)", dict(batch_correction=None)),
        ("per-section standardisation, full-covariance mixture", dict(covariance_type="full")),
        ("per-section standardisation, diagonal mixture (default)", dict()),
        ("cell-type proportions, per-section standardisation", dict(feature_key="celltype_props")),
    ]
    if importlib.util.find_spec("harmonypy") is not None:
        variants += [("Harmony by section", dict(batch_correction="harmony")),
                     ("Harmony by patient", dict(batch_correction="harmony", batch_key="patient"))]
    else:
        print("harmonypy not installed: Harmony rows skipped (pip install 'stdistill[harmony]')")
    rows = []
    for label, kw in variants:
        row = {"teacher": label}
        for k in ks:
            NicheTeacher(k, seed=0, **kw).fit_predict(a, key_added="t")
            row[f"NMI(niche, patient) K={k}"] = nmi(pats, a.obs["t"].astype(str))
        rows.append(row)
        print(row, flush=True)
    print("\n1. Teacher batch correction (all 36 sections):\n\n" + markdown(pd.DataFrame(rows)))
    results.table("teacher_batch_correction", pd.DataFrame(rows), digits={f"NMI(niche, patient) K={k}": 3 for k in ks})

    # 2 ------------------------------------------------------------------------------------
    orig, holder = NicheStudent._train, {}

    def capture(self, *args, **kw):  # keep the trained LightningModule (its per-epoch histories)
        holder["m"] = orig(self, *args, **kw)
        return holder["m"]

    NicheStudent._train = capture
    curves = []
    for k in ks:
        NicheTeacher(k, seed=0).fit_predict(a, key_added="t")
        bc = io.subset_sections(a, bc_secs)
        for val in ("B", "C"):
            NicheStudent(k, feature_key=KEY, refit=False, val_patients=[val], max_epochs=epochs, patience=100).fit(
                bc, probs_key="t_probs")
            m = holder["m"]
            curves.append({"K": k, "train -> val": f"{'C' if val == 'B' else 'B'} -> {val}",
                           "val ARI, epochs 1,4,..,28": " ".join(f"{v:.2f}" for v in m.val_ari_history[::3]),
                           "val niche-id error, epochs 1,4,..,28": " ".join(f"{v:.2f}" for v in m.val_err_history[::3]),
                           "epoch of best val KD loss": int(np.argmin(m.val_history)) + 1})
    NicheStudent._train = orig
    print("\n2. Student validation curves on the inner pairs (default teacher):\n\n" + markdown(pd.DataFrame(curves)))
    results.table("student_curves", pd.DataFrame(curves))

    # 3 ------------------------------------------------------------------------------------
    rows = []
    for label, kw in (("default (expression PCA)", {}), ("cell-type proportions", {"feature_key": "celltype_props"})):
        NicheTeacher(6, seed=0, **kw).fit_predict(a, key_added="t")
        bc = io.subset_sections(a, bc_secs)
        z, _ = normalise_features(bc, bc.obsm[KEY], "section")
        bc.obsm["z"] = z
        aggregate_neighbors(bc, "z", radius_um=400.4, mode="mean", key_added="zn")
        y = bc.obs["t"].astype(str).to_numpy()
        p = bc.obs["patient"].astype(str).to_numpy()
        for src, dst in (("B", "C"), ("C", "B")):
            s, d = p == src, p == dst
            pca = PCA(min(32, int(s.sum()) - 1), random_state=0).fit(bc.obsm["zn"][s])  # 32 (fewer only in --smoke)
            clf = LogisticRegression(C=0.05, max_iter=2000).fit(pca.transform(bc.obsm["zn"][s]), y[s])
            pred = clf.predict(pca.transform(bc.obsm["zn"][d]))
            tgt = io.subset_sections(bc, [x for x in io.sections(bc) if x.startswith(dst)])
            km = kmeans_niches(tgt, KEY, 6, radius_um=400.4, seed=0, inplace=False)
            rows.append({"teacher (K=6)": label, "train -> test": f"{src} -> {dst}",
                         "logistic regression ARI": ari(y[d], pred), "logistic regression ID-acc": niche_id_accuracy(y[d], pred),
                         "k-means on the test patient's own nbr-averaged features, ARI": ari(tgt.obs["t"].astype(str), km)})
    print("\n3. Cross-patient transfer of a supervised linear model:\n\n" + markdown(pd.DataFrame(rows)))
    results.table("linear_transfer", pd.DataFrame(rows), digits={c: 3 for c in pd.DataFrame(rows).columns})
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
