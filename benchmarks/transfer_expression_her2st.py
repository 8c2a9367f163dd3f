"""Patient-shift ablation of the expression probes on HER2ST: none / +stain / +views / +context / all.

    OMP_NUM_THREADS=1 python benchmarks/transfer_expression_her2st.py --root ../shared/data/her2st
    ... --parts peka              # the PEKA arm (not in the default run; its own files under --out)
    ... --parts probes peka --from-csv   # re-print the tables of both parts from --out's files
    ... --smoke --out /tmp/smoke   # both parts on 30 spots of A1, B4, C2, fold B: 1 view seed, 1 PEKA seed, 1 epoch

Leave-one-patient-out over the imaged HER2ST patients (A: A1, A2 as ~3.2 um/px copies; B: B4;
C: C2-C5, ~0.69 um/px), the protocol of ``benchmarks/expression_her2st.py`` through
``stdistill.bench.expression``: per fold 50 genes chosen HEST's way on the training sections,
features -> StandardScaler -> PCA(256, exact) -> ridge with HEST's alpha, Pearson r per gene on
the held-out patient, mean over genes; ERBB2 reported beside (not one of the 50). Two probes:
HEST's and the clipped one (held-out features clipped to their training range). Encoder
``effnet-lite0-imagenet`` (an ImageNet model, not a pathology encoder), fp32.

Arms (features of the probe):

- ``none``: the 112 um patch features;
- ``+stain``: the same, Macenko-normalised onto one reference for all folds: the first imaged
  section, A1, as in ``transfer_her2st.py`` (so in fold A the reference stain is a held-out
  section's; label-free, but not a training-only choice there: a training reference per fold
  would mean one more extraction per fold);
- ``+views``: plain features, plus augmented views of every training spot as extra training rows
  (``bench.expression(views=True)``; the held-out patient uses clean features); one run per view
  seed;
- ``+context``: plain patch features concatenated with the features of a 224 um field of view
  (2x the patch, resized to 224 px) around the spot;
- ``all``: Macenko patch + Macenko context features, with Macenko views.
- ``chosen``: per held-out patient and probe, the arm that scores best in leave-one-patient-out
  folds inside the training patients (the held-out patient never takes part), scored on the
  held-out patient as that arm is: ``bench.expression`` with the arms as feature candidates.

The ridge probe is deterministic: ``none``, ``+stain``, ``+context`` give one number per patient;
the view arms one per view seed. Paired differences arm - none per held-out patient (same probe,
same genes) are printed with two spreads: the sd over view seeds (view arms) and the standard
error over the 50 genes of the per-gene differences (every arm). ``--parts peka``: PEKA (MiSS,
the library's PekaConfig defaults, a fixed number of epochs, no settings selection) on the plain
patches, probed like the arms (this arm predates PEKA's stain normalisation; so no
``+stain`` PEKA arm). Fold A is reported apart.

Writes, per part, ``<part>.csv`` (arm x probe x seed x patient), ``<part>_per_gene.csv`` and
``<part>.txt`` (its printed header: command, costs, wall time) under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("STDISTILL_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from expression_her2st import fold_teacher  # noqa: E402

import stdistill as sd  # noqa: E402
from stdistill._utils import atomic_path  # noqa: E402

ENCODER = "effnet-lite0-imagenet"
KEY = f"X_{ENCODER}"
CONTEXT_UM = 224.0  # context field of view: 2x the 112 um patch, resized to the encoder's 224 px
ARMS = {  # arm: (stain normalised, augmented views, context features)
    "none": (False, False, False),
    "+stain": (True, False, False),
    "+views": (False, True, False),
    "+context": (False, False, True),
    "all": (True, True, True),
}
APART = "A"  # HER2ST patient whose images are 3.2 um/px copies: reported apart
MAP_GENE = "ERBB2"
PROBES = {"hest": False, "clipped": True}  # probe name: clip
TEACHER_DIM = 32  # PEKA's expression teacher: embedding width (as expression_her2st.py's --n-components)


def load(root: str | None, smoke: bool = False):
    """All HER2ST sections (for PEKA's teacher) and the imaged ones."""
    full = _common.her2st(root, smoke)
    return full, sd.io.subset_sections(full, [s for s in sd.io.sections(full) if sd.io.has_image(full, s)])


def extract(img, args, say=print) -> dict:
    """Plain / Macenko patch and context features into ``img.obsm``; returns {(stain, view_seed): views}.

    ``say``s each pass's cost (0 patches computed: read from the feature cache)."""
    kw = {"precision": args.precision}
    views = {}
    for stain in (False, True):
        norm = {"stain_norm": "macenko"} if stain else {}
        key = KEY + ("_macenko" if stain else "")
        for vs in args.view_seeds:
            r = sd.features.run_extraction(img, ENCODER, key_added=key, views=args.views, view_seed=vs, **norm, **kw)
            views[(stain, vs)] = np.asarray(img.obsm.pop(key + "_views"))
            say(f"extraction {'macenko' if stain else 'plain'} (view seed {vs}): clean pass {r.seconds_clean:.1f} s, "
                  f"{r.views} views {r.seconds_views:.1f} s ({r.patches_computed} patches computed, {r.precision})")
        r = sd.features.run_extraction(img, ENCODER, key_added=key + "_ctx", size_um=CONTEXT_UM, **norm, **kw)
        say(f"extraction {'macenko' if stain else 'plain'} context ({CONTEXT_UM:.0f} um): {r.seconds_clean:.1f} s "
              f"({r.patches_computed} patches computed)")
    return views


def _rows(res, arm: str, probe: str, seed: int) -> tuple[list[dict], dict]:
    """Per held-out patient: score rows, and per-gene r (the 50 scored genes) keyed by (arm, probe, seed, patient)."""
    rows, genes = [], {}
    for f in res.per_fold.itertuples():
        p = f.test_patients
        rows.append({"arm": arm, "probe": probe, "seed": seed, "patient": p, "pearson": f.pearson_mean,
                     "r_erbb2": getattr(f, f"r_{MAP_GENE}"), "n_train_rows": f.n_train_rows})
        genes[(arm, probe, seed, p)] = res.per_gene.loc[res.genes[f.fold], f.fold]
    return rows, genes


def probe_arms(img, views: dict, args) -> tuple[list[dict], dict]:
    """Every arm x probe (x view seed) through ``bench.expression`` (genes chosen on each fold's training sections)."""
    rows, per_gene = [], {}
    for arm in args.arms:
        stain, with_views, context = ARMS[arm]
        key = KEY + ("_macenko" if stain else "")
        keys = [key, key + "_ctx"] if context else [key]
        for vs in args.view_seeds if with_views else [-1]:
            if with_views:
                img.obsm[key + "_views"] = views[(stain, vs)]
            for probe, clip in PROBES.items():
                res = sd.bench.expression(img, keys, folds=args.folds, views=with_views, svd_solver=args.svd_solver, clip=clip,
                                          extra_genes=[MAP_GENE], key_added=None)
                r, g = _rows(res, arm, probe, vs)
                rows += r
                per_gene.update(g)
            img.obsm.pop(key + "_views", None)
    return rows, per_gene


def chosen_arm(img, views: dict, args, say=print) -> tuple[list[dict], dict]:
    """Arm ``chosen``: every arm a feature candidate of ``bench.expression`` (view arms with the first
    view seed): per held-out patient and probe, the arm with the best mean Pearson over
    leave-one-patient-out folds *inside* the training patients (the held-out patient is in none of
    them), fitted on all training patients and scored on the held-out one, as that arm is. Ties go
    to the earlier arm of ``args.arms`` (the simpler)."""
    vs0 = args.view_seeds[0]
    cands = {}
    for arm in args.arms:
        stain, with_views, context = ARMS[arm]
        key = KEY + ("_macenko" if stain else "")
        cands[arm] = {"key": [key, key + "_ctx"] if context else [key], "views": with_views}
        if with_views:
            img.obsm[key + "_views"] = views[(stain, vs0)]
    res = {probe: sd.bench.expression(img, cands, folds=args.folds, svd_solver=args.svd_solver, clip=clip, extra_genes=[MAP_GENE],
                                      key_added=None) for probe, clip in PROBES.items()}
    for key in (KEY, KEY + "_macenko"):
        img.obsm.pop(key + "_views", None)
    by, genes = {}, {}
    for probe, r in res.items():
        rows, g = _rows(r, "chosen", probe, -1)
        genes.update(g)
        for row, f in zip(rows, r.per_fold.itertuples()):
            by[(f.fold, probe)] = dict(row, chosen_arm=f.chosen, inner_pearson=f.inner_pearson)
    out = []
    for fold in res["hest"].per_fold["fold"]:  # rows and messages per held-out patient, then probe
        for probe, r in res.items():
            out.append(by[(fold, probe)])
            say(f"chosen inside the training patients of fold {out[-1]['patient']}, {probe} probe: {out[-1]['chosen_arm']} "
                "(inner mean Pearson " + ", ".join(f"{a} {r.selection.loc[fold, a]:.4f}" for a in args.arms) + ")")
    return out, genes


def peka_arm(full, img, fold_genes: dict, args, say=print) -> tuple[list[dict], dict]:
    """PEKA (PekaConfig defaults, ``--peka-epochs`` epochs, no validation) per fold and seed, probed like the arms."""
    from stdistill.recipes import PEKA, PekaConfig

    rows, per_gene = [], {}
    for fold in args.folds or sd.pp.folds(img):
        p = fold.patients_of("test")[0]
        tr = sd.io.subset_sections(img, list(fold.train))
        cfg0 = PekaConfig(max_epochs=args.peka_epochs, train_positions=16, head_ridge=10.0)
        T, kd = fold_teacher(full, tr, fold.patients_of("train"), TEACHER_DIM, cfg0.n_clusters, args.peka_seeds)
        for seed in args.peka_seeds:
            t = time.time()
            m = PEKA(ENCODER, replace(cfg0, seed=seed)).fit(tr, T, fold_genes[p], kd_classifier=kd[seed])
            m.transform(img, key_added="X_peka")
            for probe, clip in PROBES.items():
                res = sd.bench.expression(img, "X_peka", folds=[fold], genes=fold_genes[p], svd_solver=args.svd_solver,
                                          clip=clip, extra_genes=[MAP_GENE], key_added=None)
                r, g = _rows(res, "peka", probe, seed)
                rows += r
                per_gene.update(g)
            say(f"PEKA fold {p} seed {seed}: " + ", ".join(f"{r['probe']} probe r {r['pearson']:.4f} ({MAP_GENE} {r['r_erbb2']:.3f})"
                                                          for r in rows[-len(PROBES):]) + f" [{time.time() - t:.0f} s]")
    img.obsm.pop("X_peka", None)
    return rows, per_gene


def _cell(x: pd.Series, spread: pd.Series | None = None) -> str:
    s = f"{x.mean():+.4f}" if spread is not None else f"{x.mean():.4f}"
    if len(x) > 1:
        s += f" +- {x.std(ddof=1):.4f}"
    return s + (f" [{spread.mean():.4f}]" if spread is not None else "")


def score_table(res: pd.DataFrame, col: str) -> pd.DataFrame:
    """arm x probe: per held-out patient the mean (+- sd over seeds where there are seeds) of ``col``,
    and per seed the mean over B, C and over all patients (mean +- sd over seeds)."""
    pats = sorted(res["patient"].unique())
    rest = [p for p in pats if p != APART]
    out = {}
    for (arm, probe), d in res.groupby(["arm", "probe"], sort=False):
        w = d.pivot(index="seed", columns="patient", values=col)
        row = {f"{p}{' *' if p == APART else ''}": _cell(w[p]) for p in pats}
        row[f"mean {'+'.join(rest)}"] = _cell(w[rest].mean(1))
        row[f"mean {'+'.join(pats)}"] = _cell(w[pats].mean(1))
        out[(arm, probe)] = row
    return pd.DataFrame(out).T


def paired_table(res: pd.DataFrame, per_gene: dict, col: str = "pearson") -> pd.DataFrame:
    """arm - none per held-out patient (same probe): mean +- sd over seeds; for ``pearson`` also
    [standard error over the 50 genes of the per-gene differences, mean over seeds]."""
    pats = sorted(res["patient"].unique())
    rest = [p for p in pats if p != APART]
    base = res[res["arm"] == "none"].set_index(["probe", "patient"])[col]
    out = {}
    for (arm, probe), d in res[res["arm"] != "none"].groupby(["arm", "probe"], sort=False):
        d = d.assign(delta=d[col].to_numpy() - base.loc[list(zip(d["probe"], d["patient"]))].to_numpy())
        if col == "pearson":
            d["se"] = [(per_gene[(arm, probe, s, p)] - per_gene[("none", probe, -1, p)]).pipe(
                lambda x: x.std(ddof=1) / np.sqrt(x.notna().sum())) for s, p in zip(d["seed"], d["patient"])]
        w = d.pivot(index="seed", columns="patient", values="delta")
        se = d.pivot(index="seed", columns="patient", values="se") if col == "pearson" else None
        row = {f"{p}{' *' if p == APART else ''}": _cell(w[p], se[p] if se is not None else pd.Series(dtype=float))
               for p in pats}
        row[f"mean {'+'.join(rest)}"] = _cell(w[rest].mean(1), pd.Series(dtype=float))
        out[(arm, probe)] = row
    return pd.DataFrame(out).T.replace(r" \[nan\]", "", regex=True)


def chosen_table(res: pd.DataFrame) -> pd.DataFrame | None:
    """The ``chosen`` arm: per held-out patient and probe, the arm chosen inside the training
    patients and its inner mean Pearson (None without that arm)."""
    if "chosen_arm" not in res or not (res["arm"] == "chosen").any():
        return None
    t = res.loc[res["arm"] == "chosen", ["patient", "probe", "chosen_arm", "inner_pearson", "pearson"]]
    return t.rename(columns={"chosen_arm": "arm chosen", "inner_pearson": "its inner mean Pearson",
                             "pearson": "held-out mean Pearson"}).reset_index(drop=True)


def report(res: pd.DataFrame, per_gene: dict, results=None) -> str:
    """The printed tables (each also into ``results`` when given)."""
    paired = (res["arm"] == "none").any()  # the differences need the none arm (the probes part)
    tabs = {"pearson": score_table(res, "pearson"), "pearson_vs_none": paired_table(res, per_gene) if paired else None,
            "erbb2": score_table(res, "r_erbb2"), "erbb2_vs_none": paired_table(res, per_gene, "r_erbb2") if paired else None}
    for name, t in tabs.items():
        if results is not None and t is not None:
            results.table(name, t.rename_axis(["arm", "probe"]))
    chosen = chosen_table(res)
    if results is not None and chosen is not None:
        results.table("chosen", chosen, digits={"its inner mean Pearson": 4, "held-out mean Pearson": 4})
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_colwidth", 40):
        return "\n".join([
            "== mean Pearson over the 50 genes, per held-out patient (mean +- sd over seeds where seeded) ==",
            tabs["pearson"].to_string(),
            *(["== arm - none, mean Pearson (same probe; +- sd over seeds; [standard error over the 50 genes]) ==",
               tabs["pearson_vs_none"].to_string()] if paired else []),
            f"== {MAP_GENE} r per held-out patient ==",
            tabs["erbb2"].to_string(),
            *([f"== arm - none, {MAP_GENE} r (+- sd over seeds) ==",
               tabs["erbb2_vs_none"].to_string()] if paired else []),
            *(["== the arm chosen inside the training patients (the chosen rows above) ==",
               chosen.round(4).to_string(index=False)]
              if chosen is not None else []),
            f"* {APART}: A1/A2 are ~3.2 um/px copies (a 112 um patch is ~35 px upsampled to 224): a resolution shift "
            "as much as a patient shift; the 'mean' columns without it are the cleaner read.",
        ])


def _save(out: Path, part: str, rows: list[dict], per_gene: dict, header: list[str]) -> None:
    """``<part>.csv`` (scores), ``<part>_per_gene.csv`` (long: arm, probe, seed, patient, gene, r), ``<part>.txt`` (header)."""
    long = pd.concat([pd.DataFrame({"arm": k[0], "probe": k[1], "seed": k[2], "patient": k[3], "gene": v.index, "r": v.to_numpy()})
                      for k, v in per_gene.items()])
    for name, df in ((f"{part}.csv", pd.DataFrame(rows)), (f"{part}_per_gene.csv", long)):
        with atomic_path(out / name) as p:
            df.to_csv(p, index=False)
    with atomic_path(out / f"{part}.txt") as p:
        p.write_text("\n".join(header) + "\n")


def _load(out: Path, parts) -> tuple[pd.DataFrame, dict, list[str]]:
    rows, per_gene, header = [], {}, []
    for part in parts:
        if not (out / f"{part}.csv").is_file():
            raise SystemExit(f"{out / (part + '.csv')} is missing: run with --parts {part} first")
        rows.append(pd.read_csv(out / f"{part}.csv"))
        long = pd.read_csv(out / f"{part}_per_gene.csv")
        per_gene.update({k: g.set_index("gene")["r"] for k, g in long.groupby(["arm", "probe", "seed", "patient"], sort=False)})
        header += [f"-- part {part} --", *(out / f"{part}.txt").read_text().splitlines()]
    return pd.concat(rows, ignore_index=True), per_gene, header


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/transfer_expression_her2st")
    ap.add_argument("--parts", nargs="+", default=["probes"], choices=["probes", "peka"],
                    help="what to run: the probe arms (default) and/or the PEKA arm (about 20 min more on 2 busy "
                         "cores); each writes its own files under --out")
    ap.add_argument("--from-csv", action="store_true", help="only print the tables of --parts from --out's files")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--views", type=int, default=1, help="augmented views per view seed (each costs one extraction pass)")
    ap.add_argument("--view-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--peka-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--peka-epochs", type=int, default=2)
    ap.add_argument("--svd-solver", default="covariance_eigh", choices=["covariance_eigh", "full"], help="PCA solver of every HEST probe here (exact either way; --smoke: full, cheaper for a few dozen spots)")
    _common.add_args(ap, root="her2st")
    args = ap.parse_args()
    _common.smoke(args, parts=["probes", "peka"], view_seeds=[0], views=1, peka_seeds=[0], peka_epochs=1, svd_solver="full")
    results = _common.Results(args, seeds=sorted(set(args.view_seeds) | set(args.peka_seeds)), precision=args.precision,
                              variant="-".join(args.parts) if args.parts != ["probes"] else None)
    out = Path(args.out)
    if not args.from_csv:
        run_parts(args, out)
    res, per_gene, header = _load(out, args.parts)
    print("\n".join(header))
    print(report(res, per_gene, results))
    return results.finish()


def run_parts(args, out: Path) -> None:
    """Run ``args.parts``; each part's scores, per-gene r and header lines go to ``out``."""
    import torch

    for part in args.parts:
        t0 = time.time()
        header = [f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python {' '.join(sys.argv)} "
                  f"(this part: --parts {part})",
                  f"encoder {ENCODER} (ImageNet, not a pathology model), precision {args.precision}, {os.cpu_count()} CPU "
                  f"cores, {torch.get_num_threads()} torch thread(s); "
                  + (f"view seeds {args.view_seeds} x {args.views} view(s)" if part == "probes" else
                     f"PEKA seeds {args.peka_seeds}, {args.peka_epochs} epochs")]
        full, img = load(args.root, args.smoke)
        header.append(f"imaged sections {sd.io.sections(img)} ({img.n_obs} spots)")
        # --smoke: one held-out patient, not A (so the tables' "without A" columns are filled); else every fold
        args.folds = [f for f in sd.pp.folds(img) if f.patients_of("test") != [APART]][:1] if args.smoke else None
        print("\n".join(header), flush=True)
        def say(msg: str) -> None:  # printed now and kept in the part's header
            print(msg, flush=True)
            header.append(msg)

        if part == "probes":
            views = extract(img, args, say)
            rows, per_gene = probe_arms(img, views, args)
            if "none" in args.arms:
                more, more_genes = chosen_arm(img, views, args, say)
                rows += more
                per_gene.update(more_genes)
        else:
            genes = {f.patients_of("test")[0]: sd.pp.hest_genes(img, 50, sections=list(f.train))
                     for f in args.folds or sd.pp.folds(img)}
            rows, per_gene = peka_arm(full, img, genes, args, say)
        say(f"part {part}: wall {time.time() - t0:.0f} s")
        _save(out, part, rows, per_gene, header)


if __name__ == "__main__":
    sys.exit(main())
