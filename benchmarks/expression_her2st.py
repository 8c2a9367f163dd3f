"""HER2ST expression benchmark: frozen-feature HEST ridge vs PEKA, leave-one-patient-out.

Imaged HER2ST sections: patient A (A1, A2: 2000 px app copies, ~3.2 um/px), B (B4) and C
(C2-C5) (both ~0.69 um/px). Three folds, each holding out one patient. Encoder: the offline
default ``effnet-lite0-imagenet`` (an ImageNet model, not a pathology model). Per fold:

1. targets: 50 genes chosen HEST's way on the fold's training sections (imaged); ERBB2 is also
   reported (not one of the 50 in any fold, so reported beside the score, not in it);
2. teacher: :class:`ExpressionTeacher` (PCA of log-normalised counts, per-section standardised)
   fitted on **all** HER2ST sections of the training patients (with or without image);
3. baseline: frozen encoder features -> HEST probe (StandardScaler -> PCA(256) -> ridge);
4. PEKA (and ablations): learning rate, KD weight, adapter rank and epochs chosen on validation
   patients inside the training patients (each training patient in turn validates a model trained
   on the other, with its own inner genes and inner teacher; the HEST probe's Pearson r on the
   validation patient after each epoch, epoch 0 = frozen, averaged over the two inner splits, is
   the criterion). MiSS chooses (lr, w_kd, rank, epochs) over the whole grid (``peka_miss``; w_kd = 0
   is in the grid) and over its KD-on part (``peka_miss_kd``: PEKA as published); the no-KD / no-SA
   ablations take ``peka_miss_kd``'s settings with one loss removed; LoRA chooses (lr, rank,
   epochs) with ``peka_miss_kd``'s w_kd. Then each is trained on all training patients for the
   chosen number of epochs, for each seed; adapted features -> the same HEST probe (and the
   alpha-by-inner-CV probe) -> Pearson on the test patient. Identical settings are trained once.

Stain normalisation (``--stain``, default ``auto``): per fold, Macenko normalisation of the patches
onto the fold's first imaged training section (``PekaConfig(stain_norm="macenko")``) or none, chosen
on the training patients only: the frozen features' HEST probe is scored both ways in
leave-one-patient-out folds inside the fold's training patients (``bench.expression`` with feature
candidates) and the better one is used by the frozen baseline ``frozen_ridge_stain`` and by every
PEKA variant of that fold (their settings selection included). ``frozen_ridge`` (raw patches) stays
the protocol's baseline; ``--stain none`` reproduces the runs before stain normalisation.

Speed-ups (2-core CPU): the frozen part of the encoder up to the last block's depthwise
convolution runs once per patch and is cached (``trunk_activations``); training samples 16 of
the 49 positions of the cached 7x7 map per patch (``train_positions``); PCA uses an exact
eigen-solver (``svd_solver="covariance_eigh"``) for every probe in this script (the HEST
default randomized solver is also printed for the baseline).

Usage::

    python benchmarks/expression_her2st.py --root ../shared/data/her2st --out results/expression_her2st

Writes ``results.csv`` (one row per fold x method x seed), ``table.md`` (the docs table),
``selection.csv``, ``per_gene.csv`` and the ERBB2 map (``erbb2_<section>.png``).

``--dataset simulated`` runs the same protocol on ``stdistill.datasets.simulated`` (6 sections,
3 patients), a control where image and expression share a known cause. ``--smoke``: every row on
the first fold of 3 small simulated sections, one seed, one epoch, a small grid (``--out`` only).

Results file: ``docs/results/expression_her2st[-simulated].json`` (the printed tables).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

import _common

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import stdistill as sd
from stdistill.adapters import Tail, parse_cut, stain_reference, trunk_activations
from stdistill.recipes import PEKA, PekaConfig, choose_peka, select_peka
from stdistill.teachers import ExpressionTeacher
from stdistill.teachers.expression import teacher_targets

VARIANTS = {  # "from": whose chosen settings (lr, w_kd, rank, epochs) the variant uses
    "peka_miss": {"adapter": "miss", "from": "miss"},
    "peka_miss_kd": {"adapter": "miss", "from": "miss_kd"},
    "no_kd": {"adapter": "miss", "w_kd": 0.0, "from": "miss_kd"},
    "no_sa": {"adapter": "miss", "w_sa": 0.0, "from": "miss_kd"},
    "peka_lora": {"adapter": "lora", "from": "lora"},
}
RES_NOTE = {"A": "A1/A2 at ~3.2 um/px (2000 px app copies): resolution shift + patient shift"}


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


def frozen_features(adata, cfg: PekaConfig, stain=None) -> np.ndarray:
    """Frozen encoder features through the same cached trunk + tail as PEKA (fp32 tail); ``stain``:
    a :class:`~stdistill.pp.StainNormalizer` the patches are normalised onto first."""
    import torch

    enc = sd.encoders.load("effnet-lite0-imagenet")
    H = trunk_activations(enc, adata, cfg, stain=stain)
    tail = Tail(enc, parse_cut(enc.backbone, cfg.train_from)).eval()
    with torch.no_grad():
        return torch.cat([tail(H[i:i + 256, 0].float()) for i in range(0, len(H), 256)]).numpy()


def fold_teacher(full, tr, tr_pats: list[str], n_components: int, n_clusters: int, seeds) -> tuple[np.ndarray, dict]:
    """The expression teacher of one fold, fitted on **all** sections (with or without image) of the
    training patients ``tr_pats``: (teacher embeddings of the imaged training spots ``tr``,
    {seed: KD classifier (W, b) from k-means with ``n_clusters`` on the teacher embeddings})."""
    full_tr = full[full.obs["patient"].astype(str).isin(tr_pats).to_numpy()].copy()
    teacher = ExpressionTeacher("pca", n_components=n_components).fit(full_tr)
    ref = teacher.transform(full_tr)
    return teacher.transform(tr), {seed: teacher_targets(ref, n_clusters=n_clusters, seed=seed)[:2] for seed in seeds}


def choose_stain(img, fold, genes, cfg: PekaConfig, tr, mode: str, map_gene: str,
                 solver: str = "covariance_eigh") -> tuple[str | None, str, dict]:
    """The fold's stain normalisation (None or ``"macenko"``), the frozen stain-normalised key
    written to ``img.obsm`` and, with ``mode="auto"``, each option's mean Pearson on the
    leave-one-patient-out folds inside the training patients (``bench.expression`` candidates)."""
    if mode == "none":
        return None, "X_frozen", {}
    norm, ref = stain_reference(tr, replace(cfg, stain_norm="macenko"))
    key = f"X_frozen_macenko_{ref}"
    if key not in img.obsm:
        img.obsm[key] = frozen_features(img, cfg, stain=norm)
    if mode == "macenko":
        return "macenko", key, {}
    res = sd.bench.expression(img, {"none": "X_frozen", "macenko": key}, folds=[fold], genes=genes,
                              extra_genes=[map_gene], svd_solver=solver, key_added=None)
    chosen = str(res.per_fold["chosen"].iloc[0])
    inner = {c: float(v) for c, v in res.selection.iloc[0].items()}
    return (None if chosen == "none" else "macenko"), key, inner


def main() -> int:
    warnings.filterwarnings("ignore")  # script only: not at import (other benchmarks import from here)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/expression_her2st")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--lr-miss", type=float, nargs="+", default=[3e-5, 1e-4], help="MiSS learning rates tried")
    ap.add_argument("--lr-lora", type=float, nargs="+", default=[3e-4, 1e-3], help="LoRA learning rates tried")
    ap.add_argument("--w-kd", type=float, nargs="+", default=[0.0, 0.1, 1.0],
                    help="KD loss weights tried in the MiSS selection (the best KD-on one is reused by LoRA)")
    ap.add_argument("--rank-miss", type=int, nargs="+", default=[32, 128], help="MiSS ranks tried (128: ~6%% trainable)")
    ap.add_argument("--rank-lora", type=int, nargs="+", default=[16, 64], help="LoRA ranks tried (64: ~6%% trainable)")
    ap.add_argument("--max-epochs", type=int, default=4, help="upper bound for early stopping on the inner validation patient")
    ap.add_argument("--train-positions", type=int, default=16)
    ap.add_argument("--head-ridge", type=float, default=10.0)
    ap.add_argument("--n-components", type=int, default=32, help="teacher embedding width")
    ap.add_argument("--map-gene", default=None, help="gene reported beside the score and mapped (default: ERBB2; "
                    "simulated: the first tumour_A marker)")
    ap.add_argument("--dataset", choices=["her2st", "simulated"], default="her2st",
                    help="simulated: a control where image and expression share a known cause (6 sections, 3 patients)")
    ap.add_argument("--data-seed", type=int, default=0, help="simulated data seed")
    ap.add_argument("--stain", choices=["auto", "none", "macenko"], default="auto",
                    help="stain normalisation of the patches (frozen baseline frozen_ridge_stain and PEKA): auto = "
                         "chosen per fold inside the training patients; macenko onto the fold's first imaged training section")
    ap.add_argument("--from-csv", action="store_true",
                    help="only re-print the tables from --out's results.csv and selection.csv (no training)")
    ap.add_argument("--svd-solver", default="covariance_eigh", choices=["covariance_eigh", "full"], help="PCA solver of every HEST probe here (exact either way; --smoke: full, cheaper for a few dozen spots)")
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    _common.smoke(args, dataset="simulated", seeds=[0], lr_miss=[1e-4], lr_lora=[1e-3], w_kd=[0.0, 0.1],
                  rank_miss=[8], rank_lora=[4], max_epochs=1, n_components=8, svd_solver="full")
    t0 = time.time()
    if args.from_csv:
        res, sel = pd.read_csv(Path(args.out) / "results.csv"), pd.read_csv(Path(args.out) / "selection.csv")
        if args.dataset != "her2st":
            RES_NOTE.clear()
        gene = args.map_gene or ("ERBB2" if args.dataset == "her2st" else "the map gene")
        stain_csv = Path(args.out) / "stain.csv"
        stain_tab = stain_summary(pd.read_csv(stain_csv)) if stain_csv.is_file() else ""
        print(summarise(res.rename(columns={"r_ERBB2": "r_map"}), sel, gene) + "\n" + stain_tab + "\n" + grid_summary(sel))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1 if args.smoke else max(1, os.cpu_count() or 1))

    results = _common.Results(args, seeds=args.seeds, precision="fp32",
                              variant=None if args.dataset == "her2st" else args.dataset)
    if args.dataset == "her2st":
        full = sd.datasets.her2st(root=_common.dataset("her2st", args.root))
    else:  # the simulated control: image and expression share a known cause (cell-type mixtures)
        full = (_common.simulated_small(args.data_seed) if args.smoke else
                sd.datasets.simulated(n_sections=6, n_patients=3, seed=args.data_seed))
        RES_NOTE.clear()
    if args.map_gene is None:
        tumour = full.var_names[full.var.get("marker_of", pd.Series(index=full.var_names, dtype=str)) == "tumour_A"]
        args.map_gene = "ERBB2" if args.dataset == "her2st" else str(tumour[0])
    img_secs = [s for s in sd.io.sections(full) if sd.io.has_image(full, s)]
    img = sd.io.subset_sections(full, img_secs)
    log(f"{args.dataset}: {full.n_obs} spots in {len(sd.io.sections(full))} sections; imaged {img_secs} ({img.n_obs} spots)", t0)

    base_cfg = PekaConfig(max_epochs=args.max_epochs, patience=2, train_positions=args.train_positions,
                          head_ridge=args.head_ridge)
    t_trunk = time.time()
    img.obsm["X_frozen"] = frozen_features(img, base_cfg)
    log(f"trunk cache + frozen features: {time.time() - t_trunk:.1f}s", t0)
    # the same encoder through stdistill.features.extract (precision "auto": fp32 on CPUs, named in the row)
    sd.features.extract(img, "effnet-lite0-imagenet", key_added="X_extract")
    extract_precision = img.uns["features"]["X_extract"].get("precision")
    log(f"features.extract (precision {extract_precision}): done", t0)

    folds = sd.pp.folds(img)[:1] if args.smoke else sd.pp.folds(img)  # --smoke: the first fold (every row)
    map_patient = "B" if args.dataset == "her2st" else folds[0].patients_of("test")[0]
    rows, sel_rows, stain_rows, per_gene_tables = [], [], [], {}
    map_done = False
    for fold in folds:
        test_p = fold.patients_of("test")[0]
        train_secs = list(fold.train)
        genes = sd.pp.hest_genes(img, 50, sections=train_secs)
        tr_pats = fold.patients_of("train")
        tr = sd.io.subset_sections(img, train_secs)
        T, kd = fold_teacher(full, tr, tr_pats, args.n_components, base_cfg.n_clusters, set(args.seeds) | {0})
        n_teach = int(full.obs["patient"].astype(str).isin(tr_pats).sum())
        log(f"fold {fold.name}: train {tr_pats} ({tr.n_obs} imaged spots; teacher on {n_teach} spots), test {test_p}", t0)

        def bench(key: str, solver: str = args.svd_solver, alpha="hest", clip=False):
            return sd.bench.expression(img, key, folds=[fold], genes=genes, extra_genes=[args.map_gene],
                                       svd_solver=solver, alpha=alpha, clip=clip, key_added=None)

        def frozen_row(name: str, key: str, solver: str = args.svd_solver, stain_name: str = "none", res=None):
            """One frozen-feature row (three probes) appended to ``rows``; returns the HEST probe's result."""
            res = res if res is not None else bench(key, solver)
            cv = bench(key, solver, alpha="cv")
            rows.append({"fold": test_p, "method": name, "seed": -1, "pearson": res.mean, "pearson_alpha_cv": cv.mean,
                         "pearson_clip": bench(key, solver, clip=True).mean,
                         "r_map": float(res.per_fold[f"r_{args.map_gene}"].iloc[0]), "share": 0.0, "epochs": 0,
                         "seconds": 0.0, "lr": np.nan, "stain": stain_name})
            log(f"  {name} ({stain_name}): {res.mean:.4f} (alpha cv: {cv.mean:.4f}), {args.map_gene} r={rows[-1]['r_map']:.3f}", t0)
            return res

        b = frozen_row("frozen_ridge", "X_frozen")
        frozen_row("frozen_ridge_hest_randomized_pca", "X_frozen", "auto")
        frozen_row(f"frozen_ridge_extract_{extract_precision}", "X_extract")
        per_gene_tables[("frozen_ridge", test_p)] = b.per_gene[test_p]

        # ---- stain normalisation of this fold (chosen inside the training patients with --stain auto)
        stain, skey, inner_stain = choose_stain(img, fold, genes, base_cfg, tr, args.stain, args.map_gene, args.svd_solver)
        stain_rows.append({"fold": test_p, "stain": stain or "none", "key": skey,
                           **{f"inner_{c}": v for c, v in inner_stain.items()}})
        log(f"  stain: {stain or 'none'}" + (f" (inner mean Pearson {inner_stain})" if inner_stain else ""), t0)
        if args.stain != "none":
            bs = frozen_row("frozen_ridge_stain", skey if stain else "X_frozen", stain_name=stain or "none",
                            res=None if stain else b)
            per_gene_tables[("frozen_ridge_stain", test_p)] = bs.per_gene[test_p]

        # ---- choose settings on validation patients inside the training patients (select_peka): each
        # training patient in turn validates a model trained on the other(s); validation curves
        # (HEST-probe Pearson per epoch, epoch 0 = frozen) are averaged over the inner splits and the
        # best (setting, epoch) wins. Inner genes and the inner teacher never see the validation patient.
        inner_cache = {}

        def inner_parts(inner_tr, val_p):
            if val_p not in inner_cache:
                keep = full.obs["patient"].astype(str)
                full_in = full[((keep != val_p) & keep.isin(tr_pats)).to_numpy()].copy()
                teacher_in = ExpressionTeacher("pca", n_components=args.n_components).fit(full_in)
                kd_in = teacher_targets(teacher_in.transform(full_in), n_clusters=base_cfg.n_clusters, seed=0)[:2]
                inner_cache[val_p] = {"teacher": teacher_in.transform(inner_tr), "genes": sd.pp.hest_genes(inner_tr, 50),
                                      "kd_classifier": kd_in}
            return inner_cache[val_p]

        # MiSS chooses (lr, w_kd, rank, epochs); LoRA (lr, rank, epochs) with the KD-on MiSS choice's
        # w_kd. "miss_kd" is the best MiSS setting with KD switched on (PEKA as published), "miss" the
        # best over the whole grid (w_kd = 0 included).
        grids = {"miss": [{"lr": lr, "w_kd": w, "rank": r} for lr in args.lr_miss for w in args.w_kd for r in args.rank_miss],
                 "lora": [{"lr": lr, "rank": r} for lr in args.lr_lora for r in args.rank_lora]}
        sel_base = replace(base_cfg, seed=0, stain_norm=stain)  # reference: each (inner) training set's first section
        chosen = {}
        for family in ("miss", "lora"):
            if not any(VARIANTS[v]["adapter"] == family for v in args.variants):
                continue
            w_kd = chosen["miss_kd"].w_kd if "miss_kd" in chosen else 1.0
            grid = [{"adapter": family, "w_kd": w_kd, **g} for g in grids[family]]
            table = select_peka(tr, T, genes, grid, base=sel_base, inner=inner_parts).table
            for r in table.itertuples():
                g = grid[r.candidate]
                sel_rows.append({"fold": test_p, "adapter": family, "lr": g["lr"], "w_kd": g["w_kd"], "rank": g["rank"],
                                 "val": r.split, "curve": " ".join(f"{x:.4f}" for x in r.curve), "seconds": r.seconds})
                log(f"  select {family} lr={g['lr']:g} w_kd={g['w_kd']:g} rank={g['rank']} val {r.split}: "
                    f"{sel_rows[-1]['curve']} [{r.seconds:.0f}s]", t0)
            for name, where in ((family, None), (f"{family}_kd", lambda g: g["w_kd"] > 0)):
                if name == "lora_kd" or (where and not any(map(where, grid))):
                    continue
                c = choose_peka(table, grid, sel_base, where=where)
                ci = grid.index({k: getattr(c, k) for k in grid[0]})
                curves = list(table.loc[table["candidate"] == ci, "curve"])
                val_r = float(np.mean([x[c.max_epochs] for x in curves]))
                chosen[name] = c
                log(f"  chosen {name}: lr={c.lr:g}, w_kd={c.w_kd:g}, rank={c.r}, epochs={c.max_epochs} "
                    f"(mean val r {val_r:.4f}; frozen {np.mean([x[0] for x in curves]):.4f})", t0)
                sel_rows.append({"fold": test_p, "adapter": name, "lr": c.lr, "w_kd": c.w_kd, "rank": c.r, "val": "chosen",
                                 "curve": f"{val_r:.4f}", "seconds": 0.0, "epochs": c.max_epochs})
        # ---- final models (identical settings are trained once and their rows reused)
        done = {}
        for v in args.variants:
            upd = dict(VARIANTS[v])
            ch = chosen[upd.pop("from")]
            for seed in args.seeds:
                cfg = replace(ch, **upd, patience=base_cfg.patience, seed=seed)
                key, cfg_id = f"X_{v}_s{seed}", repr(cfg)
                if cfg_id in done:
                    rows.append({**done[cfg_id], "method": v})
                    per_gene_tables[(f"{v}_s{seed}", test_p)] = per_gene_tables[done[cfg_id]["_pg"]]
                    log(f"  {v} seed {seed}: same settings as {done[cfg_id]['method']}, reused", t0)
                    continue
                m = PEKA("effnet-lite0-imagenet", cfg).fit(tr, T, genes, kd_classifier=kd[seed])
                m.transform(img, key_added=key)
                r = bench(key)
                r_cv = bench(key, alpha="cv")
                rows.append({"fold": test_p, "method": v, "seed": seed, "pearson": r.mean, "pearson_alpha_cv": r_cv.mean,
                             "pearson_clip": bench(key, clip=True).mean,
                             "r_map": float(r.per_fold[f"r_{args.map_gene}"].iloc[0]), "share": m.trainable_share,
                             "epochs": cfg.max_epochs, "seconds": round(m.fit_seconds_, 1), "lr": cfg.lr, "w_kd": cfg.w_kd,
                             "w_sa": cfg.w_sa, "rank": cfg.r, "stain": stain or "none", "_pg": (f"{v}_s{seed}", test_p)})
                done[cfg_id] = rows[-1]
                per_gene_tables[(f"{v}_s{seed}", test_p)] = r.per_gene[test_p]
                log(f"  {v} seed {seed}: {r.mean:.4f} (alpha cv {r_cv.mean:.4f}) {args.map_gene} r={rows[-1]['r_map']:.3f} "
                    f"(lr {cfg.lr:g}, w_kd {cfg.w_kd:g}, w_sa {cfg.w_sa:g}, rank {cfg.r}, {cfg.max_epochs} ep, "
                    f"share {m.trainable_share:.2%}, {m.fit_seconds_:.0f}s)", t0)
                if v == "peka_miss" and seed == args.seeds[0] and not map_done and test_p == map_patient:
                    sec = fold.test[0]
                    sd.pl.expression_maps(
                        img, args.map_gene,
                        {"frozen ridge": b.predictions[test_p][args.map_gene], "PEKA (MiSS) ridge": r.predictions[test_p][args.map_gene]},
                        section=sec, path=out / f"{args.map_gene.lower()}_{sec}.png",
                        title=f"{args.map_gene} on held-out section {sec} (patient {test_p}): measured vs predicted")
                    map_done = True
                img.obsm.pop(key)

    res = pd.DataFrame(rows).drop(columns="_pg", errors="ignore")
    res.to_csv(out / "results.csv", index=False)
    pd.DataFrame(sel_rows).to_csv(out / "selection.csv", index=False)
    pd.DataFrame(stain_rows).to_csv(out / "stain.csv", index=False)
    pd.DataFrame({f"{k[0]}|{k[1]}": v for k, v in per_gene_tables.items()}).to_csv(out / "per_gene.csv")
    parts = {("main", "chosen"): summarise(res, pd.DataFrame(sel_rows), args.map_gene),
             ("stain",): stain_summary(pd.DataFrame(stain_rows)), ("grid",): grid_summary(pd.DataFrame(sel_rows))}
    for names, text in parts.items():
        results.markdown(text, list(names))
    table = "\n".join(parts.values())
    (out / "table.md").write_text(table)
    print(table)
    print(pd.DataFrame(sel_rows).to_string(index=False))
    log(f"total {time.time() - t0:.0f}s; outputs in {out}", t0)
    return results.finish()


def stain_summary(st: pd.DataFrame) -> str:
    """Markdown: the stain normalisation of each fold and, when chosen (``--stain auto``), each
    option's mean Pearson on the leave-one-patient-out folds inside the training patients."""
    if st.empty:
        return ""
    inner = [c for c in st.columns if c.startswith("inner_")]
    lines = ["Stain normalisation per fold (PEKA and frozen_ridge_stain)" + (
        ": chosen by the frozen HEST probe's mean Pearson on leave-one-patient-out folds inside the training "
        "patients" if inner else "") + ":", "",
        "| fold | stain | " + " | ".join(f"inner r ({c[6:]})" for c in inner) + " |", "|---" * (2 + len(inner)) + "|"]
    lines += [f"| {r.fold} | {r.stain} | " + " | ".join(f"{getattr(r, c):.4f}" for c in inner) + " |" for r in st.itertuples()]
    return "\n".join(lines) + "\n"


def grid_summary(sel: pd.DataFrame) -> str:
    """Markdown: per fold, the MiSS grid's best mean validation r (over the inner splits, best epoch)
    by KD weight, by rank and by learning rate, next to the frozen encoder's (epoch 0)."""
    d = sel[(sel["adapter"] == "miss") & (sel["val"] != "chosen")].copy()
    if d.empty:
        return ""
    d["curve"] = d["curve"].map(lambda c: np.array([float(x) for x in str(c).split()]))
    lines = ["Inner validation, MiSS grid: best mean validation r (mean over the inner splits, best epoch) "
             "for each value of one setting, the others free; `frozen` = epoch 0:", "",
             "| fold | frozen | " + " | ".join(
                 [f"w_kd={w:g}" for w in sorted(d["w_kd"].unique())] + [f"rank={r}" for r in sorted(d["rank"].unique())]
                 + [f"lr={lr:g}" for lr in sorted(d["lr"].unique())]) + " |"]
    lines.append("|---" * (2 + d["w_kd"].nunique() + d["rank"].nunique() + d["lr"].nunique()) + "|")
    for fold, f in d.groupby("fold", sort=False):
        mean = f.groupby(["lr", "w_kd", "rank"])["curve"].apply(lambda cs: np.mean(np.stack([c[: min(map(len, cs))] for c in cs]), 0))
        best = mean.map(np.max)
        frozen = float(mean.iloc[0][0])
        cells = [f"{best[best.index.get_level_values(k) == v].max():.4f}"
                 for k in ("w_kd", "rank", "lr") for v in sorted(d[k].unique())]
        lines.append(f"| {fold} | {frozen:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise(res: pd.DataFrame, sel: pd.DataFrame | None = None, map_gene: str = "ERBB2") -> str:
    """Markdown: per fold (mean +- std over seeds), mean +- std over folds, gain over the baseline;
    then the settings chosen on the inner validation patients (from ``sel``)."""
    methods = list(dict.fromkeys(res["method"]))
    folds = list(dict.fromkeys(res["fold"]))
    base = res[res["method"] == "frozen_ridge"].set_index("fold")["pearson"]
    base_stain = res[res["method"] == "frozen_ridge_stain"].set_index("fold")["pearson"]
    lines = ["| method | " + " | ".join(f"{f}{' *' if f in RES_NOTE else ''}" for f in folds)
             + f" | mean +- std over folds | gain vs frozen | vs frozen_ridge_stain (same stain) | {map_gene} r (mean over folds) | alpha=cv probe: mean over folds (gain) "
             "| clipped probe: mean over folds (gain) | trainable | train s/run |",
             "|---" * (len(folds) + 9) + "|"]
    base_cv = res[res["method"] == "frozen_ridge"]["pearson_alpha_cv"].mean()
    base_clip = res[res["method"] == "frozen_ridge"]["pearson_clip"].mean() if "pearson_clip" in res else np.nan
    for m in methods:
        d = res[res["method"] == m]
        cells = []
        per_fold_means = []
        for f in folds:
            x = d[d["fold"] == f]["pearson"]
            per_fold_means.append(x.mean())
            cells.append(f"{x.mean():.4f}" + (f" +- {x.std(ddof=0):.4f}" if len(x) > 1 else ""))
        # mean over folds per seed, then mean +- std over seeds (seeds paired across folds)
        if d["seed"].max() >= 0:
            by_seed = d.groupby("seed")["pearson"].mean()
            overall = f"{by_seed.mean():.4f} +- {by_seed.std(ddof=0):.4f} (seeds); folds: {np.mean(per_fold_means):.4f} +- {np.std(per_fold_means):.4f}"
        else:
            overall = f"{np.mean(per_fold_means):.4f} +- {np.std(per_fold_means):.4f}"
        gain = (np.mean(per_fold_means) - base.mean()) / base.mean() * 100
        same = (f"{np.mean([x - base_stain[f] for x, f in zip(per_fold_means, folds)]):+.4f}"
                if set(folds) <= set(base_stain.index) else "")
        erbb2 = d.groupby("fold")["r_map"].mean().mean()
        cvm = d.groupby("fold")["pearson_alpha_cv"].mean().mean()
        clm = d.groupby("fold")["pearson_clip"].mean().mean() if "pearson_clip" in d else np.nan
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {overall} | {gain:+.1f}% | {same} | {erbb2:.3f} | "
                     f"{cvm:.4f} ({(cvm - base_cv) / base_cv * 100:+.1f}%) | "
                     f"{clm:.4f} ({(clm - base_clip) / base_clip * 100:+.1f}%) | "
                     f"{d['share'].mean():.2%} | {d['seconds'].mean():.0f} |")
    lines.append("")
    lines.append("Pearson r: mean over the 50 genes on the held-out patient (HEST probe, exact PCA); per fold mean +- std over "
                 "seeds. Clipped probe: the HEST probe with test features clipped to their training range. " + " ".join(f"* {k}: {v}." for k, v in RES_NOTE.items()))
    if sel is not None and len(sel):
        ch = sel[sel["val"] == "chosen"]
        lines += ["", "Settings chosen on the inner validation patients (mean validation r at the chosen epoch):", "",
                  "| fold | setting | lr | w_kd | rank | epochs | val r |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.fold} | {r.adapter} | {r.lr:g} | {r.w_kd:g} | {int(r['rank'])} | {int(r.epochs)} | {r.curve} |"
                  for _, r in ch.iterrows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
