"""GenST on HER2ST: expression generated from H&E through aligned VQ-VAEs vs the frozen-feature ridge.

Leave-one-patient-out over the imaged HER2ST sections (patients A: A1/A2 at ~3.2 um/px, B: B4,
C: C2-C5 at ~0.69 um/px), HEST protocol genes and folds (``stdistill.bench``). Features:
``effnet-lite0-imagenet`` (ImageNet, not a pathology model) from ``sd.features.extract`` in fp32.
Per fold, on the training patients only:

* genes: 50 chosen HEST's way on the training sections (``sd.pp.hest_genes``); the map gene (ERBB2;
  simulated: the first tumour_A marker) is modelled beside them and reported, never scored;
* baselines: the HEST ridge probe (``sd.bench.expression``, exact PCA) on the same features, with
  HEST's alpha, with alpha chosen by inner patient CV (``alpha="cv"``), and with clipped features;
* GenST settings (contrastive weight x head input) and alignment epochs chosen by
  ``select_genst`` (each training patient in turn validates a model trained on the other; mean
  Pearson of the generated expression after each alignment epoch); then trained on all training
  patients for each seed; ablations with the chosen settings: MSE on log1p instead of the negative
  binomial (``genst_mse``), FSQ instead of VectorQuantize (``genst_fsq``) and 256 codes (``genst_k256``);
* the same with the histology VQ-VAE end to end on the patch pixels (``genst_pixels``: 112 um
  patches at 64 px, a convolutional VQ-VAE trained from scratch with the alignment; its own
  settings and epochs chosen the same way, up to ``--pixel-max-epochs``), and its ablation with the
  histology VQ-VAE first trained on reconstruction alone for 10 epochs (``genst_pixels_pre``);
* scored on the held-out patient: per-gene Pearson of the generated expression (mixture mean);
  the expression VQ-VAE's reconstruction (ceiling); Spearman of the predictive spread vs the
  absolute error per gene (spread of code draws, and of code + count draws), interval coverage
  of count draws; codebook usage and perplexity of both codebooks and of the generated codes.

Usage::

    python benchmarks/genst_her2st.py                        # HER2ST ($STDISTILL_DATA/her2st, else ../shared/data/her2st)
    python benchmarks/genst_her2st.py --dataset simulated
    python benchmarks/genst_her2st.py --from-csv              # tables only, from results/genst_her2st's CSVs
    python benchmarks/genst_her2st.py --pixels                # HER2ST with the pixel-level rows (hours on 2 cores)
    python benchmarks/genst_her2st.py --smoke --out /tmp/genst_smoke   # small simulated data, first fold, every row, seconds

Writes ``docs/results/genst_her2st-<dataset>.json`` (the tables, command, commit, machine, run
time; ``benchmarks/_common.py``) and, under ``--out`` (default ``results/genst_<dataset>``),
``results.csv`` (fold x method x seed), ``selection.csv``, ``per_gene.csv``, ``history.csv``,
``table.md`` and figures (``predictability.png``, ``calibration.png``, ``curves.png``, a map of the
map gene); prints the tables and the run time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common  # noqa: E402
import stdistill as sd  # noqa: E402
from stdistill.cli._common import imaged_sections  # noqa: E402
from stdistill.recipes import GenST, GenstConfig, codebook_stats, genst_patches, select_genst  # noqa: E402

ENCODER, KEY = "effnet-lite0-imagenet", "X_effnet-lite0-imagenet"
RES_NOTE = {"A": "A1/A2 at ~3.2 um/px (2000 px app copies): resolution shift + patient shift"}
ABLATIONS = {"genst_mse": {"likelihood": "mse"}, "genst_fsq": {"quantizer": "fsq", "fsq_levels": (8, 8)},
             "genst_k256": {"codebook_size": 256, "hist_codebook_size": 256}}
PIXEL_ABLATIONS = {"genst_pixels_pre": {"hist_epochs": 10}}


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


# ================================================================================ data
def load(args) -> tuple:
    """(imaged spots with features, map gene)."""
    if args.dataset == "her2st":
        img, gene = imaged_sections(_common.her2st(args.root, args.smoke)), "ERBB2"
    else:
        RES_NOTE.clear()
        img = (_common.simulated_small(args.data_seed) if args.smoke else
               sd.datasets.simulated(n_sections=6, n_patients=3, seed=args.data_seed))
        gene = str(img.var_names[img.var["marker_of"].astype(str) == "tumour_A"][0])
    sd.features.extract(img, ENCODER, precision=args.precision)
    if args.pixels:
        genst_patches(img, 112.0, args.pixel_px)  # obsm["genst_patches"]: read once, shared by every fit
    return img, gene


# ================================================================================ scoring
def spread_vs_error(y: np.ndarray, pred: np.ndarray, spread: np.ndarray) -> float:
    """Mean over genes of Spearman(spread, |error|) across the held-out spots."""
    from scipy.stats import spearmanr

    err = np.abs(y - pred)
    rs = [spearmanr(spread[:, j], err[:, j])[0] for j in range(y.shape[1]) if np.ptp(spread[:, j]) > 0 and np.ptp(err[:, j]) > 0]
    return float(np.nanmean(rs)) if rs else float("nan")


def coverage(y: np.ndarray, draws: np.ndarray, levels=(0.5, 0.8, 0.9)) -> dict[str, float]:
    """Share of measured values inside the central interval of the draws (n, S, G), per nominal level."""
    out = {}
    for lv in levels:
        lo, hi = np.quantile(draws, [(1 - lv) / 2, (1 + lv) / 2], axis=1)
        out[f"cover{int(lv * 100)}"] = float(((y >= lo) & (y <= hi)).mean())
    return out


def score_genst(m: GenST, te, genes: list[str], gene: str, seed: int) -> tuple[dict, pd.DataFrame, dict]:
    """Held-out scores of one fitted model, its per-gene table and (for the figures) arrays."""
    y = np.log1p(te[:, m.genes_].X.toarray())
    m.predict(te)  # obsm["genst_pred"], obsm["genst_sd"] (the map figure reads them too)
    pred, sd_codes = te.obsm["genst_pred"].to_numpy(), te.obsm["genst_sd"].to_numpy()
    draws = m.sample(te, 32, counts=m.config.likelihood == "nb", seed=seed, inplace=False)
    tab = m.predictability(te)
    r = tab["generated"]
    row = {"pearson": float(r[genes].mean()), "ceiling": float(tab["reconstruction"][genes].mean()),
           "r_map": float(r.get(gene, np.nan)), "spear_codes": spread_vs_error(y, pred, sd_codes),
           "spear_draws": spread_vs_error(y, pred, draws.std(1)), **coverage(y, draws)}
    for name, u in m.codebook_usage(te).iterrows():
        row.update({f"{name}_used": u["used"], f"{name}_perp": u["perplexity"], f"{name}_collapsed": bool(u["collapsed"])})
    row["K"] = m.net_.expr.codebook_size
    row["train_expr_perp"] = codebook_stats(m.train_codes_, row["K"])["perplexity"]  # collapse in training, or patient shift?
    return row, tab, {"y": y, "pred": pred, "sd_codes": sd_codes, "draws": draws}


def ridge_rows(img, fold, genes: list[str], gene: str) -> tuple[list[dict], dict[str, pd.Series]]:
    """HEST probe (exact PCA) with HEST's alpha, inner-CV alpha and clipped features; rows and per-gene r of each."""
    rows, per_gene = [], {}
    for name, kw in (("ridge_hest", {}), ("ridge_cv", {"alpha": "cv"}), ("ridge_clip", {"clip": True})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # alpha on the grid's edge is in per_fold
            res = sd.bench.expression(img, KEY, folds=[fold], genes=genes, extra_genes=[gene], svd_solver="covariance_eigh",
                                      key_added=None, **kw)
        pf = res.per_fold.iloc[0]
        rows.append({"method": name, "seed": -1, "pearson": float(pf["pearson_mean"]), "r_map": float(pf.get(f"r_{gene}", np.nan)),
                     "alpha": float(pf["alpha"])})
        per_gene[name] = res.per_gene.iloc[:, 0]
    return rows, per_gene


# ================================================================================ per fold
def choose(args, tr, gene: str, base: GenstConfig, fold_name: str, t0: float) -> tuple[GenstConfig, list[dict]]:
    grid = [{"w_con": w, "head_input": h} for w in args.w_con for h in args.head_input]
    sel = select_genst(tr, grid, base=base, feature_key=KEY, n_genes=50, extra_genes=[gene])
    cfg, table = sel.config(), sel.table
    rows, hist = [], base.histology
    for r in table.itertuples():
        rows.append({"fold": fold_name, "histology": hist, "w_con": r.w_con, "head_input": r.head_input, "val": r.split,
                     "curve": " ".join(f"{x:.4f}" for x in r.curve), "seconds": r.seconds})
    ci = grid.index({"w_con": cfg.w_con, "head_input": cfg.head_input})
    curves = [c for c, k in zip(table["curve"], table["candidate"]) if k == ci]
    val_r = float(np.mean([c[cfg.max_epochs] for c in curves]))
    rows.append({"fold": fold_name, "histology": hist, "w_con": cfg.w_con, "head_input": cfg.head_input, "val": "chosen",
                 "curve": f"{val_r:.4f}", "epochs": cfg.max_epochs})
    log(f"  {hist}: chosen w_con={cfg.w_con:g}, head_input={cfg.head_input}, alignment epochs={cfg.max_epochs} (val r {val_r:.4f}); "
        f"selection {table['seconds'].sum():.0f}s", t0)
    return cfg, rows


def run_fold(args, img, fold, gene: str, base: GenstConfig, t0: float) -> dict:
    name = fold.patients_of("test")[0]
    tr, te = sd.io.subset_sections(img, list(fold.train)), sd.io.subset_sections(img, list(fold.test))
    genes = sd.pp.hest_genes(img, 50, sections=list(fold.train))
    model_genes = genes + ([gene] if gene not in genes else [])
    log(f"fold {name}: train {fold.patients_of('train')} ({tr.n_obs} spots), test {te.n_obs} spots; {gene} among the 50: {gene in genes}", t0)
    rows, ridge_pg = ridge_rows(img, fold, genes, gene)
    for r in rows:
        r["fold"] = name
        log(f"  {r['method']}: r {r['pearson']:.4f}, {gene} {r['r_map']:.3f}", t0)
    cfg, sel = choose(args, tr, gene, base, name, t0)
    arms = [("genst", cfg, {"genst": {}, **(ABLATIONS if args.ablations else {})})]
    if args.pixels:
        px_base = replace(base, histology="pixels", patch_um=112.0, patch_px=args.pixel_px, max_epochs=args.pixel_max_epochs)
        cfg_px, sel_px = choose(args, tr, gene, px_base, name, t0)
        sel += sel_px
        arms.append(("genst_pixels", cfg_px, {"genst_pixels": {}, **(PIXEL_ABLATIONS if args.ablations else {})}))
    out = {"rows": rows, "sel": sel, "per_gene": {(k, name): v for k, v in ridge_pg.items()}, "hist": [], "arrays": None, "te": te,
           "preds": {}}
    for main, cfg, methods in arms:
        for method, upd in methods.items():
            for seed in args.seeds if method == main else args.ablation_seeds:
                fit_one(out, method, replace(cfg, seed=seed, **upd), tr, te, genes, model_genes, gene, name, args, t0)
    return out


def fit_one(out: dict, method: str, cfg: GenstConfig, tr, te, genes: list[str], model_genes: list[str], gene: str, name: str,
            args, t0: float) -> None:
    """Fit one GenST run, score it on the held-out patient and add its row (and, for seed 0 of ``genst``, the arrays)."""
    seed, rows = cfg.seed, out["rows"]
    m = GenST(cfg, feature_key=KEY).fit(tr, model_genes)
    row, tab, arr = score_genst(m, te, genes, gene, seed)
    rows.append({"fold": name, "method": method, "seed": seed, **row, "seconds": round(m.seconds_, 1),
                 "w_con": cfg.w_con, "head_input": cfg.head_input, "epochs": cfg.max_epochs})
    out["per_gene"][(method, name, seed)] = tab
    log(f"  {method} seed {seed}: r {row['pearson']:.4f} (ceiling {row['ceiling']:.4f}), {gene} {row['r_map']:.3f}, "
        f"spread-error Spearman {row['spear_codes']:.3f} / {row['spear_draws']:.3f}, perplexity expr "
        f"{row.get('expression_perp', np.nan):.1f} hist {row['histology_perp']:.1f} gen {row['generated_perp']:.1f} "
        f"[{m.seconds_:.0f}s]", t0)
    if method == "genst" and seed == args.seeds[0]:
        out["hist"].append(m.history_.assign(fold=name))
        out["arrays"] = arr
        out["preds"] = {"GenST": te.obsm["genst_pred"][gene].copy(), "GenST SD": te.obsm["genst_sd"][gene].copy()}


# ================================================================================ tables
Table = tuple[list[str], list[list[str]]]


def fmt(v: pd.Series) -> str:
    """mean +- std over seeds; runs whose r is undefined (a constant prediction, e.g. one code for
    every spot) are left out of both and counted in the cell."""
    ok = v.dropna()
    cell = (f"{ok.mean():.4f}" + (f" +- {ok.std(ddof=0):.4f}" if len(ok) > 1 else "")) if len(ok) else "undefined"
    return cell + (f" ({v.isna().sum()} of {len(v)} runs: r undefined)" if v.isna().any() and len(ok) else "")


def markdown(t: Table) -> str:
    cols, rows = t
    return "\n".join(["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"] + ["| " + " | ".join(r) + " |" for r in rows])


def peka_rows(dataset: str) -> list[tuple[str, dict[str, float]]]:
    """PEKA's held-out Pearson per fold (mean over seeds), quoted, not retrained: read from the
    results file of ``benchmarks/expression_her2st.py`` on the same dataset, where it exists."""
    path = _common.RESULTS_DIR / ("expression_her2st" + ("" if dataset == "her2st" else f"-{dataset}") + ".json")
    table = json.loads(path.read_text())["tables"].get("main") if path.is_file() else None
    if table is None:
        return []
    cols = table["columns"]
    folds = cols[1:cols.index("mean +- std over folds")] if "mean +- std over folds" in cols else []
    rows = []
    for row in table["rows"]:
        r = dict(zip(cols, row))
        if r["method"] in ("peka_miss", "peka_miss_kd"):
            rows.append((f"PEKA {r['method']} (quoted from {path.name})",
                         {f.rstrip(" *"): float(str(r[f]).split()[0]) for f in folds}))
    return rows


def main_table(res: pd.DataFrame, dataset: str, gene: str) -> Table:
    folds = [f for f in dict.fromkeys(res["fold"])]
    cols = (["method"] + [f"{f}{' *' if f in RES_NOTE else ''}" for f in folds]
            + ["mean +- std over folds", f"{gene} r", "ceiling (VQ-VAE reconstruction)", "train s/run"])
    rows = []
    for meth in dict.fromkeys(res["method"]):
        d = res[res["method"] == meth]
        per_fold = [fmt(d[d["fold"] == f]["pearson"]) for f in folds]
        fm = d.groupby("fold")["pearson"].mean()
        seeds = d.groupby("seed")["pearson"].mean()
        agg = f"{fm.mean():.4f} +- {fm.std(ddof=0):.4f}" + (f" (seeds +- {seeds.std(ddof=0):.4f})" if len(seeds) > 1 else "")
        ceil = f"{d['ceiling'].mean():.4f}" if "ceiling" in d and d["ceiling"].notna().any() else ""
        secs = f"{d['seconds'].mean():.0f}" if "seconds" in d and d["seconds"].notna().any() else ""
        rows.append([meth, *per_fold, agg, f"{d['r_map'].mean():.3f}", ceil, secs])
    for name, peka in peka_rows(dataset):
        if all(f in peka for f in folds):
            v = pd.Series([peka[f] for f in folds])
            rows.append([name, *(f"{peka[f]:.4f}" for f in folds), f"{v.mean():.4f} +- {v.std(ddof=0):.4f}", "", "", ""])
    return cols, rows


def diag_table(res: pd.DataFrame) -> Table:
    g = res[res["method"].str.startswith("genst")]
    cols = [("spear_codes", "Spearman(SD codes, abs err)"), ("spear_draws", "Spearman(SD codes+counts, abs err)"),
            ("cover50", "50% cover"), ("cover80", "80% cover"), ("cover90", "90% cover"),
            ("train_expr_perp", "expr perplexity (training spots)"), ("expression_perp", "expr perplexity"), ("expression_used", "expr used"), ("histology_perp", "hist perplexity"),
            ("histology_used", "hist used"), ("generated_perp", "generated perplexity"), ("generated_used", "generated used"), ("K", "K")]
    cols = [(k, n) for k, n in cols if k in g]
    rows = []
    for (meth, fold), d in g.groupby(["method", "fold"], sort=False):
        flags = [c.replace("_collapsed", "") for c in d.columns if c.endswith("_collapsed") and d[c].astype(bool).any()]
        rows.append([meth, fold, *(f"{d[k].mean():.3f}" if k.startswith(("spear", "cover")) else f"{d[k].mean():.1f}" for k, _ in cols),
                     ", ".join(flags) or "none"])
    return ["method", "fold", *(n for _, n in cols), "collapse flagged"], rows


def selection_table(sel: pd.DataFrame) -> Table:
    s = sel[sel["val"] == "chosen"]
    rows = [[r.fold, r.histology, f"{r.w_con:g}", r.head_input, str(int(r.epochs)), r.curve] for r in s.itertuples()]
    return ["fold", "histology", "w_con", "head input", "alignment epochs", "mean val r"], rows


def gene_table(pg: pd.DataFrame, top: int = 8) -> Table:
    d = pg.dropna(subset=["generated"]).sort_values("generated", ascending=False)
    pick = d if len(d) <= 2 * top else pd.concat([d.head(top), d.tail(top)])
    rows = [[g, f"{r.generated:.3f}", f"{r.reconstruction:.3f}", f"{r.ridge:.3f}", f"{r.ridge_hest:.3f}"] for g, r in pick.iterrows()]
    return ["gene", "GenST r", "ceiling r", "ridge alpha=cv r", "ridge HEST r"], rows


# ================================================================================ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_predictability(pg: pd.DataFrame, path: Path, title: str, top: int = 10) -> None:
    """Top and bottom genes by GenST r, with the reconstruction ceiling and the ridge beside them."""
    plt = _plt()
    d = pg.dropna(subset=["generated"]).sort_values("generated", ascending=False)
    d = d if len(d) <= 2 * top else pd.concat([d.head(top), d.tail(top)])
    fig, ax = plt.subplots(figsize=(6.5, 0.24 * len(d) + 1.8))
    y = np.arange(len(d))
    ax.barh(y, d["generated"], color="tab:blue", label="GenST (generated)")
    ax.plot(d["reconstruction"], y, "k|", ms=12, mew=2, label="ceiling (VQ-VAE reconstruction)")
    ax.plot(d["ridge"], y, "rx", label="ridge (HEST probe, alpha=cv)")
    ax.set_yticks(y, d.index, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("Pearson r on held-out patients (mean over folds)")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fig_calibration(arrays: list[dict], path: Path, title: str) -> None:
    """Binned mean |error| vs predicted SD (codes; codes + counts) and coverage of count-draw intervals."""
    plt = _plt()
    y = np.concatenate([a["y"].ravel() for a in arrays])
    err = np.abs(y - np.concatenate([a["pred"].ravel() for a in arrays]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for name, s in (("SD of code draws", np.concatenate([a["sd_codes"].ravel() for a in arrays])),
                    ("SD of code + count draws", np.concatenate([a["draws"].std(1).ravel() for a in arrays]))):
        edges = np.unique(np.quantile(s, np.linspace(0, 1, 11)))
        b = np.clip(np.digitize(s, edges[1:-1]), 0, len(edges) - 2)
        xs = [s[b == i].mean() for i in range(len(edges) - 1) if (b == i).any()]
        ys = [err[b == i].mean() for i in range(len(edges) - 1) if (b == i).any()]
        axes[0].plot(xs, ys, "o-", label=name)
    lim = max(axes[0].get_xlim()[1], axes[0].get_ylim()[1])
    axes[0].plot([0, lim], [0, lim * np.sqrt(2 / np.pi)], "k--", lw=0.8, label="Gaussian: E|e| = 0.80 SD")
    axes[0].set_xlabel("predicted SD (deciles of spot x gene)")
    axes[0].set_ylabel("mean |measured - predicted| (log1p)")
    axes[0].legend(fontsize=7)
    levels = np.linspace(0.1, 0.9, 9)
    cov = [float(np.mean([coverage(a["y"], a["draws"], [lv])[f"cover{int(lv * 100)}"] for a in arrays])) for lv in levels]
    axes[1].plot(levels, cov, "o-", label="code + count draws")
    axes[1].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[1].set_xlabel("nominal central interval")
    axes[1].set_ylabel("share of measured values inside")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fig_curves(hist: pd.DataFrame, sel: pd.DataFrame, path: Path, title: str) -> None:
    """Per fold: alignment losses per epoch (seed 0) and the inner validation curves of the grid."""
    plt = _plt()
    folds = list(dict.fromkeys(hist["fold"]))
    fig, axes = plt.subplots(2, len(folds), figsize=(3.6 * len(folds), 6), squeeze=False)
    for j, f in enumerate(folds):
        h = hist[(hist["fold"] == f) & (hist["stage"] == "align")]
        for k in ("ce", "con", "rec_h"):
            if k in h and h[k].notna().any():
                axes[0, j].plot(h["epoch"], h[k], label=k)
        axes[0, j].set_title(f"fold {f}: alignment losses", fontsize=9)
        axes[0, j].set_xlabel("epoch")
        axes[0, j].legend(fontsize=7)
        s = sel[(sel["fold"] == f) & (sel["val"] != "chosen")]
        for (h_in, w, hi), d in s.groupby(["histology", "w_con", "head_input"]):
            c = np.mean([[float(x) for x in v.split()] for v in d["curve"]], axis=0)
            axes[1, j].plot(np.arange(len(c)), c, "-" if h_in == "features" else "--", label=f"{h_in}: w_con={w:g}, {hi}")
        axes[1, j].set_title("inner validation r (mean of inner splits)", fontsize=9)
        axes[1, j].set_xlabel("alignment epoch (0 = untrained)")
        axes[1, j].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ================================================================================ main
def gene_summary(per_gene: dict) -> pd.DataFrame:
    """Per gene: GenST generated and ceiling r (mean over folds and seeds) and the ridges' r (mean over folds)."""
    gen = [t for k, t in per_gene.items() if k[0] == "genst"]
    g = pd.concat(gen).groupby(level=0).mean()
    for name, col in (("ridge_hest", "ridge_hest"), ("ridge_cv", "ridge")):
        r = pd.concat([s for k, s in per_gene.items() if k[0] == name], axis=1).mean(axis=1)
        g[col] = r.reindex(g.index)
    return g.sort_values("generated", ascending=False)


def tables(res: pd.DataFrame, sel: pd.DataFrame, pg: pd.DataFrame, dataset: str, gene: str) -> dict[str, Table]:
    """The run's tables by name (as printed and as recorded in the results file)."""
    return {"main": main_table(res, dataset, gene), "uncertainty": diag_table(res), "selection": selection_table(sel),
            "genes": gene_table(pg)}


def report(res: pd.DataFrame, sel: pd.DataFrame, pg: pd.DataFrame, dataset: str, gene: str) -> str:
    t = {k: markdown(v) for k, v in tables(res, sel, pg, dataset, gene).items()}
    parts = ["Pearson r (mean over the 50 genes on the held-out patient; per fold mean +- std over seeds):", "",
             t["main"], "", "Uncertainty vs error and codebooks (held-out spots, mean over seeds):", "",
             t["uncertainty"], "", "Settings chosen on inner validation patients:", "", t["selection"], "",
             "Best and worst generated genes (mean over folds and seeds):", "", t["genes"]]
    for f, note in RES_NOTE.items():
        parts.append(f"\n* {f}: {note}.")
    return "\n".join(parts)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["her2st", "simulated"], default="her2st")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", help="feature extraction precision (printed)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--w-con", type=float, nargs="+", default=[0.0, 0.5], help="contrastive weights tried")
    ap.add_argument("--head-input", nargs="+", default=["quantized", "continuous"], help="head inputs tried")
    ap.add_argument("--codebook-size", type=int, default=64)
    ap.add_argument("--expr-epochs", type=int, default=80)
    ap.add_argument("--max-epochs", type=int, default=30, help="most alignment epochs tried (the best is chosen)")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pixels", action=argparse.BooleanOptionalAction, default=None,
                    help="also run GenST with the histology VQ-VAE on the patch pixels (genst_pixels rows; default: "
                         "on simulated data only, since on HER2ST they take hours on a 2-core CPU)")
    ap.add_argument("--pixel-px", type=int, default=64, help="pixels per 112 um patch for the pixel-level model")
    ap.add_argument("--pixel-max-epochs", type=int, default=20, help="most alignment epochs tried for the pixel-level model")
    ap.add_argument("--from-csv", action="store_true", help="re-print the tables from --out's CSVs (no training)")
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    _common.smoke(args, dataset="simulated", seeds=[0], head_input=["quantized"], codebook_size=8, expr_epochs=2,
                  max_epochs=2, pixel_max_epochs=2, ablation_seeds=[0])
    if args.pixels is None:
        args.pixels = args.dataset == "simulated"
    args.out = Path(args.out or f"results/genst_{args.dataset}")
    return args


def write_outputs(args, folds: list[dict], gene: str, out: Path) -> dict[str, Table]:
    """CSVs, table.md and figures of the run under ``out``; returns its tables."""
    res = pd.DataFrame([r for f in folds for r in f["rows"]])
    sel = pd.DataFrame([r for f in folds for r in f["sel"]])
    hist = pd.concat([h for f in folds for h in f["hist"]])
    pg = gene_summary({k: v for f in folds for k, v in f["per_gene"].items()})
    for name, df in (("results.csv", res), ("selection.csv", sel), ("history.csv", hist)):
        df.to_csv(out / name, index=False)
    pg.to_csv(out / "per_gene.csv")
    text = report(res, sel, pg, args.dataset, gene)
    (out / "table.md").write_text(text + "\n")
    label = f"{args.dataset}, {ENCODER} fp32, leave-one-patient-out"
    fig_predictability(pg, out / "predictability.png", f"Per-gene predictability ({label})")
    fig_calibration([f["arrays"] for f in folds], out / "calibration.png", f"GenST spread vs error, held-out patients ({label})")
    fig_curves(hist, sel, out / "curves.png", f"GenST alignment ({label})")
    f_map = folds[1] if args.dataset == "her2st" and len(folds) > 1 else folds[0]  # B4 (patient B) / sim0
    sec = sd.io.sections(f_map["te"])[0]
    sd.pl.expression_maps(f_map["te"], gene, f_map["preds"], section=sec, path=out / f"{gene.lower()}_{sec}.png",
                          title=f"{gene} on held-out {sec}: measured, GenST (seed {args.seeds[0]}) and its SD")
    print(text)
    return tables(res, sel, pg, args.dataset, gene)


def main() -> int:
    args = parse_args()
    out, t0 = args.out, time.time()
    gene = "ERBB2" if args.dataset == "her2st" else "GENE0020"
    if args.dataset != "her2st":
        RES_NOTE.clear()
    if args.from_csv:
        sel = pd.read_csv(out / "selection.csv")
        sel["histology"] = sel["histology"].fillna("features") if "histology" in sel else "features"
        print(report(pd.read_csv(out / "results.csv"), sel, pd.read_csv(out / "per_gene.csv", index_col=0), args.dataset, gene))
        return 0
    results = _common.Results(args, seeds=args.seeds, precision=args.precision, variant=args.dataset)
    out.mkdir(parents=True, exist_ok=True)
    img, gene = load(args)
    meta = img.uns["features"][KEY]
    print(f"features: {meta['encoder']} ({meta['dim']}-d), precision {meta['precision']}, {meta['size_um']} um at {meta['px']} px; "
          f"seeds {args.seeds}; torch threads for GenST: 1", flush=True)
    if args.pixels:
        px = GenstConfig(histology="pixels", patch_px=args.pixel_px)
        print(f"pixel-level histology VQ-VAE: 112 um patches at {args.pixel_px} px, conv channels {px.conv_channels}, "
              f"up to {args.pixel_max_epochs} alignment epochs", flush=True)
    log(f"{args.dataset}: {img.n_obs} imaged spots in {len(sd.io.sections(img))} sections", t0)
    base = GenstConfig(codebook_size=args.codebook_size, hist_codebook_size=args.codebook_size,
                       expr_epochs=args.expr_epochs, max_epochs=args.max_epochs)
    folds = [run_fold(args, img, f, gene, base, t0) for f in sd.pp.folds(img)[: 1 if args.smoke else None]]
    for name, (cols, rows) in write_outputs(args, folds, gene, out).items():
        results.table(name, rows, columns=cols)
    log(f"done: {time.time() - t0:.0f} s in all", t0)
    return results.finish()


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        sys.exit(main())
