"""Niche distillation on HER2ST: leave-one-patient-out over the patients with images (A, B, C).

Teacher (transcriptome only, fitted once per K on all 36 sections, frozen) -> H&E student
(trained on the two other imaged patients, early stopping on one of them) -> two unsupervised
histology baselines (k-means on patch features; k-means on neighbourhood-averaged features) ->
ARI / NMI / niche-ID accuracy against the teacher on the held-out patient, macro-F1 on A1 against
the pathologist labels, and niche maps of held-out sections.

    python benchmarks/niches_her2st.py                       # the full run (K 4/6/8 x seeds 0/1/2)
    python benchmarks/niches_her2st.py --ks 6 --seeds 0      # one cell of the grid
    python benchmarks/niches_her2st.py --smoke --out /tmp/smoke   # every table on 30 spots of A1, B4, C2
    python benchmarks/niches_her2st.py --transfer auto --refine --teachers expression --no-investigation
        # the student's transfer setting (stain normalisation, augmented views, context token) chosen
        # on the validation patient inside each training fold, plus its refined predictions; the
        # baselines are also given each fold's chosen features (stain, context side by side)

Features: computed here with ``stdistill.features.extract(adata, "effnet-lite0-imagenet",
precision="fp32")`` (an ImageNet model, not a pathology model; fp32 on every machine, printed),
cached in the feature cache under ``$STDISTILL_CACHE`` or ``~/.cache/stdistill``; or an .h5ad
given with ``--features``. Writes ``<out>/table.md`` (every number below is printed there), per-run CSVs
and PNGs. Patient A's images are the 2000 px app copies (about 3.2 um/px): the A fold tests a
resolution shift as much as a patient shift.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import _common  # noqa: E402

KEY = "X_effnet-lite0-imagenet"
METHODS = ["student", "kmeans", "kmeans_nbr"]
#: with --refine / --transfer: the refined student, and both baselines on each fold's chosen features
EXTRA = ["student_refined", "kmeans_chosen", "kmeans_nbr_chosen"]
VIEWS = 4  # augmented views per patch for --transfer (as benchmarks/transfer_her2st.py: same cache entries)
A_NOTE = "A: images about 3.2 um/px (2000 px copies) vs 0.69 um/px for B/C: resolution shift + patient shift"


#: Feature extraction precision: fixed (not "auto"), so every machine computes the same features.
PRECISION = "fp32"
#: --smoke: student and NOLAN-like teacher settings (few epochs / steps)
SMOKE_STUDENT, SMOKE_NOLAN = {}, {}


def default_root() -> str:
    """$STDISTILL_DATA/her2st, else ``../shared/data/her2st`` (one error line, exit 2, when absent)."""
    return str(_common.dataset("her2st"))


def load(features: Path | None, root: str | None, precision: str = PRECISION, smoke: bool = False) -> ad.AnnData:
    """All 36 sections, with ``obsm[KEY]`` on the imaged spots (NaN elsewhere).

    Without ``features`` the features are computed here (``stdistill.features.extract`` at
    ``precision``; its cache under ``$STDISTILL_CACHE`` or ``~/.cache/stdistill`` makes reruns
    fast), so a clean clone needs nothing else. With ``features``, an .h5ad holding ``obsm[KEY]``
    for (some of) the HER2ST spots is used instead. ``smoke``: the slice of ``_common.her2st``.
    """
    import stdistill

    a = _common.her2st(root, smoke)
    if features is None:
        c = stdistill.io.subset_sections(a, [s for s in stdistill.io.sections(a) if stdistill.io.has_image(a, s)])
        stdistill.features.extract(c, "effnet-lite0-imagenet", precision=precision, key_added=KEY)
    else:
        c = stdistill.io.load_any(features)
        if KEY not in c.obsm:
            sys.exit(f"error: {features} has no obsm['{KEY}']")
    print(f"features: {KEY}, precision {c.uns.get('features', {}).get(KEY, {}).get('precision', 'unknown')}", flush=True)
    f = np.full((a.n_obs, c.obsm[KEY].shape[1]), np.nan, np.float32)
    pos = a.obs_names.get_indexer(c.obs_names)
    if (pos < 0).any():
        sys.exit(f"error: {features}: {(pos < 0).sum()} spots are not in the HER2ST data (other spot ids?)")
    f[pos] = np.asarray(c.obsm[KEY], dtype=np.float32)
    a.obsm[KEY] = f
    a.uns["features"] = c.uns.get("features", {})
    return a


def pm(x: pd.Series) -> str:
    x = x.dropna()
    if len(x) == 0:
        return ""
    return f"{x.mean():.3f} ± {x.std(ddof=0):.3f}" if len(x) > 1 else f"{x.mean():.3f}"


def teacher_block(a: ad.AnnData, k: int, teacher, label: str) -> tuple[str, dict]:
    """Fit the teacher on all 36 sections; diagnostics as markdown."""
    from stdistill.metrics import nmi, niche_sizes
    from stdistill.recipes.niches import TEACHER_KEY, markdown

    t0 = time.perf_counter()
    teacher.fit_predict(a, key_added=TEACHER_KEY)
    secs = time.perf_counter() - t0
    d = teacher.diagnostics(a, key=TEACHER_KEY)
    img = np.isfinite(a.obsm[KEY][:, 0])
    pats = a.obs["patient"].astype(str).to_numpy()
    nt = a.obs[TEACHER_KEY].astype(str).to_numpy()
    sizes = niche_sizes(nt[img], pats[img], categories=range(k))
    frac = sizes.div(sizes.sum(1), axis=0)
    sizes.insert(0, "patient", sizes.index)
    sizes["one niche >= 95%?"] = ["YES" if v >= 0.95 else "no" for v in frac.max(1)]
    info = {"nmi_all": d["nmi_patient"], "nmi_img": nmi(pats[img], nt[img]), "seconds": secs}
    txt = (f"Teacher {label}, K={k}: NMI(niche, patient) = {info['nmi_all']:.3f} over all 36 sections "
           f"(8 patients), {info['nmi_img']:.3f} over the imaged spots (A, B, C); fitted in {secs:.1f} s.\n"
           f"Patients with >= 95% of spots in one niche (all 8): {d['single_niche_patients'] or 'none'}.\n\n"
           f"Teacher niche sizes (spots) in each held-out patient:\n\n{markdown(sizes)}\n")
    return txt, info


def _chosen_features(a: ad.AnnData, record: dict, made: dict, store: dict) -> str:
    """``obsm`` key (on ``a``) of the features a fold's student chose (its stain normalisation onto
    the fold's reference; with context, patch and context features side by side), extracted on
    every imaged section through the feature cache; ``store`` remembers what was made."""
    import stdistill as sd

    ch = record["chosen"]
    name = (ch["stain_norm"] or "plain", record.get("stain_reference_section") if ch["stain_norm"] else None,
            record["context_um"] if ch["context"] else None)
    if name in store:
        return store[name]
    img = np.isfinite(a.obsm[KEY][:, 0])
    c = sd.io.subset_sections(a, [s for s in sd.io.sections(a) if img[a.obs["section"] == s].any()])
    kw = dict(precision=made.get("precision") or PRECISION, px=int(made["px"]), stain_norm=ch["stain_norm"],
              stain_reference=name[1])
    parts = [KEY] if ch["stain_norm"] is None else []
    if ch["stain_norm"]:
        sd.features.extract(c, made["encoder"], size_um=float(made["size_um"]), key_added="patch", **kw)
        parts.append("patch")
    if ch["context"]:
        sd.features.extract(c, made["encoder"], size_um=float(record["context_um"]), key_added="ctx", **kw)
        parts.append("ctx")
    key = "X_chosen_" + "_".join(str(x) for x in name)
    f = np.full((a.n_obs, sum(np.asarray(c.obsm[p]).shape[1] for p in parts)), np.nan, np.float32)
    f[a.obs_names.get_indexer(c.obs_names)] = np.hstack([np.asarray(c.obsm[p], dtype=np.float32) for p in parts])
    a.obsm[key] = f
    store[name] = key
    return key


def chosen_baselines(a: ad.AnnData, df: pd.DataFrame, k: int, seed: int, store: dict) -> pd.DataFrame:
    """Rows ``kmeans_chosen`` / ``kmeans_nbr_chosen``: both baselines on each fold's chosen
    features (:func:`_chosen_features`), fitted on every imaged spot like the plain baselines,
    clusters mapped to teacher niches by majority on the fold's training patients
    (``recipes.niches.score_fold``, as the recipe scores its own baselines)."""
    from stdistill.pp.neighbors import radius_for_neighbors
    from stdistill.recipes.niches import TEACHER_KEY, kmeans_niches, score_fold
    from stdistill.students import NicheStudentConfig

    made = a.uns["features"][KEY]
    img = np.isfinite(a.obsm[KEY][:, 0])
    r_nbr = radius_for_neighbors(a, NicheStudentConfig().n_neighbors, mask=img)
    teach = a.obs[TEACHER_KEY].astype(str).to_numpy()
    pats = a.obs["patient"].astype(str).to_numpy()
    rows, codes = [], {}
    for fold, rec in df.attrs["transfer"].items():
        key = _chosen_features(a, rec, made, store)
        te = img & (pats == str(df.loc[df["fold"] == fold, "test_patient"].iloc[0]))
        tr = img & ~te
        base = df[(df["fold"] == fold) & (df["method"] == "kmeans_nbr")].iloc[0]
        for name, rad in (("kmeans_chosen", None), ("kmeans_nbr_chosen", r_nbr)):
            if (key, rad) not in codes:
                codes[key, rad] = np.asarray(kmeans_niches(a, key, k, radius_um=rad, seed=seed, inplace=False)).astype(str)
            sc = score_fold(teach, codes[key, rad], tr, te, clusters=True)
            rows.append(dict(base, method=name, ari=sc["ari"], nmi=sc["nmi"], id_acc=sc["id_acc"], macro_f1=np.nan,
                             f1_section="", note=f"on the student's chosen features ({key})"))
    return pd.DataFrame(rows)


def run_grid(a, ks, seeds, out: Path, teacher_factory, label: str, student_kwargs=None, candidates=None,
             figures_seed=0, transfer=None, refine=False, resume=False) -> tuple[pd.DataFrame, list[str], dict, list[Path]]:
    from stdistill.recipes import niches
    from stdistill.recipes.niches import describe_choice

    tkw = dict(n_views=VIEWS, view_seed=0)  # the augmented views of benchmarks/transfer_her2st.py (shared cache)
    store: dict = {}

    rows, texts, infos, figs = [], [], {}, []
    for k in ks:
        txt, info = teacher_block(a, k, teacher_factory(k), label)
        texts.append(txt)
        infos[k] = info
        for seed in seeds:
            t0 = time.perf_counter()
            cell = out / f"K{k}_seed{seed}" / "rows.csv"
            if resume and cell.is_file():  # a finished cell of an earlier run with the same --out
                rows.append(pd.read_csv(cell, keep_default_na=False, na_values=[""]))
                print(f"[{label}] K={k} seed={seed}: read back {cell}", flush=True)
                continue
            df, f = niches.run(a, KEY, k, out_dir=out / f"K{k}_seed{seed}", seed=seed, reuse_teacher=True,
                               student_kwargs={**SMOKE_STUDENT, **(student_kwargs or {})} or None, student_candidates=candidates,
                               figures=seed == figures_seed, verbose=False, transfer=transfer, refine=refine,
                               transfer_kwargs=tkw if transfer else None)
            if transfer:
                records = df.attrs["transfer"]
                df = pd.concat([df, chosen_baselines(a, df, k, seed, store)], ignore_index=True)
                chosen = "; ".join(f"{f}: {describe_choice(r)}" for f, r in records.items())
                print(f"[{label}] K={k} seed={seed}: transfer chosen {chosen}", flush=True)
            df.attrs = {}  # (DataFrames in attrs break pd.concat)
            df["K"], df["seed"], df["run_s"] = k, seed, time.perf_counter() - t0
            df.to_csv(cell, index=False)
            rows.append(df)
            figs += f
            s = df[df["method"].isin(METHODS + EXTRA)].groupby("method", sort=False)["ari"].mean()
            print(f"[{label}] K={k} seed={seed}: mean ARI " + ", ".join(f"{m} {v:.3f}" for m, v in s.items())
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return pd.concat(rows, ignore_index=True), texts, infos, figs


def transfer_counts(res: pd.DataFrame) -> pd.DataFrame | None:
    """Per K and held-out patient, how often each transfer setting was chosen (from the student
    rows' notes, ``transfer {...}``); None without ``--transfer``."""
    import ast

    from stdistill.recipes.niches import describe

    st = res[(res["method"] == "student") & res["note"].astype(str).str.contains("transfer {", regex=False)]
    if st.empty:
        return None
    name = st["note"].astype(str).str.extract(r"transfer (\{[^}]*\})")[0].map(lambda d: describe(ast.literal_eval(d)))
    t = pd.crosstab([st["K"], st["fold"]], name).reset_index()
    t.columns.name = None
    return t


def tables(res: pd.DataFrame, store: dict | None = None) -> str:
    """Per fold and mean over folds (mean ± sd over seeds), macro-F1 on A1, verdict per K; each
    table also into ``store`` (name: DataFrame) when given."""
    from stdistill.recipes.niches import markdown as md_table

    out, store = [], {} if store is None else store

    def markdown(df: pd.DataFrame, name: str) -> str:
        store[name] = df
        return md_table(df)

    m = res[res["method"].isin(METHODS + EXTRA)]
    per_fold = (m.groupby(["K", "fold", "method"], sort=False)
                .agg(ARI=("ari", pm), NMI=("nmi", pm), ID_acc=("id_acc", pm), seen_share=("seen_share", "first"),
                     teacher_sizes=("teacher_sizes", "first"), one_niche=("single_niche", "first"))
                .reset_index())
    per_fold["note"] = ["A at ~3.2 um/px" if f == "A" else "" for f in per_fold["fold"]]
    out.append("Per fold (held-out patient), mean ± sd over seeds:\n\n" + markdown(per_fold, "per_fold"))
    fm = m.groupby(["K", "seed", "method"], sort=False)[["ari", "nmi", "id_acc"]].mean().reset_index()
    mean = (fm.groupby(["K", "method"], sort=False)
            .agg(ARI=("ari", pm), NMI=("nmi", pm), ID_acc=("id_acc", pm)).reset_index())
    out.append("Mean over the 3 held-out patients (mean ± sd over seeds):\n\n" + markdown(mean, "mean"))
    students = [s for s in ("student", "student_refined") if s in set(m["method"])]
    baselines = [b for b in ("kmeans", "kmeans_nbr", "kmeans_chosen", "kmeans_nbr_chosen") if b in set(m["method"])]
    verdict = []
    for k, g in fm.groupby("K"):
        v = g.groupby("method")[["ari", "nmi", "id_acc"]].mean()
        folds_win = m[(m["K"] == k)].groupby(["fold", "method"])["ari"].mean().unstack()
        for st in students:
            row = {"K": k, "student": st}
            for met in ("ari", "nmi", "id_acc"):
                row[f"> every baseline ({met})"] = "yes" if v.loc[st, met] > v.loc[baselines, met].max() else "NO"
            row["folds where ARI > every baseline"] = ",".join(
                f for f in folds_win.index if folds_win.loc[f, st] > folds_win.loc[f, baselines].max()) or "none"
            verdict.append(row)
    out.append(f"Verdict (mean over folds and seeds; baselines: {', '.join(baselines)}):\n\n"
               + markdown(pd.DataFrame(verdict), "verdict"))
    chosen = transfer_counts(res)
    if chosen is not None:
        out.append("Transfer settings the student chose on its validation patient(s) (count over seeds):\n\n"
                   + markdown(chosen, "transfer_chosen"))
    f1 = res[(res["f1_section"] == "A1")]
    if len(f1):
        t = (f1.groupby(["K", "method"], sort=False)["macro_f1"].agg(pm).reset_index()
             .rename(columns={"macro_f1": "macro-F1 on A1"}))
        t["how mapped"] = [
            "niche -> label: majority on teacher niches of the labelled non-A sections (B1, C1, D1, E1, F1, G2, H1)"
            if mth in ("teacher", "student", "student_refined") else
            ("cluster -> teacher niche (majority on training patients B, C) -> label (same map)" if mth in METHODS
             else "most frequent label of the map's training labels, everywhere")
            for mth in t["method"]]
        out.append("Macro-F1 against the pathologist labels on A1 (student trained without patient A; "
                   "'undetermined' spots left out):\n\n" + markdown(t, "macro_f1_A1"))
    return "\n\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=Path, default=None,
                    help=f"an .h5ad with obsm['{KEY}'] (default: computed here at fp32, cached under the user cache)")
    ap.add_argument("--root", default=None, help="HER2ST folder (default: $STDISTILL_DATA or the download cache)")
    ap.add_argument("--out", type=Path, default=Path("results/niches_her2st"))
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teachers", nargs="+", choices=["expression", "celltypes"], default=None,
                    help="main teachers to run (default both)")
    ap.add_argument("--no-investigation", action="store_true", help="skip the teacher/student variants at K=6")
    ap.add_argument("--transfer", default="none",
                    help="the student's transfer settings chosen per fold on its validation patient: none, auto (every "
                         "combination of macenko, views, context) or a comma list such as plain,macenko+context")
    ap.add_argument("--refine", action="store_true",
                    help="also score the student refined on each held-out section (refinement chosen on the validation patient)")
    ap.add_argument("--val-patients", choices=["smallest", "each"], default="smallest",
                    help="each: with --transfer, every training patient validates the candidates in turn (mean score)")
    ap.add_argument("--resume", action="store_true",
                    help="read back the (K, seed) cells an earlier run with the same --out finished (<out>/<teacher>/K*_seed*/rows.csv)")
    _common.add_args(ap)
    args = ap.parse_args()
    if _common.smoke(args, ks=[3], seeds=[0]):
        SMOKE_STUDENT.update(max_epochs=2, min_epochs=1)
        SMOKE_NOLAN.update(n_steps=5)
    results = _common.Results(args, seeds=args.seeds, precision=PRECISION)

    import torch

    torch.set_num_threads(1)
    from stdistill.recipes.niches import markdown, parse_transfer
    from stdistill.teachers import NicheTeacher

    t_all = time.perf_counter()
    root = args.root or default_root()
    a = load(args.features, root, smoke=args.smoke)
    print(f"HER2ST: {a.n_obs} spots, {a.obs['section'].nunique()} sections, "
          f"{int(np.isfinite(a.obsm[KEY][:, 0]).sum())} with image features", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/niches_her2st.py " + " ".join(sys.argv[1:])

    def default_teacher(k):
        return NicheTeacher(k, method="aggregate", seed=0)

    md = ["# Niche distillation on HER2ST (leave-one-patient-out over A, B, C)\n",
          f"Command: `{cmd.strip()}`  \nFeatures: `{KEY}` (ImageNet EfficientNet-Lite0, not a pathology model), "
          f"112 um patches, precision {a.uns['features'].get(KEY, {}).get('precision', 'unknown')}.  \nSeeds {args.seeds} (student and baselines; teacher seed 0).  \n{A_NOTE}.\n"]
    figs = []
    teachers = [
        ("expression", "aggregate on PCA of log-expression, per-section standardised (the default)", default_teacher),
        ("celltypes", "aggregate on stereoscope cell-type proportions (obsm['celltype_props']), per-section standardised",
         lambda k: NicheTeacher(k, feature_key="celltype_props", seed=0)),
    ]
    if args.teachers:
        teachers = [t for t in teachers if t[0] in args.teachers]
    transfer = parse_transfer(args.transfer)
    if transfer:
        md.append(f"Student transfer settings chosen per fold on the validation patient: {args.transfer} "
                  f"({VIEWS} augmented views, view seed 0; validation patients: {args.val_patients}); the baselines are "
                  "also run on each fold's chosen features (`kmeans_chosen`, `kmeans_nbr_chosen`).\n")
    for i, (name, label, factory) in enumerate(teachers, 1):
        res, ttxt, tinfo, f = run_grid(a, args.ks, args.seeds, args.out / name, factory, label, transfer=transfer,
                                       student_kwargs={"val_patients": "each"} if args.val_patients == "each" else None,
                                       refine=args.refine, resume=args.resume)
        figs += f
        store = {}
        md += [f"## {i}. Teacher: {label}\n", "### Teacher diagnostics\n", *ttxt, "### Student vs baselines\n",
               tables(res, store)]
        for tname, df in store.items():
            results.table(f"{name}_{tname}", df, digits={c: 3 for c in df.columns})
        results.markdown("\n".join(ttxt), [f"{name}_sizes_K{k}" for k in args.ks])  # teacher niche sizes per K
        nmi_k = pd.DataFrame([{"K": k, "NMI(niche, patient), 36 sections": v["nmi_all"],
                               "NMI(niche, patient), imaged spots": v["nmi_img"]} for k, v in tinfo.items()])
        results.table(f"{name}_teacher", nmi_k, digits={c: 3 for c in nmi_k.columns if c != "K"})
        res.to_csv(args.out / f"{name}.csv", index=False)

    if not args.no_investigation:
        inv = []
        k = 6 if 6 in args.ks else args.ks[0]
        variants = [
            ("teacher: nolan (self-supervised global/local views), per-section standardised",
             lambda k: NicheTeacher(k, method="nolan", seed=0, **SMOKE_NOLAN), None, None),
            ("student: radius chosen on the validation patient from {250, 450, 650} um",
             default_teacher, None, [{"radius_um": 250.0}, {"radius_um": 450.0}, {"radius_um": 650.0}]),
            ("student: temperature chosen on the validation patient from {1, 2, 4}",
             default_teacher, None, [{"temperature": 1.0}, {"temperature": 2.0}, {"temperature": 4.0}]),
            ("student: early stopping on the KD loss (not ARI)",
             default_teacher, {"monitor": "val_loss"}, None),
        ]
        for label, tf, skw, cand in variants:
            r, tt, ti, _ = run_grid(a, [k], [args.seeds[0]], args.out / "investigation" / label.split(":")[0],
                                    tf, label, student_kwargs=skw, candidates=cand, figures_seed=-1)
            m = r[r["method"].isin(METHODS)]
            s = m.groupby("method", sort=False)[["ari", "nmi", "id_acc"]].mean()
            per = m.pivot_table(index="method", columns="fold", values="ari", sort=False)
            st = r[r["method"] == "student"]
            chosen = "; ".join(f"{f}: {n.split('chose ')[-1]}" for f, n in zip(st["fold"], st["note"]) if "chose" in n)
            inv.append({"variant": label, "teacher NMI(niche, patient)": ti[k]["nmi_all"],
                        **{f"ARI {mth}": s.loc[mth, "ari"] for mth in METHODS},
                        **{f"ID-acc {mth}": s.loc[mth, "id_acc"] for mth in METHODS},
                        "student ARI per fold A/B/C": "/".join(f"{per.loc['student', f]:.2f}" for f in per.columns),
                        "chosen per fold": chosen})
            r.to_csv(args.out / f"investigation_{len(inv)}.csv", index=False)
        md += [f"## Investigation (teacher: the default unless named; K={k}, seed {args.seeds[0]}; student settings "
               "chosen only on the validation patient inside each training fold)\n", markdown(pd.DataFrame(inv))]
        results.table("investigation", pd.DataFrame(inv), digits={c: 3 for c in pd.DataFrame(inv).columns})

    total = time.perf_counter() - t_all
    md += ["## Figures\n", *[f"- `{p}`" for p in figs],
           f"\nTotal run time: {total / 60:.1f} min on {os.cpu_count()} CPU cores (torch 1 thread).\n"]
    (args.out / "table.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"\nwrote {args.out / 'table.md'}")
    return results.finish()


if __name__ == "__main__":
    sys.exit(main())
