"""How much the streamed exact PCA (``stdistill._pca``) moves the niche teacher and student
against the scikit-learn PCA they used before (commit ``4ae6440``).

Before, the teacher fitted scikit-learn's PCA on the dense standardized matrix, with the
randomized solver above 500 genes; the student fitted ``PCA(n_pcs)`` with the automatic solver
(randomized for 1280-d features). Both now use the exact eigendecomposition of the streamed
covariance past ``stdistill._pca.IN_MEMORY_MB`` of input (smaller fits keep the old solver);
this script forces the streamed path at every size. For each dataset and K this prints: each path's largest component error against
scikit-learn's exact ``svd_solver="full"`` PCA, the largest embedding difference between the
old and new paths (after aligning component signs) and the ARI between their fitted niches.

    python benchmarks/checks/pca_paths.py                # simulated + HER2ST teacher
    python benchmarks/checks/pca_paths.py --student      # also the student on HER2ST's imaged
                                                         # sections (effnet-lite0 features, fp32;
                                                         # read from the feature cache or computed)
    python benchmarks/checks/pca_paths.py --time 100000  # only: seconds of the student's
                                                         # normalisation + PCA, old vs new, on
                                                         # benchmarks/scale.py's synthetic features
    python benchmarks/checks/pca_paths.py --smoke --out /tmp/smoke   # all three on small data (K=3)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common, scale

import _common  # noqa: E402
import stdistill as sd  # noqa: E402
from stdistill.students import NicheStudent  # noqa: E402
from stdistill.students.niche import normalise_features  # noqa: E402
from stdistill.teachers import NicheTeacher  # noqa: E402
from stdistill.teachers._embedding import _standardize_by  # noqa: E402


def _sklearn_teacher_pcs(solver: str | None):
    """The teacher's PCA step as before (``solver=None``: randomized above 500 genes, as it was)."""

    def pcs(self, logx, groups, fit):
        z = _standardize_by(logx, groups)
        if fit:
            n_pcs = max(1, min(self.params["n_pcs"], z.shape[1], z.shape[0] - 1))
            s = solver or ("randomized" if z.shape[1] > 500 else "full")
            pca = PCA(n_components=n_pcs, random_state=self.params["seed"], svd_solver=s).fit(z)
            self.state_["pca_components"] = pca.components_.astype(np.float32)
            self.state_["pca_mean"] = pca.mean_.astype(np.float32)
        return ((z - self.state_["pca_mean"]) @ self.state_["pca_components"].T).astype(np.float32)

    return pcs


def _sklearn_student_normalise(self, adata, f, fit, stats=None):
    """The student's normalisation + PCA as before (scikit-learn's automatic solver)."""
    z, ok = normalise_features(adata, f, self.params["feature_norm"])
    if fit:
        pca = PCA(n_components=self.params["n_pcs"], random_state=self.params["seed"]).fit(z[ok])
        self.info_["pca_mean"] = pca.mean_.astype(np.float32)
        self.info_["pca_components"] = pca.components_.astype(np.float32)
        self.info_["solver"] = pca._fit_svd_solver
    z = ((z - self.info_["pca_mean"]) @ self.info_["pca_components"].T).astype(np.float32)
    z[~ok] = 0.0
    return z, ok


def _compare(old_c, new_c, exact_c, old_e, new_e) -> dict:
    s = np.sign((old_c * new_c).sum(1))  # align the old path's signs to the new one's
    return {"new vs exact": float(np.abs(new_c - exact_c).max()), "old vs exact": float(np.abs(old_c - exact_c).max()),
            "max |emb old - new|": float(np.abs(old_e * s - new_e).max()), "max |emb|": float(np.abs(new_e).max())}


def _teacher_rows(name: str, a, ks) -> list[dict]:
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        new = NicheTeacher(k, seed=0).fit(a)
        orig = NicheTeacher._project_pcs
        try:
            NicheTeacher._project_pcs = _sklearn_teacher_pcs(None)
            old = NicheTeacher(k, seed=0).fit(a)
            old_e = old._embed(a, fit=False)
            NicheTeacher._project_pcs = _sklearn_teacher_pcs("full")
            exact = NicheTeacher(k, seed=0).fit(a)
        finally:
            NicheTeacher._project_pcs = orig
        r = _compare(old.state_["pca_components"], new.state_["pca_components"], exact.state_["pca_components"],
                     old_e, new._embed(a, fit=False))
        rows.append({"data": name, "model": "teacher", "K": k, **r,
                     "ARI(old, new niches)": adjusted_rand_score(old.fit_probs_.argmax(1), new.fit_probs_.argmax(1)),
                     "ARI(exact, new niches)": adjusted_rand_score(exact.fit_probs_.argmax(1), new.fit_probs_.argmax(1)),
                     "s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    return rows


def _student_rows(a, k: int = 6, epochs: int = 12, name: str = "her2st imaged") -> list[dict]:
    a = sd.io.subset_sections(a, [s for s in sd.io.sections(a) if sd.io.has_image(a, s)])
    sd.features.run_extraction(a, "effnet-lite0-imagenet", key_added="X_e", precision="fp32")
    a.obsm["niche_probs"] = NicheTeacher(k, seed=0).fit(a).fit_probs_
    kw = dict(feature_key="X_e", max_epochs=epochs, seed=0)
    t0 = time.perf_counter()
    new = NicheStudent(k, **kw).fit(a)
    orig = NicheStudent._normalise
    try:
        NicheStudent._normalise = _sklearn_student_normalise
        old = NicheStudent(k, **kw).fit(a)
        old_e = old._normalise(a, old._features(a), fit=False)[0]
    finally:
        NicheStudent._normalise = orig
    z, ok = normalise_features(a, a.obsm["X_e"], "section")
    exact = PCA(new.params["n_pcs"], svd_solver="full").fit(z[ok]).components_
    r = _compare(old.info_["pca_components"], new.info_["pca_components"], exact, old_e,
                 new._normalise(a, new._features(a), fit=False)[0])
    ari = adjusted_rand_score(old.predict_proba(a).argmax(1), new.predict_proba(a).argmax(1))
    row = {"data": name, "model": f"student ({epochs} epochs)", "K": k, **r,
           "ARI(old, new niches)": ari, "s": time.perf_counter() - t0}
    print(row, flush=True)
    return [row]


def _time_student(n: int, threads: int = 2) -> dict:
    """Seconds of the student's normalisation + PCA fit + projection, new path then old path."""
    import torch
    from scale import _cohort

    torch.set_num_threads(threads)
    a = _cohort(n, counts=False)
    s = NicheStudent(6, feature_key="X_f")
    f = s._features(a)
    t0 = time.perf_counter()
    s._normalise(a, f, fit=True)
    t1 = time.perf_counter()
    _sklearn_student_normalise(s, a, f, fit=True)
    t2 = time.perf_counter()
    print(f"student normalisation + PCA(64) on {n} x {f.shape[1]} features, {threads} threads: "
          f"streamed exact {t1 - t0:.1f} s, old (scikit-learn, {s.info_['solver']} solver) {t2 - t1:.1f} s")
    return {"spots": n, "features": f.shape[1], "threads": threads, "streamed exact s": t1 - t0,
            f"old (scikit-learn, {s.info_['solver']} solver) s": t2 - t1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", action="store_true", help="also compare the student on HER2ST's imaged sections")
    ap.add_argument("--time", type=int, default=0, help="only time the student's normalisation + PCA on this many spots")
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    small = _common.smoke(args, student=True)
    results = _common.Results(args, seeds=[0], precision="fp32",
                              variant="time" if args.time else "student" if args.student else None)
    # the streamed path at every size (the estimators stream only past _pca.IN_MEMORY_MB): what is compared
    os.environ["STDISTILL_PCA_IN_MEMORY_MB"] = "0"
    if args.time or small:
        t = _time_student(args.time or 2000, 1 if small else 2)
        results.table("time", [t], digits={k: 1 for k in t if k.endswith(" s")})
        if not small:
            return results.finish()
    t0 = time.perf_counter()
    rows = _teacher_rows("simulated", _common.simulated_small() if small else sd.datasets.simulated(seed=0),
                         (3,) if small else (3, 6))
    if small and not _common.has_dataset("her2st") and not args.root:
        print("her2st data absent: the smoke run compares the simulated teacher and student only")
        her = _common.simulated_small()
    else:
        her = _common.her2st(args.root, small)
        rows += _teacher_rows("her2st", her, (3,) if small else (4, 6, 8))
    if args.student:
        rows += _student_rows(her, 3 if small else 6, 2 if small else 12,
                              "her2st imaged" if "her2st" in {r["data"] for r in rows} else "simulated")
    df = pd.DataFrame(rows).drop(columns="s")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.3g}".format):
        print(df.to_string(index=False))
    print(f"# total {time.perf_counter() - t0:.0f} s")
    results.table("paths", df)
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
