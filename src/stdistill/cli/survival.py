"""``stdistill survival fit|predict|evaluate``: slide-level survival (AMKD) from the shell.

A cohort is a clinical table (one row per patient: ``patient``, ``time``, ``event``) beside slide
features, either a folder of TRIDENT/CLAM ``.h5`` files (``--features``) or tile AnnData from
``pp.tile`` + ``features.extract`` (``--tiles``), and optionally a bulk RNA table (``--rna``).
Models are folders (``config.json`` + ``model.safetensors``); an AMKD student's teacher is saved
beside it in ``teacher/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .._errors import StdistillError
from .._keys import Key
from ..bundle import check_target
from ._common import _numbers, _split

DATASETS = ("her2st_survival", "simulated_survival")
METHOD_HELP = ("abmil, snn, late_fusion, gge_teacher, amkd, amkd_no_enhancement, amkd_no_rr, amkd_fixed_weight, "
               "logit_kd, clinical")


def _cohort(clinical: Optional[Path], features: Optional[Path], tiles: Optional[Path], rna: Optional[Path],
            dataset: Optional[str], cols: dict, need_labels: bool = True):
    """The cohort from files (or a semi-synthetic/simulated dataset name)."""
    import numpy as np
    import pandas as pd

    from ..io._cohort import (
        cohort_from_tiles,
        find_bags,
        read_clinical,
        read_cohort,
        read_rna,
    )

    if dataset is not None:
        if dataset not in DATASETS:
            raise StdistillError(f"--dataset must be one of {DATASETS}, got {dataset!r}")
        from .. import datasets

        return getattr(datasets, dataset)()
    if (features is None) == (tiles is None):
        raise StdistillError("give exactly one of --features (TRIDENT/CLAM .h5 folder) and --tiles (.h5ad)")
    if clinical is not None:
        table = read_clinical(clinical, patient_col=cols["patient"], time_col=cols["time"], event_col=cols["event"])
    elif need_labels:
        raise StdistillError("--clinical (patient, time, event) is required here")
    else:  # prediction only: one unlabelled patient per slide
        from ..io.h5ad import read_h5ad

        ids = list(find_bags(features)) if features is not None else sorted(set(read_h5ad(tiles).obs[Key.obs.patient].astype(str)))
        table = pd.DataFrame({"time": np.zeros(len(ids)), "event": np.zeros(len(ids), int)}, index=ids)
    if features is not None:
        return read_cohort(table, features, rna, rna_orient=cols["orient"], slide_col=cols["slide"])
    from ..io.h5ad import read_h5ad

    R = read_rna(rna, list(table.index), orient=cols["orient"]) if rna is not None else None
    return cohort_from_tiles(read_h5ad(tiles), table, R)


def _base(loss: str, epochs: int, dim: int, lr: float, batch_size: int, seed: int, genesets: str,
          clinical_cols: Optional[str], accelerator: str, rna_log1p: bool):
    from ..recipes._survival import SurvivalConfig

    return SurvivalConfig(loss=loss, max_epochs=epochs, dim=dim, lr=lr, batch_size=batch_size, seed=seed,
                          genesets=genesets, clinical=tuple(_split(clinical_cols)), accelerator=accelerator,
                          rna_log1p=rna_log1p)


def _methods(names: list[str], base):
    """The requested methods plus the teachers they need, teachers first."""
    from dataclasses import replace

    from ..recipes._survival import Method, amkd_methods

    known = {m.name: m for m in amkd_methods(base)}
    if base.clinical:
        known["clinical"] = Method("clinical", replace(base, kind="clinical"))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StdistillError(f"unknown methods {unknown}; choose from {', '.join(known)}"
                             + ("" if base.clinical else " (clinical needs --clinical-cols)"))
    want = set(names) | {known[n].teacher for n in names if known[n].teacher}
    out = [m for m in known.values() if m.name in want]
    return [m if m.epochs_like in want else replace(m, epochs_like=None) for m in out]


def _csv(df, path: Path) -> None:
    from .._utils import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp)


_CLINICAL = typer.Option(None, "--clinical", help="Clinical CSV/TSV: one row per patient (patient, time, event, ...).")
_FEATURES = typer.Option(None, "--features", help="Folder of slide feature files (TRIDENT features_<enc>/ or CLAM h5_files/).")
_TILES = typer.Option(None, "--tiles", help="Tile .h5ad (pp.tile + features.extract) instead of --features.")
_RNA = typer.Option(None, "--rna", help="Bulk RNA CSV/TSV (patients x genes or genes x patients; gene symbols).")
_DATASET = typer.Option(None, "--dataset", help=f"Instead of files: {' or '.join(DATASETS)} (semi-synthetic / simulated).")


def _cols(patient_col: str, time_col: str, event_col: str, slide_col: str, rna_orient: str) -> dict:
    return {"patient": patient_col, "time": time_col, "event": event_col, "slide": slide_col, "orient": rna_orient}


def _fit_all(c, methods, select: bool, seed: int, genesets: str) -> dict:
    """Fit every method in order (teachers first), each choosing its epochs on inner patients with ``select``."""
    from dataclasses import replace

    from ..recipes._survival import SurvivalModel, select_survival

    fitted = {}
    for m in methods:
        cfg = m.config
        teacher = fitted.get(m.teacher)
        if select:
            tf = (lambda _s, ci, _c=fitted[m.teacher].config: SurvivalModel(_c).fit(ci, genesets=genesets)) if m.teacher else None
            sel = select_survival(c, cfg, teacher_fn=tf, genesets=genesets)
            cfg = sel.config()
            typer.echo(f"{m.name}: {sel}")
        fitted[m.name] = SurvivalModel(replace(cfg, seed=seed)).fit(c, teacher=teacher, genesets=genesets)
        typer.echo(_fitted_line(m.name, c, fitted[m.name]))
    return fitted


def fit(
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
    clinical: Optional[Path] = _CLINICAL, features: Optional[Path] = _FEATURES, tiles: Optional[Path] = _TILES,
    rna: Optional[Path] = _RNA, dataset: Optional[str] = _DATASET,
    method: str = typer.Option("amkd", help=f"One of: {METHOD_HELP}."),
    loss: str = typer.Option("nll", help="'nll' (discrete time, 4 bins from the training events) or 'cox'."),
    epochs: int = typer.Option(20, help="Epochs (with --select: the most tried)."),
    select: bool = typer.Option(False, help="Choose the epochs on inner patients (3 folds) before the final fit."),
    dim: int = typer.Option(64), lr: float = typer.Option(5e-4), batch_size: int = typer.Option(16),
    genesets: str = typer.Option("hallmark", help="Gene families: 'hallmark', 'progeny' or a .gmt/.csv file."),
    rna_log1p: bool = typer.Option(False, help="log1p the RNA values first (counts, TPM, RSEM)."),
    clinical_cols: Optional[str] = typer.Option(None, help="Comma-separated clinical columns (method 'clinical')."),
    test_patients: Optional[str] = typer.Option(None, help="Comma-separated patients to leave out of training."),
    patient_col: str = typer.Option("patient"), time_col: str = typer.Option("time"),
    event_col: str = typer.Option("event"), slide_col: str = typer.Option("slide"),
    rna_orient: str = typer.Option("auto", help="'auto', 'patients' (rows) or 'genes' (rows)."),
    seed: int = typer.Option(0), accelerator: str = typer.Option("cpu"),
) -> None:
    """Train a survival model (AMKD: teacher, then the H&E-only student) on the cohort's patients."""
    check_target(out)
    base = _base(loss, epochs, dim, lr, batch_size, seed, genesets, clinical_cols, accelerator, rna_log1p)
    methods = _methods([method], base)
    c = _cohort(clinical, features, tiles, rna, dataset, _cols(patient_col, time_col, event_col, slide_col, rna_orient))
    held = _split(test_patients)
    if held:
        c = c.subset([p for p in c.patients if p not in set(held)])
    fitted = _fit_all(c, methods, select, seed, c.meta.get("genesets", genesets))
    final = fitted[method]
    final.save(out)
    if methods[-1].teacher:
        fitted[methods[-1].teacher].save(out / "teacher")
        typer.echo(f"teacher -> {out / 'teacher'}")
    typer.echo(f"saved {out} ({final.config.kind}; predicts from {'slides only' if final.config.kind in ('abmil', 'student') else 'its inputs'})")


def predict(
    model: Path = typer.Argument(..., help="A model folder (stdistill survival fit)."),
    out: Path = typer.Option(..., "--out", "-o", help="CSV of risks (one row per patient)."),
    clinical: Optional[Path] = _CLINICAL, features: Optional[Path] = _FEATURES, tiles: Optional[Path] = _TILES,
    rna: Optional[Path] = _RNA,
    plot: Optional[Path] = typer.Option(None, help="Folder for figures: attention maps (and Kaplan-Meier with --clinical)."),
    n_maps: int = typer.Option(3, help="Attention maps for this many slides."),
    patient_col: str = typer.Option("patient"), time_col: str = typer.Option("time"),
    event_col: str = typer.Option("event"), slide_col: str = typer.Option("slide"),
    rna_orient: str = typer.Option("auto"),
) -> None:
    """Risk per patient; an H&E-only model (ABMIL, AMKD student) needs slide features only."""
    from ..recipes._survival import SurvivalModel

    m = SurvivalModel.load(model)
    c = _cohort(clinical, features, tiles, rna, None, _cols(patient_col, time_col, event_col, slide_col, rna_orient),
                need_labels=False)
    if m.config.kind in ("abmil", "student"):
        c = c.without_rna()
    risk = m.predict(c)
    df = risk.to_frame()
    group = m.predict_group(c, risk) if m.risk_cut_ is not None else None  # the cut stored from training, never this cohort's
    if group is not None:
        df = df.join(group)
    if m.config.loss == "nll":
        df = df.join(m.predict_survival(c).add_prefix("S"))
    _csv(df, out)
    typer.echo(f"{len(df)} patients -> {out}")
    if clinical is not None and c.event.sum() > 0:
        from ..metrics import cindex

        typer.echo(f"Harrell C-index on these patients: {cindex(c.time, c.event, risk.to_numpy()):.3f}")
    if plot is not None:
        _plots(m, c, risk, plot, n_maps, tiles, labelled=clinical is not None, group=group)


def _write_cv(res, table, sel, out: Path) -> None:
    """results.csv, table.csv, selection.csv (when epochs were chosen) and cindex_bars.png."""
    from .. import pl

    out.mkdir(parents=True, exist_ok=True)
    _csv(res.set_index("fold"), out / "results.csv")
    _csv(table, out / "table.csv")
    if len(sel):
        _csv(sel.assign(curve=sel["curve"].map(lambda v: " ".join(f"{x:.3f}" for x in v))), out / "selection.csv")
    typer.echo(table.round(3).to_string())
    pl.cindex_bars(table, path=out / "cindex_bars.png")


def evaluate(
    out: Path = typer.Option(Path("stdistill_out/survival"), "--out", "-o", help="Folder for tables and figures."),
    clinical: Optional[Path] = _CLINICAL, features: Optional[Path] = _FEATURES, tiles: Optional[Path] = _TILES,
    rna: Optional[Path] = _RNA, dataset: Optional[str] = _DATASET,
    methods: str = typer.Option("abmil,snn,gge_teacher,amkd", help=f"Comma list of: {METHOD_HELP}."),
    folds: int = typer.Option(5, help="Patient-level folds (stratified by event)."),
    groups: Optional[str] = typer.Option(None, help="Leave-one-group-out on this clinical column instead of folds."),
    seeds: str = typer.Option("0", help="Comma list of seeds."),
    select: bool = typer.Option(True, help="Choose epochs on inner patients of each training fold."),
    loss: str = typer.Option("nll"), epochs: int = typer.Option(20), dim: int = typer.Option(64),
    lr: float = typer.Option(5e-4), batch_size: int = typer.Option(16),
    genesets: str = typer.Option("hallmark"), rna_log1p: bool = typer.Option(False),
    clinical_cols: Optional[str] = typer.Option(None),
    patient_col: str = typer.Option("patient"), time_col: str = typer.Option("time"),
    event_col: str = typer.Option("event"), slide_col: str = typer.Option("slide"),
    rna_orient: str = typer.Option("auto"), accelerator: str = typer.Option("cpu"),
) -> None:
    """Patient-level cross-validation: Harrell/Uno C-index and AUC, mean +- sd over seeds."""
    from ..recipes._survival import cv_table, patient_folds, survival_cv

    base = _base(loss, epochs, dim, lr, batch_size, 0, genesets, clinical_cols, accelerator, rna_log1p)
    ms = _methods(_split(methods), base)
    c = _cohort(clinical, features, tiles, rna, dataset, _cols(patient_col, time_col, event_col, slide_col, rna_orient))
    if groups is None and dataset == "her2st_survival":
        groups = "source_patient"  # windows of one source patient never straddle a split
    fl = patient_folds(c, folds, groups=groups)
    res, sel = survival_cv(c, ms, fl, seeds=_numbers(seeds, int, "--seeds"), select=select, groups=groups,
                           genesets=c.meta.get("genesets", genesets), log=typer.echo)
    _write_cv(res, cv_table(res), sel, out)
    typer.echo(f"tables and figures -> {out}")


def register(app: typer.Typer) -> None:
    """``stdistill survival fit|predict|evaluate``."""
    sub = typer.Typer(help="Slide-level survival: AMKD (H&E student distilled from a pathology + genomics teacher).",
                      no_args_is_help=True)
    app.add_typer(sub, name="survival")
    for name, fn in (("fit", fit), ("predict", predict), ("evaluate", evaluate)):
        sub.command(name)(fn)


def _fitted_line(name: str, cohort, model) -> str:
    """One line on a fitted model: epochs, patients, events, patients without RNA, seconds."""
    miss = model.n_missing_rna_
    return (f"{name}: {model.config.kind}, {model.config.max_epochs} epochs, {len(cohort.patients)} patients "
            f"({int(cohort.event.sum())} events{f', {miss} without RNA' if miss else ''}), {model.fit_seconds_:.1f} s")


def _km(cohort, risk, group, folder: Path) -> None:
    """Kaplan-Meier of the risk groups: the model's stored training cut (``group``), else (older
    models without one) this cohort's median risk, said as such."""
    from .. import pl

    if group is None:
        typer.echo("the model stores no risk cut (saved by an older version): groups split at this cohort's median risk")
    elif group.nunique() < 2:
        typer.echo(f"Kaplan-Meier skipped: every patient is '{group.iloc[0]}' at the model's training cut")
        return
    fig = pl.km_risk_groups(cohort.time, cohort.event, risk.to_numpy(), path=folder / "km_risk_groups.png",
                            groups=None if group is None else group.to_numpy())
    typer.echo(f"Kaplan-Meier: {folder / 'km_risk_groups.png'} (log-rank p = {fig.logrank_p:.2g})")


def _plots(model, cohort, risk, folder: Path, n_maps: int, tiles: Optional[Path], labelled: bool, group=None) -> None:
    """Kaplan-Meier by predicted risk group (labelled cohorts) and attention maps of the first slides."""
    import pandas as pd

    from .. import pl

    folder.mkdir(parents=True, exist_ok=True)
    if labelled and cohort.event.sum() > 0:
        _km(cohort, risk, group, folder)
    if model.config.kind not in ("abmil", "student", "late_fusion", "gge"):
        return
    att = model.attention(cohort)
    adata = _slides_adata(cohort, tiles)
    for s in list(att)[:n_maps]:
        ids = cohort.instance_ids.get(s)
        if ids is None:
            ids = [f"{s}_i{i}" for i in range(len(att[s]))]
        pl.survival_attention(adata, pd.Series(att[s], index=ids), section=s, path=folder / f"attention_{s}.png")
        typer.echo(f"attention map: {folder / f'attention_{s}.png'}")


def _slides_adata(cohort, tiles: Optional[Path]):
    """The tile AnnData (with images) when given, else coordinate-only sections from the feature files."""
    import numpy as np

    from ..io._section import concat, new_section
    from ..io.h5ad import read_h5ad

    if tiles is not None:
        return read_h5ad(tiles)
    parts = []
    for s, xy in cohort.coords.items():
        step = np.median(np.diff(np.unique(xy[:, 0]))) if len(np.unique(xy[:, 0])) > 1 else 1.0
        parts.append(new_section(None, genes=[], spots=[f"{s}_i{i}" for i in range(len(xy))], xy_px=xy + step / 2,
                                 section=s, patient=cohort.slide_patient[s], microns_per_pixel=1.0,
                                 spot_diameter_um=float(step), require_inside=False))
    if not parts:
        raise StdistillError("no coordinates in the feature files: attention maps need 'coords' (or --tiles)")
    return concat(parts) if len(parts) > 1 else parts[0]
