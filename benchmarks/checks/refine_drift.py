"""Why test-time refinement hurt, on the quick simulated data: a free mixture drifts, an anchored one does not.

    python benchmarks/checks/refine_drift.py          # about 2 min on 2 CPUs (features cached after the first run)
    python benchmarks/checks/refine_drift.py --smoke --out /tmp/smoke   # 30 spots per section, 2 epochs

Leave-one-patient-out over 3 simulated patients (K=3, 15 epochs, seed 0): the student's ARI
against the teacher on the held-out patient, raw and after each refinement: label propagation
(alpha 0.2 / 0.5 / 0.8), a *free* diagonal mixture only initialised from the student's posteriors
(the first version of ``refine_niches(method="gmm")``; 1, 2 and 10 EM steps), and the current
mixture that keeps the student's posterior as its prior at every step (weight 1 and 4; 3 and 10
EM steps).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("STDISTILL_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

SEED = 0


def free_mixture(x, probs, em_steps: int):
    """A diagonal GaussianMixture initialised from ``probs`` and then left free (the old refinement)."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    r = np.asarray(probs, dtype=np.float64) + 1e-6
    nk = r.sum(0)
    means = (r.T @ x) / nk[:, None]
    var = np.maximum((r.T @ x**2) / nk[:, None] - means**2 + 1e-3, 1e-3)
    gm = GaussianMixture(r.shape[1], covariance_type="diag", weights_init=nk / nk.sum(), means_init=means,
                         precisions_init=1.0 / var, max_iter=em_steps, reg_covar=1e-3, random_state=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return gm.fit(x).predict_proba(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    _common.add_args(ap)
    args = ap.parse_args()
    small = _common.smoke(args, epochs=2)
    results = _common.Results(args, seeds=[SEED], precision="fp32")
    import numpy as np
    import torch

    import stdistill as sd
    from stdistill.metrics import ari
    from stdistill.pp.neighbors import radius_for_neighbors, radius_graph
    from stdistill.students import NicheStudent, refine_niches
    from stdistill.students._refine import _section_features
    from stdistill.teachers import NicheTeacher

    torch.set_num_threads(1)
    print(f"seed {SEED}")
    a = _common.simulated_small(SEED) if small else sd.datasets.simulated(n_sections=3, n_patients=3, spots_per_section=120, seed=SEED)
    sd.features.run_extraction(a, "effnet-lite0-imagenet", key_added="X", precision="fp32")
    NicheTeacher(3, seed=SEED).fit_predict(a, key_added="t")
    secs = sd.io.sections(a)
    pats = a.obs.groupby("section", observed=True)["patient"].first().astype(str)
    variants = ([("propagate", {"alpha": v}) for v in (0.2, 0.5, 0.8)]
                + [("gmm", {"weight": w, "em_steps": e}) for w, e in ((1.0, 3), (4.0, 3), (1.0, 10))])
    rows = []
    for tp in sorted(set(pats)):
        tr = sd.io.subset_sections(a, [s for s in secs if pats[s] != tp])
        te = sd.io.subset_sections(a, [s for s in secs if pats[s] == tp])
        st = NicheStudent(3, feature_key="X", max_epochs=args.epochs, seed=SEED, refine_grid=[]).fit(tr, probs_key="t_probs")
        st.predict(te, key_added="s")
        p = np.asarray(te.obsm["s_probs"], dtype=float)
        row = {"patient": tp, "raw": ari(te.obs["t"], te.obs["s"])}
        ok = np.all(np.isfinite(p), 1)
        adj = radius_graph(te, radius_for_neighbors(te, 6, mask=ok)).tocsr()  # one section per simulated patient
        x = _section_features(te, "X", np.flatnonzero(ok), adj[ok][:, ok], 20)
        for steps in (1, 2, 10):
            q = free_mixture(x, p[ok], steps)
            row[f"free mixture {steps} EM"] = ari(te.obs["t"].to_numpy()[ok], q.argmax(1).astype(str))
        for method, kw in variants:
            refine_niches(te, "s_probs", method=method, feature_key="X", key_added="r", seed=SEED, **kw)
            row[f"{method} {kw}"] = ari(te.obs["t"], te.obs["r"])
        rows.append(row)
        print(tp, " | ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "patient"), flush=True)
    results.table("ari", rows, digits={k: 3 for k in rows[0] if k != "patient"})
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
