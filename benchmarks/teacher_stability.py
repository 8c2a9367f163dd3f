"""Niche teacher stability on HER2ST; CellCharter side by side; the niche student against the
stable teacher; teachers whose niches the patients share.

    python benchmarks/teacher_stability.py                 # the full run (time printed at the end)
    python benchmarks/teacher_stability.py --smoke         # a tiny simulated run (seconds)
    python benchmarks/teacher_stability.py --parts stability auto    # some parts only
    python benchmarks/teacher_stability.py --parts students chosen   # also choose teacher and K per fold

Parts (teacher: ``NicheTeacher``, method "aggregate", fitted on all 36 sections, expression only):

- ``stability``: per K, the teacher refitted over seeds (every pair of 0, 1, 2), PCA solvers
  (randomized vs exact at the same seed) and spot subsamples (3 fits on 90% of the spots, ARI on
  the spots two fits share): ARI mean ± sd over the pairs, for the single-fit teacher
  (``consensus=1``) and the consensus teacher (``consensus=--members``).
- ``teachers``: each teacher's own metrics at seed 0: NMI(niche, patient), agreement with the
  pathologist labels (ARI, NMI on the labelled spots, "undetermined" left out), the smallest
  niche, which imaged patients hold each niche, and the share of stable spots.
- ``auto``: K chosen by stability (``n_niches="auto"``, K in 2..10): the curve and the K.
- ``cellcharter``: CellCharter (``pip install 'stdistill[bench-niches]'``) on the same spots and
  the same expression embedding as the teacher (per-section standardised PCA, 10 components):
  Delaunay graph per section, ``remove_long_links``, ``aggregate_neighbors(n_layers=3)``,
  ``ClusterAutoK(n_clusters=(2, 10))``; its K, its stability curve, ARI with our teachers.
- ``students``: leave-one-patient-out over the imaged patients A, B, C (``recipes.niches.run``,
  seed 0): student, k-means and neighbourhood k-means against each teacher, on all test spots,
  on the stable ones and on those whose niche a training patient holds; then, per fold, the
  teacher kind and K chosen on the two training patients only (each trains a student that is
  scored on the other, gap to neighbourhood k-means fitted on those two), and the chosen
  teacher's result on the held-out patient: part ``chosen``, not in the default run.

Features: effnet-lite0-imagenet at fp32 (an ImageNet model, not a pathology model), from the
feature cache (see benchmarks/niches_her2st.py). Writes ``<out>/table.md`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import _common  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

KEY = "X_effnet-lite0-imagenet"
PARTS = ("stability", "teachers", "auto", "cellcharter", "students", "chosen")
DEFAULT_PARTS = PARTS[:-1]  # "chosen" (72 more students) only on request: the default stays under 45 min on 2 cores
STABLE = 0.8  # a spot is stable when at least this share of refits (or members) agree with its niche
PRECISION = 3


def kinds(members: int) -> dict[str, dict]:
    """Teacher kinds: NicheTeacher keyword arguments."""
    out = {"single": dict(consensus=1), "consensus": dict(consensus=members),
           "celltypes": dict(feature_key="celltype_props", consensus=members),
           "harmony_patient": dict(batch_key="patient", batch_correction="harmony", consensus=members)}
    import importlib.util

    if importlib.util.find_spec("harmonypy") is None:
        print("skipped teacher harmony_patient: harmonypy is not installed (pip install 'stdistill[harmony]')")
        del out["harmony_patient"]
    return out


def load_data(args):
    """(adata with obsm[KEY] on imaged spots, description)."""
    import stdistill as sd

    if args.smoke:
        a = sd.datasets.simulated(n_sections=3, n_patients=3, spots_per_section=80, seed=0)
        rng = np.random.default_rng(0)
        props = np.asarray(a.obsm["celltype_props"], dtype=float)
        a.obsm[KEY] = (props @ rng.normal(size=(props.shape[1], 16)) + 0.3 * rng.normal(size=(a.n_obs, 16))).astype(np.float32)
        return a, "simulated (3 sections, 3 patients); stand-in image features: cell-type proportions, projected, plus noise"
    from niches_her2st import load

    a = load(args.features, str(_common.dataset("her2st", args.root)))
    a.X.sort_indices()  # the same counts; log-normalisation is faster on sorted indices
    return a, f"HER2ST, {a.n_obs} spots of 36 sections (8 patients), image features on {int(np.isfinite(a.obsm[KEY][:, 0]).sum())} spots (A, B, C)"


def pm(x) -> str:
    x = pd.Series(x).dropna()
    return "" if x.empty else (f"{x.mean():.{PRECISION}f} ± {x.std(ddof=0):.{PRECISION}f}" if len(x) > 1 else f"{x.mean():.{PRECISION}f}")


# ----------------------------------------------------------------------------- parts
def stability_part(a, ks, args, kinds_: dict) -> tuple[pd.DataFrame, dict]:
    """Stability table rows and, per teacher, ``{K: per-spot agreement}`` of the seed-0 fit with the others."""
    from stdistill.teachers import NicheTeacher
    from stdistill.teachers._stability import spot_agreement, teacher_stability

    rows, agree = [], {}
    for name in ("single", "consensus"):
        t0 = time.perf_counter()
        pairs, runs = teacher_stability(a, NicheTeacher(ks[0], **kinds_[name]), ks=ks, seeds=tuple(args.seeds),
                                        n_subsamples=3, fraction=0.9)
        secs = time.perf_counter() - t0
        for k in ks:
            r = {"K": k, "teacher": name}
            for kind in ("seed", "solver", "subsample"):
                r[f"ARI {kind}"] = pm(pairs.loc[(pairs["k"] == k) & (pairs["perturbation"] == kind), "ari"])
            r["run s"] = f"{secs:.0f}"
            rows.append(r)
        agree[name] = {k: spot_agreement(runs[f"seed{args.seeds[0]}"][k], [v[k] for n, v in runs.items()
                                                                        if n != f"seed{args.seeds[0]}"]) for k in ks}
        print(f"stability {name}: {secs:.0f} s", flush=True)
    return pd.DataFrame(rows), agree


def teacher_fits(a, ks, kinds_: dict, agree: dict) -> tuple[dict, dict]:
    """``{kind: {K: (probs, agreement)}}`` at seed 0, agreement across the teacher's stability
    refits where they were run (else None), and ``{kind: {K: members' agreement}}`` (consensus)."""
    from stdistill.teachers import NicheTeacher
    from stdistill.teachers._stability import fit_each_k

    out, members = {}, {}
    for name, kw in kinds_.items():
        t0 = time.perf_counter()
        fits = fit_each_k(a, NicheTeacher(ks[0], seed=0, **kw), ks)
        members[name] = {k: ag for k, (_, ag) in fits.items() if ag is not None}
        out[name] = {k: (p, agree[name][k].to_numpy() if name in agree else None) for k, (p, _) in fits.items()}
        print(f"teacher {name}: K {ks} fitted in {time.perf_counter() - t0:.0f} s", flush=True)
    return out, members


def teacher_metrics(a, fits: dict, members: dict, imaged: np.ndarray) -> pd.DataFrame:
    """Each teacher's own metrics (no student)."""
    from stdistill.metrics import ari, niche_patients, nmi

    pats = a.obs["patient"].astype(str).to_numpy()
    lab = a.obs["pathology"].astype(str).to_numpy() if "pathology" in a.obs else np.full(a.n_obs, "nan")
    ok = ~np.isin(lab, ["nan", "undetermined", "None", ""])
    rows = []
    for name, by_k in fits.items():
        for k, (probs, ag) in by_k.items():
            n = probs.argmax(1).astype(str)
            held = niche_patients(n[imaged], pats[imaged], categories=[str(i) for i in range(k)])
            share = np.bincount(probs.argmax(1), minlength=k) / len(n)
            rows.append({"teacher": name, "K": k, "NMI(niche, patient)": nmi(pats, n), "NMI imaged": nmi(pats[imaged], n[imaged]),
                         "ARI pathology": ari(lab[ok], n[ok]) if ok.any() else np.nan,
                         "NMI pathology": nmi(lab[ok], n[ok]) if ok.any() else np.nan,
                         "smallest niche": share.min(),
                         "niches held by all imaged": int((held["n_patients"] == held.shape[1] - 2).sum()),
                         "niches held by <= 1 imaged": int((held["n_patients"] <= 1).sum()),
                         "stable spots (refits)": np.nan if ag is None else float(np.mean(np.asarray(ag) >= STABLE)),
                         "stable spots (members)": float(np.mean(members[name][k] >= STABLE)) if k in members[name] else np.nan})
    return pd.DataFrame(rows)


def niche_table(a, fits: dict, k: int, imaged: np.ndarray) -> pd.DataFrame:
    """Per teacher at K = ``k``, per niche: its share of all spots, the patients holding it (at least
    2% of a patient's spots; all 8 patients, then the imaged ones) and the imaged patients' spots in it."""
    from stdistill.metrics import niche_patients

    pats = a.obs["patient"].astype(str).to_numpy()
    rows = []
    for name, by_k in fits.items():
        n = by_k[k][0].argmax(1).astype(str)
        cats = [str(i) for i in range(k)]
        held, held_img = niche_patients(n, pats, categories=cats), niche_patients(n[imaged], pats[imaged], categories=cats)
        img_cols = [c for c in held_img.columns if c not in ("n_patients", "patients")]
        for c in cats:
            rows.append({"teacher": name, "K": k, "niche": c, "share of spots": float(np.mean(n == c)),
                         "patients holding": held.loc[c, "patients"], "n patients": int(held.loc[c, "n_patients"]),
                         "imaged holding": held_img.loc[c, "patients"],
                         **{f"spots {p}": int(held_img.loc[c, p]) for p in img_cols}})
    return pd.DataFrame(rows)


def auto_part(a, members: int, k_range: tuple[int, int]) -> tuple[pd.DataFrame, list[dict]]:
    """Stability curves over ``k_range`` (K=2 included, to show it) of the single-fit and the
    consensus teacher, and the K that ``n_niches="auto"`` (3..10) and ``k_range`` choose: the
    members and halvings do not depend on the range, so the curve gives both choices."""
    from stdistill.teachers import NicheTeacher
    from stdistill.teachers._consensus import AUTO_RANGE

    curves, chosen = [], []
    for name, kw in (("single", dict(consensus=1)), ("consensus", dict(consensus=members))):
        t0 = time.perf_counter()
        st = NicheTeacher(k_range, seed=0, **kw).fit(a).state_["stability"]
        secs = time.perf_counter() - t0
        c = pd.DataFrame({"K": st["k"], f"{name}: ARI between fits": [f"{m:.{PRECISION}f} ± {s:.{PRECISION}f}"
                                                                       for m, s in zip(st["ari_mean"], st["ari_sd"])]})
        if name == "consensus":
            c["consensus: ARI between halves"] = [f"{m:.{PRECISION}f} ± {s:.{PRECISION}f}"
                                                  for m, s in zip(st["split_mean"], st["split_sd"])]
        curves.append(c.set_index("K"))
        score = pd.Series(st["score"], index=st["k"])
        auto = int(score[score.index >= AUTO_RANGE[0]].idxmax())
        chosen.append({"teacher": name, "criterion": st["criterion"], "fits per K": st["n_repeats"],
                       "K (auto, 3..10)": auto, f"K ({k_range[0]}..{k_range[1]})": st["chosen"], "seconds": secs})
        print(f"auto {name}: K={auto} ({secs:.0f} s)", flush=True)
    return pd.concat(curves, axis=1).reset_index(), chosen


def cellcharter_part(a, ks, fits: dict, max_runs: int, smoke: bool) -> tuple[dict | None, str]:
    """CellCharter's ClusterAutoK on the teacher's embedding: ``({"best_k", "curve", "ari"}, note)``
    or ``(None, reason)`` when it is not installed."""
    try:
        import cellcharter as cc
        import squidpy as sq
    except ImportError as e:
        return None, f"CellCharter rows skipped: {e.name} is not installed (pip install 'stdistill[bench-niches]')"
    import logging

    import anndata as ad

    from stdistill.io import spatial_um
    from stdistill.metrics import ari, nmi
    from stdistill.teachers import NicheTeacher

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    e = NicheTeacher(ks[0], seed=0, consensus=1)._fit_embedding(a)
    b = ad.AnnData(obs=a.obs[["section", "patient"]].astype("category"), obsm={"spatial": spatial_um(a), "X_teacher": e})
    sq.gr.spatial_neighbors(b, library_key="section", coord_type="generic", delaunay=True, spatial_key="spatial")
    cc.gr.remove_long_links(b)
    cc.gr.aggregate_neighbors(b, n_layers=3, use_rep="X_teacher", out_key="X_cellcharter", sample_key="section")
    lo_hi = (2, max(ks)) if smoke else (2, 10)
    autok = cc.tl.ClusterAutoK(n_clusters=lo_hi, max_runs=max_runs,
                               model_params=dict(random_state=0, trainer_params=dict(accelerator="cpu", enable_progress_bar=False)))
    autok.fit(b, use_rep="X_cellcharter")
    inner = autok.n_clusters[1:-1]
    curve = pd.DataFrame({"K": inner, "CellCharter stability (FM)": [pm(autok.stability[i]) for i in range(len(inner))]})
    out_ari = []
    for k in sorted(set(ks) | {int(autok.best_k)}):
        lab = np.asarray(autok.predict(b, use_rep="X_cellcharter", k=k)).astype(str)
        row = {"K": k, "NMI(cluster, patient)": nmi(a.obs["patient"].astype(str).to_numpy(), lab)}
        for name, by_k in fits.items():
            if k in by_k:
                row[f"ARI vs {name}"] = ari(by_k[k][0].argmax(1), lab)
        out_ari.append(row)
    secs = time.perf_counter() - t0
    print(f"CellCharter: best K {autok.best_k} ({secs:.0f} s)", flush=True)
    note = (f"CellCharter {cc.__version__}: ClusterAutoK(n_clusters={lo_hi}, max_runs={max_runs}), GaussianMixture "
            f"(CellCharter's default: full covariances) on aggregate_neighbors(n_layers=3) of the teacher's embedding; "
            f"{secs:.0f} s")
    return {"best_k": int(autok.best_k), "curve": curve, "ari": pd.DataFrame(out_ari), "seconds": secs}, note


def _scores(teach, pred, tr, te, mask) -> dict:
    """ARI, NMI, ID accuracy of ``pred`` vs ``teach`` on ``te & mask`` (clusters mapped to teacher
    niches by majority on ``tr`` when ``pred`` is a baseline)."""
    from stdistill.metrics import apply_map, ari, majority_map, niche_id_accuracy, nmi

    m = te & mask
    if m.sum() < 2:
        return dict(ari=np.nan, nmi=np.nan, id_acc=np.nan)
    mapped = apply_map(pred[m], majority_map(pred[tr], teach[tr]), default="-1").astype(str)
    return dict(ari=ari(teach[m], pred[m]), nmi=nmi(teach[m], pred[m]), id_acc=niche_id_accuracy(teach[m], mapped))


def outer_runs(a, fits: dict, ks, max_epochs: int, imaged: np.ndarray) -> pd.DataFrame:
    """Leave-one-patient-out students and baselines against every teacher and K (seed 0), scored
    on all test spots, stable spots and shared-niche spots."""
    from stdistill.metrics import shared_niche_mask
    from stdistill.recipes import niches
    from stdistill._niches import write_niches

    pats = a.obs["patient"].astype(str).to_numpy()
    rows = []
    for name, by_k in fits.items():
        for k in ks:
            probs, ag = by_k[k]
            write_niches(a, probs, niches.TEACHER_KEY)
            t0 = time.perf_counter()
            niches.run(a, KEY, k, seed=0, reuse_teacher=True, figures=False, verbose=False, student_kwargs={"max_epochs": max_epochs})
            teach = a.obs[niches.TEACHER_KEY].astype(str).to_numpy()
            for p in sorted(set(pats[imaged])):
                te, tr = imaged & (pats == p), imaged & (pats != p)
                masks = {"all": np.ones(a.n_obs, bool), "shared": np.zeros(a.n_obs, bool)}
                masks["shared"][te] = shared_niche_mask(teach[te], teach[tr], pats[tr])
                if ag is not None:
                    masks["stable"] = np.asarray(ag) >= STABLE
                for method, key in (("student", niches.STUDENT_KEY), ("kmeans", "niche_kmeans"), ("kmeans_nbr", "niche_kmeans_nbr")):
                    pred = a.obs[key].astype(str).to_numpy()
                    for spots, m in masks.items():
                        rows.append(dict(teacher=name, K=k, fold=p, method=method, spots=spots, n=int((te & m).sum()),
                                         **_scores(teach, pred, tr, te, m)))
            print(f"students vs {name} K={k}: {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.DataFrame(rows)


def inner_gaps(a, fits: dict, ks, max_epochs: int, imaged: np.ndarray) -> pd.DataFrame:
    """For every ordered pair (X, Y) of imaged patients, teacher and K: a student trained on X
    alone, scored on Y, minus neighbourhood k-means fitted on X and Y only (ARI against the teacher)."""
    from stdistill.io import subset_sections
    from stdistill.metrics import ari
    from stdistill.pp.neighbors import radius_for_neighbors
    from stdistill.recipes.niches import TEACHER_KEY, kmeans_niches
    from stdistill.students import NicheStudent
    from stdistill._niches import write_niches

    pats = a.obs["patient"].astype(str).to_numpy()
    sec = a.obs["section"].astype(str).to_numpy()
    img_of = pd.Series(imaged, index=a.obs_names)
    secs_of = {p: sorted(set(sec[imaged & (pats == p)])) for p in sorted(set(pats[imaged]))}
    r_nbr = radius_for_neighbors(a, NicheStudent().params["n_neighbors"], mask=imaged)
    rows = []
    for x, y in [(x, y) for x in secs_of for y in secs_of if x != y]:
        pair = subset_sections(a, secs_of[x] + secs_of[y])
        on_y = (pair.obs["patient"].astype(str).to_numpy() == y) & img_of.loc[pair.obs_names].to_numpy()
        for name, by_k in fits.items():
            for k in ks:
                write_niches(pair, by_k[k][0][a.obs_names.get_indexer(pair.obs_names)], TEACHER_KEY)
                teach = pair.obs[TEACHER_KEY].astype(str).to_numpy()
                with warnings.catch_warnings():  # one training patient: early stopping on a spatial block (as intended)
                    warnings.simplefilter("ignore", UserWarning)
                    st = NicheStudent(k, feature_key=KEY, seed=0, max_epochs=max_epochs).fit(
                        subset_sections(pair, secs_of[x]), probs_key=f"{TEACHER_KEY}_probs")
                s_pred = np.full(pair.n_obs, "-1", dtype=object)
                s_pred[pair.obs["patient"].astype(str).to_numpy() == y] = st.predict_proba(
                    subset_sections(pair, secs_of[y])).argmax(1).astype(str)
                nbr = np.asarray(kmeans_niches(pair, KEY, k, radius_um=r_nbr, seed=0, inplace=False)).astype(str)
                rows.append(dict(teacher=name, K=k, train=x, val=y, student=ari(teach[on_y], s_pred[on_y]),
                                 kmeans_nbr=ari(teach[on_y], nbr[on_y])))
    out = pd.DataFrame(rows)
    out["gap"] = out["student"] - out["kmeans_nbr"]
    return out


def chosen_per_fold(outer: pd.DataFrame, inner: pd.DataFrame) -> pd.DataFrame:
    """Per held-out patient: the (teacher, K) with the best mean inner gap on its training
    patients, and that teacher's held-out result."""
    rows = []
    allspots = outer[outer["spots"] == "all"]
    for p in sorted(outer["fold"].unique()):
        inn = inner[(inner["train"] != p) & (inner["val"] != p)]
        score = inn.groupby(["teacher", "K"])["gap"].mean()
        (t, k), best = score.idxmax(), score.max()
        o = allspots[(allspots["teacher"] == t) & (allspots["K"] == k) & (allspots["fold"] == p)].set_index("method")["ari"]
        rows.append({"held-out": p, "chosen teacher": t, "chosen K": k, "inner gap": best, "student ARI": o["student"],
                     "kmeans_nbr ARI": o["kmeans_nbr"], "gap": o["student"] - o["kmeans_nbr"]})
    return pd.DataFrame(rows)


def shared_table(outer: pd.DataFrame, tmetrics: pd.DataFrame) -> pd.DataFrame:
    """Per teacher and K: NMI(niche, patient), niches only one imaged patient holds, and the
    student's gap to neighbourhood k-means on all held-out spots and on shared-niche spots."""
    m = outer.groupby(["teacher", "K", "spots", "method"])["ari"].mean().unstack("method")
    n = outer[outer["method"] == "student"].groupby(["teacher", "K", "spots"])["n"].sum()
    rows = []
    for (t, k), tm in tmetrics.set_index(["teacher", "K"]).iterrows():
        if (t, k, "all") not in m.index:
            continue
        a_, s_ = m.loc[(t, k, "all")], m.loc[(t, k, "shared")]
        rows.append({"teacher": t, "K": k, "NMI(niche, patient)": tm["NMI(niche, patient)"], "NMI imaged": tm["NMI imaged"],
                     "niches held by <= 1 imaged": int(tm["niches held by <= 1 imaged"]),
                     "student ARI": a_["student"], "kmeans_nbr ARI": a_["kmeans_nbr"], "gap": a_["student"] - a_["kmeans_nbr"],
                     "shared spots": n[(t, k, "shared")] / max(n[(t, k, "all")], 1),
                     "student ARI shared": s_["student"], "gap shared": s_["student"] - s_["kmeans_nbr"]})
    return pd.DataFrame(rows)


def student_table(outer: pd.DataFrame) -> pd.DataFrame:
    """The students of the single and the consensus teacher, on all and on stable spots (mean over folds)."""
    o = outer[outer["teacher"].isin(["single", "consensus"]) & outer["spots"].isin(["all", "stable"])]
    g = o.groupby(["K", "teacher", "spots", "method"], sort=True)
    t = g[["ari", "nmi", "id_acc"]].mean()
    t["test spots"] = o[o["method"] == "student"].groupby(["K", "teacher", "spots"])["n"].sum().reindex(
        t.index.droplevel("method")).to_numpy()
    return t.reset_index()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS))
    ap.add_argument("--features", type=Path, default=None, help=f"an .h5ad with obsm['{KEY}'] (default: the feature cache)")
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 6, 8], help="K")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="teacher seeds of the stability part")
    ap.add_argument("--members", type=int, default=10, help="consensus members")
    ap.add_argument("--max-epochs", type=int, default=30, help="student epochs at most")
    ap.add_argument("--cc-runs", type=int, default=5, help="CellCharter ClusterAutoK max_runs")
    _common.add_args(ap, out="results/teacher_stability", root="her2st")
    args = ap.parse_args()
    smoke = _common.smoke(args, ks=[3], seeds=[0, 1], members=3, max_epochs=2, cc_runs=2)
    res = _common.Results(args, seeds=args.seeds, precision="fp32" if not smoke else None)

    import torch

    torch.set_num_threads(1)

    a, desc = load_data(args)
    ks, imaged, kinds_ = args.ks, np.isfinite(a.obsm[KEY][:, 0]), kinds(args.members)
    print(f"Data: {desc}.\nK {ks}; consensus members {args.members}; stability seeds {args.seeds}; students seed 0, at "
          f"most {args.max_epochs} epochs; stable spot: >= {STABLE:.0%} of refits agree.", flush=True)
    agree: dict = {}
    if "stability" in args.parts:
        stab, agree = stability_part(a, ks, args, kinds_)
        _show(res, "stability", stab, "Teacher stability (ARI between refits, mean ± sd over pairs)")
    fits, members_ag = teacher_fits(a, ks, kinds_ if {"teachers", "students"} & set(args.parts) else
                                    {k: v for k, v in kinds_.items() if k in ("single", "consensus")}, agree)
    tm = teacher_metrics(a, fits, members_ag, imaged)
    _show(res, "teachers", tm, "The teachers' own metrics (seed 0)")
    kn = ks[len(ks) // 2]
    _show(res, "niche_patients", niche_table(a, fits, kn, imaged), f"Which patients hold each niche (K={kn}, seed 0)")
    _optional_parts(a, ks, args, smoke, fits, res)
    if "students" in args.parts:
        _student_parts(a, fits, ks, args.max_epochs, imaged, tm, res, chosen="chosen" in args.parts)
    cpu = time.process_time()
    print(f"Total run time: {(time.perf_counter() - res.t0) / 60:.1f} min wall, {cpu / 60:.1f} min CPU "
          f"({os.cpu_count()} CPU cores shared with other jobs, torch 1 thread).")
    sys.exit(res.finish(data=desc, stable_threshold=STABLE, cpu_time_s=round(cpu, 1)))


def _show(res, name: str, df: pd.DataFrame, title: str, note: str = "") -> None:
    """Print a table under its title and record it in the results file (floats to PRECISION decimals,
    seconds to whole ones)."""
    from stdistill.recipes.niches import markdown

    print(f"\n## {title}\n\n{markdown(df)}" + (f"\n\n{note}" if note else ""), flush=True)
    res.table(name, df, digits={c: 0 if c == "seconds" else PRECISION for c in df.columns
                                if pd.api.types.is_float_dtype(df[c])})


def _optional_parts(a, ks, args, smoke, fits, res) -> None:
    if "auto" in args.parts:
        curve, chosen = auto_part(a, args.members, (2, 4) if smoke else (2, 10))
        _show(res, "auto", curve, "Stability curves (seed 0)")
        _show(res, "auto_chosen", pd.DataFrame(chosen), "K chosen by stability")
    if "cellcharter" in args.parts:
        cc, note = cellcharter_part(a, ks, fits, args.cc_runs, smoke)
        print(note, flush=True)
        if cc is not None:
            _show(res, "cellcharter_curve", cc["curve"], f"CellCharter's stability curve (best K {cc['best_k']})", note)
            _show(res, "cellcharter_ari", cc["ari"], "ARI between CellCharter's clusters and our teachers (seed 0)")
        res.table("cellcharter", [{"best K": cc["best_k"] if cc else None, "note": note}])


def _student_parts(a, fits, ks, epochs, imaged, tm, res, chosen: bool) -> None:
    outer = outer_runs(a, fits, ks, epochs, imaged)
    _show(res, "students", student_table(outer), "Students against the single and the consensus teacher "
          "(leave-one-patient-out, mean over held-out patients)")
    _show(res, "shared", shared_table(outer, tm), "Teachers whose niches patients share: the student's gap to "
          "neighbourhood k-means (mean over held-out patients)")
    res.table("outer_rows", outer, digits={c: PRECISION for c in ("ari", "nmi", "id_acc")})
    if not chosen:
        return
    t0 = time.perf_counter()
    inner = inner_gaps(a, fits, ks, epochs, imaged)
    ch = chosen_per_fold(outer, inner)
    _show(res, "chosen", ch, "Teacher and K chosen on the training patients only",
          f"Mean over held-out patients: student ARI {ch['student ARI'].mean():.{PRECISION}f}, gap to neighbourhood "
          f"k-means {ch['gap'].mean():+.{PRECISION}f}; inner students {time.perf_counter() - t0:.0f} s.")
    res.table("inner_rows", inner, digits={c: PRECISION for c in ("student", "kmeans_nbr", "gap")})


if __name__ == "__main__":
    main()
