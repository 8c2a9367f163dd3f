"""STAMP benchmark in four tiers: frozen encoder vs pathway-aligned encoder, leave-one-patient-out.

Encoder: the offline default ``effnet-lite0-imagenet`` (ImageNet, not a pathology model), with
STAMP's adapter after the default cut and the shared cached trunk (``stdistill.adapters``).
Pathway activities: MSigDB Hallmark (50 sets), decoupler's ULM per spot on CP10k + log1p,
standardised within each section (patient effects dominate); a per-spot statistic, so no test
spot informs any training target.

Per fold (one patient held out), on the training patients only:

* STAMP settings (contrastive weight ``w_con`` incl. 0, adapter rank, epochs 0-4) are chosen by
  :func:`stdistill.recipes.select_stamp`: each training patient in turn validates a model trained
  on the other(s); the HEST probe's mean Pearson over pathways on the validation patient after each
  epoch (epoch 0 = frozen), averaged over the inner splits, is the criterion. ``stamp`` is the best
  of the whole grid, ``stamp_con`` the best with the contrastive term on (STAMP as published).
* Each is then trained on all training patients for each seed; the frozen encoder is the baseline.

Tiers (held-out patient):

1. pathway activity: per-pathway Pearson of the HEST probe (StandardScaler -> PCA(256) -> ridge)
   fitted on training spots, on frozen vs STAMP features; also STAMP's own head and the clipped probe;
2. genes: ``bench.expression`` (HEST protocol: 50 HVGs chosen on the training sections) on the same
   features, with ERBB2 (simulated: the first tumour_A marker);
3. downstream probes that never saw the alignment targets: the niche teacher's niches
   (``NicheTeacher``, K=6, fitted on all sections of the training patients), niche-ID accuracy of a
   logistic-regression probe on the features (HER2ST); the pathologist-like label, macro-F1
   (simulated; HER2ST's imaged sections have pathologist labels on A1 only, so no patient-level probe);
4. simulated data with planted programmes: gene sets = the cell types' marker genes
   (``var["marker_of"]``); Pearson between the predicted programme activity and the planted cell-type
   proportion, per cell type (ground truth the model never saw).

Usage::

    python benchmarks/pathways_her2st.py --root ../shared/data/her2st --out results/pathways_her2st
    python benchmarks/pathways_her2st.py --from-csv --out results/pathways_her2st   # tables only
    python benchmarks/pathways_her2st.py --smoke --out /tmp/smoke   # small simulated data (and a HER2ST slice
                                                                    # where present): first fold, 1 seed, 1 epoch, rank 8

Runs HER2ST (tiers 1-3) then the simulated data (tiers 1-4; ``--dataset`` picks one) and writes
``<out>/<dataset>/results.csv`` (fold x method x seed), ``per_pathway.csv``, ``selection.csv`` and
``<out>/table.md``; prints all tiers in one table, then each dataset's tables, and the run time.
fp32 throughout (``precision`` is printed).
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

import stdistill as sd  # noqa: E402
from stdistill.adapters import Tail, parse_cut, trunk_activations  # noqa: E402
from stdistill.bench import HestRidge  # noqa: E402
from stdistill.metrics import pearson_per_gene  # noqa: E402
from stdistill.recipes import STAMP, StampConfig, select_stamp  # noqa: E402
from stdistill.select import choose  # noqa: E402

ENCODER = "effnet-lite0-imagenet"
RES_NOTE = {"A": "A1/A2 at ~3.2 um/px (2000 px app copies): resolution shift + patient shift"}


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


# ================================================================================ data
def load(args) -> tuple:
    """(all sections with counts, imaged spots with pathway scores, map gene)."""
    if args.dataset == "her2st":
        full = _common.her2st(args.root, args.smoke)
        img = sd.io.subset_sections(full, [s for s in sd.io.sections(full) if sd.io.has_image(full, s)])
        sd.pp.pathway_scores(img, "hallmark", method="ulm", standardize="section")
        return full, img, "ERBB2"
    full = (_common.simulated_small(args.data_seed) if args.smoke else
            sd.datasets.simulated(n_sections=6, n_patients=3, seed=args.data_seed))
    marker = full.var["marker_of"].astype(str)
    sets = pd.DataFrame({"source": marker.to_numpy(), "target": full.var_names, "weight": 1.0})
    sets = sets[sets["source"].isin(full.obsm["celltype_props"].columns)]  # the cell types' own programmes
    sd.pp.pathway_scores(full, sets, method="ulm", standardize="section")
    return full, full, str(full.var_names[marker == "tumour_A"][0])


def frozen_features(adata, cfg: StampConfig) -> np.ndarray:
    """The frozen encoder's features through the same cached trunk + tail as STAMP (fp32)."""
    import torch

    enc = sd.encoders.load(ENCODER)
    H = trunk_activations(enc, adata, cfg)
    tail = Tail(enc, parse_cut(enc.backbone, cfg.train_from)).eval()
    with torch.no_grad():
        return torch.cat([tail(H[i:i + 256, 0].float()) for i in range(0, len(H), 256)]).numpy()


# ================================================================================ tiers
def tier1(img, key: str, tr: np.ndarray, te: np.ndarray, pred: pd.DataFrame | None = None) -> dict:
    """Per-pathway Pearson on the test spots: HEST probe, clipped probe, STAMP's head (if ``pred``)."""
    Y = img.obsm["pathway_scores"]
    X = np.asarray(img.obsm[key])
    out = {}
    for name, clip in (("probe", False), ("probe_clip", True)):
        probe = HestRidge(svd_solver="covariance_eigh", clip=clip).fit(X[tr], Y.to_numpy()[tr])
        out[name] = pearson_per_gene(Y.to_numpy()[te], probe.predict(X[te]))
        out[name].index = Y.columns
    if pred is not None:
        out["head"] = pearson_per_gene(Y.to_numpy()[te], pred.to_numpy()[te])
        out["head"].index = Y.columns
    return out


def tier2(img, key: str, fold, genes, map_gene: str) -> dict:
    r = sd.bench.expression(img, key, folds=[fold], genes=genes, extra_genes=[map_gene], svd_solver="covariance_eigh",
                            key_added=None)
    c = sd.bench.expression(img, key, folds=[fold], genes=genes, svd_solver="covariance_eigh", clip=True, key_added=None)
    col = f"r_{map_gene}"
    return {"t2_genes": r.mean, "t2_genes_clip": c.mean, "t2_map_gene": float(r.per_fold[col].iloc[0]) if col in r.per_fold else np.nan}


def tier3(img, key: str, tr: np.ndarray, te: np.ndarray, labels: np.ndarray) -> dict:
    """Linear probe (standardised features -> logistic regression) of labels the alignment never saw."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(img.obsm[key])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1, random_state=0)).fit(X[tr], labels[tr])
    p = clf.predict(X[te])
    return {"t3_acc": accuracy_score(labels[te], p), "t3_macro_f1": f1_score(labels[te], p, average="macro")}


def tier4(img, key: str, tr: np.ndarray, te: np.ndarray) -> dict:
    """Simulated: Pearson of the probe's predicted programme activity vs the planted proportion, per cell type."""
    Y = img.obsm["pathway_scores"]
    truth = img.obsm["celltype_props"][list(Y.columns)].to_numpy()
    probe = HestRidge(svd_solver="covariance_eigh", clip=True).fit(np.asarray(img.obsm[key])[tr], Y.to_numpy()[tr])
    r = pearson_per_gene(truth[te], probe.predict(np.asarray(img.obsm[key])[te]))
    return {"t4_truth": float(np.nanmean(r.to_numpy())), **{f"t4_{c}": float(v) for c, v in zip(Y.columns, r.to_numpy())}}


# ================================================================================ per fold
def fold_labels(args, full, img, tr_pats) -> np.ndarray:
    """Tier 3 labels: the niche teacher's niches (HER2ST) or the pathologist-like label (simulated)."""
    if args.dataset != "her2st":
        return img.obs["pathology"].astype(str).to_numpy()
    from stdistill.teachers import NicheTeacher

    full_tr = full[full.obs["patient"].astype(str).isin(tr_pats).to_numpy()].copy()
    return NicheTeacher(6, seed=0).fit(full_tr).predict_proba(img).argmax(1).astype(str)


def choose_settings(args, img, fold, base: StampConfig, t0: float) -> tuple[dict, list]:
    tr = sd.io.subset_sections(img, list(fold.train))
    grid = [{"w_con": w, "rank": r} for w in args.w_con for r in args.rank]
    table = select_stamp(tr, grid, base=base, encoder=ENCODER).table
    rows = []
    for r in table.itertuples():
        rows.append({"fold": fold.patients_of("test")[0], **grid[r.candidate], "val": r.split,
                     "curve": " ".join(f"{x:.4f}" for x in r.curve), "seconds": r.seconds})
        log(f"  select w_con={rows[-1]['w_con']:g} rank={rows[-1]['rank']} val {r.split}: {rows[-1]['curve']} [{r.seconds:.0f}s]", t0)
    chosen = {}
    for name, where in (("stamp", None), ("stamp_con", lambda g: g["w_con"] > 0)):
        c = choose(table, grid, base, where=where)
        ci = grid.index({"w_con": c.w_con, "rank": c.rank})
        curves = list(table.loc[table["candidate"] == ci, "curve"])
        val_r = float(np.mean([x[c.max_epochs] for x in curves]))
        chosen[name] = c
        rows.append({"fold": rows[0]["fold"], "chosen": name, "w_con": c.w_con, "rank": c.rank, "epochs": c.max_epochs,
                     "val": "chosen", "curve": f"{val_r:.4f}", "frozen": float(np.mean([x[0] for x in curves]))})
        log(f"  chosen {name}: w_con={c.w_con:g}, rank={c.rank}, epochs={c.max_epochs} (val r {val_r:.4f}; frozen {rows[-1]['frozen']:.4f})", t0)
    return chosen, rows


def score(args, img, key, fold, genes, map_gene, labels, pred=None) -> tuple[dict, dict]:
    sec = img.obs["section"].astype(str)
    tr, te = sec.isin(fold.train).to_numpy(), sec.isin(fold.test).to_numpy()
    t1 = tier1(img, key, tr, te, pred)
    row = {"t1_probe": float(t1["probe"].mean()), "t1_probe_clip": float(t1["probe_clip"].mean()),
           "t1_head": float(t1["head"].mean()) if "head" in t1 else np.nan}
    row.update(tier2(img, key, fold, genes, map_gene))
    row.update(tier3(img, key, tr, te, labels))
    if args.dataset != "her2st":
        row.update(tier4(img, key, tr, te))
    return row, t1


def run_fold(args, full, img, fold, base, map_gene, t0) -> tuple[list, list, dict]:
    test_p = fold.patients_of("test")[0]
    genes = sd.pp.hest_genes(img, 50, sections=list(fold.train))
    labels = fold_labels(args, full, img, fold.patients_of("train"))
    log(f"fold {test_p}: train {fold.patients_of('train')}, test {test_p}; tier-3 labels {pd.Series(labels).nunique()} classes", t0)
    rows, per_path = [], {}
    # the frozen encoder with STAMP's ridge-initialised head (epoch 0, nothing trained): the head's baseline
    head0 = STAMP(ENCODER, replace(base, max_epochs=0)).fit(sd.io.subset_sections(img, list(fold.train)), "pathway_scores")
    row, t1 = score(args, img, "X_frozen", fold, genes, map_gene, labels, pred=head0.predict(img, inplace=False))
    rows.append({"fold": test_p, "method": "frozen", "seed": -1, **row})
    per_path[("frozen", test_p)] = t1["probe"]
    log("  frozen: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.startswith("t4_") or k == "t4_truth"), t0)
    chosen, sel = choose_settings(args, img, fold, base, t0)
    done = {}
    for name, c in chosen.items():
        for seed in args.seeds:
            cfg = replace(c, seed=seed, patience=base.patience)
            if repr(cfg) in done:  # identical settings: trained once
                rows.append({**done[repr(cfg)], "method": name})
                per_path[(name, test_p, seed)] = per_path[done[repr(cfg)]["_pp"]]
                continue
            tr = sd.io.subset_sections(img, list(fold.train))
            m = STAMP(ENCODER, cfg).fit(tr, "pathway_scores")
            key = f"X_{name}_s{seed}"
            m.transform(img, key_added=key)
            row, t1 = score(args, img, key, fold, genes, map_gene, labels, pred=m.predict(img, inplace=False))
            rows.append({"fold": test_p, "method": name, "seed": seed, **row, "w_con": cfg.w_con, "rank": cfg.rank,
                         "epochs": cfg.max_epochs, "share": m.trainable_share, "seconds": round(m.fit_seconds_, 1),
                         "_pp": (name, test_p, seed)})
            done[repr(cfg)] = rows[-1]
            per_path[(name, test_p, seed)] = t1["probe"]
            log(f"  {name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                      if not k.startswith("t4_") or k == "t4_truth"), t0)
    return rows, sel, per_path


# ================================================================================ tables
METRICS = [("t1_probe", "T1 pathways, HEST probe"), ("t1_probe_clip", "T1 clipped probe"), ("t1_head", "T1 head (frozen: ridge-initialised)"),
           ("t2_genes", "T2 genes, HEST probe"), ("t2_genes_clip", "T2 genes, clipped"), ("t2_map_gene", "T2 map gene r"),
           ("t3_acc", "T3 probe accuracy"), ("t3_macro_f1", "T3 probe macro-F1"), ("t4_truth", "T4 planted programmes r")]


def summarise(res: pd.DataFrame, notes: dict[str, str]) -> str:
    """One table: every tier's metric (mean over folds of the seed means; +- spread over seeds)."""
    res = res.copy()
    mets = [(k, n) for k, n in METRICS if k in res and res[k].notna().any()]
    folds = list(dict.fromkeys(res["fold"]))
    lines = ["| method | " + " | ".join(n for _, n in mets) + " |", "|---" * (len(mets) + 1) + "|"]
    for meth in dict.fromkeys(res["method"]):
        d = res[res["method"] == meth]
        cells = []
        for k, _ in mets:
            per_seed = d.groupby("seed")[k].mean()  # mean over folds for each seed
            cell = f"{per_seed.mean():.4f}"
            if len(per_seed) > 1:
                cell += f" +- {per_seed.std(ddof=0):.4f}"
            cells.append(cell)
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Per fold (mean over seeds), T1 HEST probe / T1 clipped / T2 genes HEST / T3:")
    lines.append("")
    lines.append("| method | " + " | ".join(f"{f}{' *' if f in notes else ''}" for f in folds) + " |")
    lines.append("|---" * (len(folds) + 1) + "|")
    for meth in dict.fromkeys(res["method"]):
        d = res[res["method"] == meth].groupby("fold")[["t1_probe", "t1_probe_clip", "t2_genes", "t3_acc"]].mean()
        lines.append(f"| {meth} | " + " | ".join(" / ".join(f"{v:.3f}" for v in d.loc[f]) for f in folds) + " |")
    for f, note in notes.items():
        lines.append(f"\n* {f}: {note}.")
    return "\n".join(lines)


def pathway_table(pp: pd.DataFrame, top: int = 10) -> str:
    """Pathways with the largest and smallest gain (STAMP seed mean minus frozen), per-fold means."""
    fr = pp["frozen"]
    st = pp.filter(like="stamp_s").mean(axis=1) if any(c.startswith("stamp_s") for c in pp.columns) else pp["stamp"]
    d = pd.DataFrame({"frozen": fr, "stamp": st, "gain": st - fr}).sort_values("gain", ascending=False)
    pick = d if len(d) <= 2 * top else pd.concat([d.head(top), d.tail(top)])
    lines = ["| pathway | frozen r | STAMP r | gain |", "|---|---|---|---|"]
    lines += [f"| {i} | {r.frozen:.3f} | {r.stamp:.3f} | {r.gain:+.3f} |" for i, r in pick.iterrows()]
    wins = int((d["gain"] > 0).sum())
    lines.append(f"\nSTAMP above frozen on {wins} of {len(d)} pathways (HEST probe, mean over folds and seeds).")
    return "\n".join(lines)


COMBINED = [("her2st", "t1_probe", "HER2ST T1 pathways"), ("her2st", "t1_probe_clip", "HER2ST T1 clipped"),
            ("her2st", "t1_head", "HER2ST T1 head"), ("her2st", "t2_genes", "HER2ST T2 genes"),
            ("her2st", "t3_acc", "HER2ST T3 niche acc"), ("simulated", "t1_probe_clip", "sim T1 clipped"),
            ("simulated", "t2_genes_clip", "sim T2 genes clipped"), ("simulated", "t3_macro_f1", "sim T3 label F1"),
            ("simulated", "t4_truth", "sim T4 planted r")]


def combined(res: dict[str, pd.DataFrame]) -> str:
    """All tiers in one table: mean over folds of the seed means, for each dataset that was run."""
    cols = [(d, k, n) for d, k, n in COMBINED if d in res and k in res[d] and res[d][k].notna().any()]
    lines = ["| method | " + " | ".join(n for *_, n in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    methods = list(dict.fromkeys(m for r in res.values() for m in r["method"]))
    for meth in methods:
        cells = []
        for d, k, _ in cols:
            x = res[d][res[d]["method"] == meth]
            cells.append(f"{x.groupby('seed')[k].mean().mean():.4f}" if len(x) else "")
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out: Path, datasets: list[str], results=None) -> str:
    """The combined table, then each dataset's tables, from the CSVs under ``out/<dataset>/``
    (each table also into ``results`` when given)."""
    res = {d: pd.read_csv(out / d / "results.csv") for d in datasets if (out / d / "results.csv").is_file()}
    parts = ["All tiers (mean over held-out patients; seeds averaged):", "", combined(res)]
    if results is not None:
        results.markdown(parts[-1], ["all_tiers"])
    for d in res:
        pp = pd.read_csv(out / d / "per_pathway.csv", index_col=0)
        parts += ["", f"## {d}", "", summarise(res[d], RES_NOTE if d == "her2st" else {}), "", pathway_table(pp)]
        if results is not None:
            results.markdown(parts[-3], [f"{d}_tiers"])
            results.markdown(parts[-1], [f"{d}_pathways"])
    return "\n".join(parts)


def run_dataset(args, dataset: str, out: Path, t0: float) -> None:
    """Every fold of one dataset; writes results.csv, selection.csv, per_pathway.csv under ``out``."""
    args.dataset = dataset
    out.mkdir(parents=True, exist_ok=True)
    full, img, map_gene = load(args)
    log(f"{dataset}: {img.n_obs} imaged spots, {img.obsm['pathway_scores'].shape[1]} pathways", t0)
    base = StampConfig(adapter="miss", lr=args.lr, max_epochs=args.max_epochs, patience=2, train_positions=16, head_ridge=10.0)
    img.obsm["X_frozen"] = frozen_features(img, base)
    rows, sel, per_path = [], [], {}
    for fold in sd.pp.folds(img)[: 1 if args.smoke else None]:  # --smoke: the first fold
        r, s, p = run_fold(args, full, img, fold, base, map_gene, t0)
        rows += r
        sel += s
        per_path.update(p)
    pd.DataFrame(rows).drop(columns="_pp", errors="ignore").to_csv(out / "results.csv", index=False)
    pd.DataFrame(sel).to_csv(out / "selection.csv", index=False)
    pp = pd.DataFrame({f"{k[0]}_s{k[2]}" if len(k) == 3 else k[0]: v for k, v in _mean_over_folds(per_path).items()})
    pp.to_csv(out / "per_pathway.csv")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/pathways_her2st")
    ap.add_argument("--dataset", choices=["her2st", "simulated", "both"], default="both",
                    help="her2st: tiers 1-3 on real data; simulated: tiers 1-4 (planted programmes); both (default)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--w-con", type=float, nargs="+", default=[0.0, 1.0], help="contrastive weights tried")
    ap.add_argument("--rank", type=int, nargs="+", default=[32],
                    help="MiSS ranks tried (e.g. 32 128; each rank doubles the selection runs)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads (default: all cores)")
    ap.add_argument("--from-csv", action="store_true", help="re-print the tables from --out's CSVs (no training)")
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    _common.smoke(args, dataset="both" if _common.has_dataset("her2st") or args.root else "simulated", seeds=[0],
                  w_con=[0.0, 1.0], rank=[8], max_epochs=1, threads=1)
    out, t0 = Path(args.out), time.time()
    datasets = ["her2st", "simulated"] if args.dataset == "both" else [args.dataset]
    results = _common.Results(args, seeds=args.seeds, precision="fp32",
                              variant=None if args.dataset == "both" else args.dataset)
    if not args.from_csv:
        import torch

        torch.set_num_threads(max(1, args.threads))
        warnings.filterwarnings("ignore", category=UserWarning)
        print(f"precision: fp32 (trunk cached in fp16, as PEKA); encoder {ENCODER}; seeds {args.seeds}; grid w_con {args.w_con} x "
              f"rank {args.rank}, lr {args.lr:g}, epochs <= {args.max_epochs}; torch {torch.__version__}, {args.threads} threads")
        for d in datasets:
            run_dataset(args, d, out / d, t0)
    text = report(out, ["her2st", "simulated"] if args.from_csv else datasets, results)
    if not args.from_csv:
        (out / "table.md").write_text(text + "\n")
    print(text)
    log(f"done: {time.time() - t0:.0f} s in all", t0)
    return results.finish()


def _mean_over_folds(per_path: dict) -> dict:
    """(method, fold[, seed]) -> Series  ==>  (method[, seed]) -> Series averaged over folds."""
    groups: dict = {}
    for k, v in per_path.items():
        groups.setdefault((k[0],) + tuple(k[2:]), []).append(v)
    return {k: pd.concat(v, axis=1).mean(axis=1) for k, v in groups.items()}


if __name__ == "__main__":
    sys.exit(main())
