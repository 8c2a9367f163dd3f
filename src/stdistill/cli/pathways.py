"""``stdistill pathways score|stamp|predict``: pathway activities of the spots, STAMP training and
H&E-only prediction with maps."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .._errors import StdistillError
from .._keys import Key
from ..bundle import check_target
from ._common import (
    GRID_WITH_VAL,
    _numbers,
    _split,
    bundle_out_option,
    chosen_sections,
    encoder_option,
    patient_split,
    print_selection,
    rank_option,
    ranks,
    run_dir_option,
    settings_grid,
    stain_norm_flag,
    stain_norm_option,
    test_patients_option,
    train_from_option,
    val_patients_option,
)

KEY = Key.obsm.pathway_scores
GENESETS_HELP = "'hallmark' (MSigDB Hallmark), 'progeny' (PROGENy top 100) or a .gmt/.csv/.tsv gene-set file."
METHOD_HELP = "'ulm', 'mlm', 'aucell' (decoupler) or 'mean_z' (no extra dependency)."


def _score(a, genesets, method: str, standardize: str, key: str, min_genes: int = 5, normalize: bool = True) -> dict:
    """Write ``obsm[key]`` and return a summary: kept and dropped sets, spots without a score."""
    import warnings

    import stdistill as sd

    if standardize not in ("section", "none"):
        raise StdistillError(f"--standardize must be 'section' or 'none', got {standardize!r}")
    net = sd.pp.genesets(genesets)  # a bad name or file fails here, before any work
    with warnings.catch_warnings():  # the dropped sets are in the summary instead
        warnings.filterwarnings("ignore", message="dropped .* gene sets")
        sd.pp.pathway_scores(a, genesets, method, normalize=normalize, min_genes=min_genes, key_added=key,
                             standardize=None if standardize == "none" else standardize)
    kept = [str(c) for c in a.obsm[key].columns]
    dropped = [s for s in dict.fromkeys(net["source"].astype(str)) if s not in set(kept)]
    return {"kept": kept, "dropped": dropped, "nan_spots": int(a.obsm[key].isna().any(axis=1).sum())}


def _print_score(c, s: dict, n_spots: int, min_genes: int) -> None:
    c.print(f"[bold]{len(s['kept'])} pathways x {n_spots} spots[/bold]")
    if s["dropped"]:
        more = f" (e.g. {', '.join(s['dropped'][:3])})"
        c.print(f"dropped {len(s['dropped'])} gene sets with fewer than {min_genes} genes detected{more}")
    if s["nan_spots"]:
        c.print(f"[yellow]{s['nan_spots']} spots without counts have no score (NaN)[/yellow]")


def score_split(split: dict, genesets: str, method: str, key: str = KEY, min_genes: int = 5) -> dict:
    """Score ``split["train"]`` (per-section standardised), then ``split["val"]`` and ``split["test"]``
    each on their own with the gene-set table cut to the pathways kept on the training patients, so
    no held-out spot takes part in choosing the sets or in the training targets (``mean_z``'s
    per-gene z-scores included). On a held-out part a kept set needs one detected gene; a set with
    none there is 0 (its section mean). Returns the training summary plus ``filled``
    (``{part: [sets set to 0]}``)."""
    import stdistill as sd

    s = _score(split["train"], genesets, method, "section", key, min_genes)
    net = sd.pp.genesets(genesets)
    kept = net[net["source"].astype(str).isin(s["kept"])]
    s["filled"] = {}
    for name in ("val", "test"):
        part = split[name]
        if part is None or part.n_obs == 0:
            continue
        try:
            h = _score(part, kept, method, "section", key, min_genes=1)
        except StdistillError as e:
            raise StdistillError(f"scoring the {name} patients on the training pathways: {e}") from None
        part.obsm[key] = part.obsm[key].reindex(columns=s["kept"], fill_value=0.0)
        if h["dropped"]:
            s["filled"][name] = h["dropped"]
    return s


def _finite(a, key: str):
    """``a`` without the spots whose activities are not all finite (no counts), and how many went."""
    import numpy as np

    ok = np.isfinite(np.asarray(a.obsm[key], dtype=float)).all(axis=1)
    return (a, 0) if ok.all() else (a[ok].copy(), int((~ok).sum()))


def per_pathway_pearson(a, measured_key: str, pred, by: str):
    """Pearson r of measured vs predicted activity per pathway (rows), one column per ``obs[by]``
    group, on the spots with finite measured values; ``None`` when nothing was measured."""
    import numpy as np
    import pandas as pd

    import stdistill as sd

    if measured_key not in a.obsm or not isinstance(a.obsm[measured_key], pd.DataFrame):
        return None
    names = [n for n in pred.columns if n in a.obsm[measured_key].columns]
    if not names:
        return None
    meas = a.obsm[measured_key][names].to_numpy(dtype=float)
    ok = np.isfinite(meas).all(axis=1)
    groups = a.obs[by].astype(str).to_numpy()
    cols = {}
    for g in pd.unique(groups[ok]):
        m = ok & (groups == g)
        cols[g] = sd.metrics.pearson_per_gene(meas[m], pred[names].to_numpy(dtype=float)[m], genes=names)
    return pd.DataFrame(cols) if cols else None


def _print_pearson(c, table, title: str, top: int = 5) -> None:
    from rich.table import Table

    mean = table.mean(axis=1, skipna=True).sort_values(ascending=False)
    t = Table(title=title, title_justify="left")
    t.add_column("pathway")
    t.add_column("Pearson r" if table.shape[1] == 1 else "mean r", justify="right")
    if table.shape[1] > 1:
        for col in table.columns:
            t.add_column(str(col), justify="right")

    def row(name, r, values=(), end_section=False):
        t.add_row(name, *(("n/a" if v != v else f"{v:.3f}") for v in (r, *values)), end_section=end_section)

    row(f"mean over {int(mean.notna().sum())} pathways", float(mean.mean()),
        table.mean(axis=0).tolist() if table.shape[1] > 1 else (), end_section=True)
    for name in mean.index[:top]:
        row(str(name), float(mean[name]), table.loc[name].tolist() if table.shape[1] > 1 else ())
    c.print(t)


def _print_settings(c, rows: dict) -> None:
    from rich.table import Table

    t = Table(title="STAMP settings", title_justify="left", show_header=False)
    t.add_column("setting", style="bold")
    t.add_column("value")
    for k, v in rows.items():
        t.add_row(k, str(v))
    c.print(t)


def score(
    data: str = typer.Argument(..., help="Spots with counts: .h5ad, Visium/her2st folder, or a dataset name."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad with obsm[KEY] (spots x pathways)."),
    genesets: str = typer.Option("hallmark", help=GENESETS_HELP),
    method: str = typer.Option("ulm", help=METHOD_HELP),
    standardize: str = typer.Option("section", help="'section' (z-score each pathway within each section) or 'none'."),
    key: str = typer.Option(KEY, help="obsm key of the activities."),
    min_genes: int = typer.Option(5, help="Drop gene sets with fewer member genes detected in the data."),
    normalize: bool = typer.Option(True, help="Counts are raw: score log1p counts per 10,000."),
) -> None:
    """Score pathway activities of every spot (pp.pathway_scores) and write them to an .h5ad."""
    from rich.console import Console

    import stdistill as sd
    from stdistill.io.summary import load_any

    if out.suffix != ".h5ad":
        raise StdistillError("output must end in .h5ad", out)
    sd.pp.genesets(genesets)  # check the gene sets before reading the data
    a = load_any(data)
    s = _score(a, genesets, method, standardize, key, min_genes, normalize)
    sd.io.write_h5ad(a, out)
    c = Console()
    _print_score(c, s, a.n_obs, min_genes)
    c.print(f'{method}, {genesets}, standardize {standardize} -> {out} (obsm["{key}"])')


def _stamp_data(c, data: str, test_patients: str, val_patients: Optional[str], genesets: str, method: str):
    """The patient split, with activities scored when the data lack them (sets and per-gene statistics
    from the training patients only), and the training and validation spots that have a score."""
    from stdistill.io.summary import load_any

    a = load_any(data)
    scored = KEY in a.obsm
    if not scored and a.n_vars == 0:
        raise StdistillError(f'the data hold neither obsm["{KEY}"] nor genes to score them from')
    split = patient_split(a, test_patients, val_patients)
    if not scored:  # sets and per-gene statistics from the training patients only
        s = score_split(split, genesets, method, KEY)
        c.print(f"scored {method} on {genesets} (sets chosen on the training patients):", end=" ")
        _print_score(c, s, split["train"].n_obs, 5)
        for name, sets in s["filled"].items():
            c.print(f"[yellow]{name} patients: {len(sets)} training pathways have no gene detected, set to 0 "
                    f"(e.g. {', '.join(sets[:3])})[/yellow]")
    tr, n_bad = _finite(split["train"], KEY)
    if tr.n_obs == 0:
        raise StdistillError(f'no training spot has finite obsm["{KEY}"] (spots without counts have no score)')
    if n_bad:
        c.print(f"[yellow]left out {n_bad} training spots without a score[/yellow]")
    va = _finite(split["val"], KEY)[0] if split["val"] is not None and split["val"].n_obs else None
    return split, tr, va


def _print_stamp(c, m, cfg, encoder: str, how: str, tr) -> None:
    """The settings a STAMP model was trained with and how they were chosen."""
    from dataclasses import asdict

    chosen = {k: v for k, v in asdict(cfg).items() if k in ("adapter", "lr", "w_reg", "w_con", "temperature", "val_metric")}
    _print_settings(c, {"encoder": encoder, "chosen by": how, **chosen, "rank": cfg.r, "epochs": cfg.max_epochs,
                        "best epoch": m.best_epoch_, "trainable share": f"{m.trainable_share:.2%}",
                        "training spots": f"{tr.n_obs} ({tr.obs['patient'].nunique()} patients)",
                        "pathways": len(m.pathways_),
                        "stain": f"{m.stain_['method']} onto {m.stain_['reference_section']}" if m.stain_ else "none"})


def _stamp_test(c, m, te, out: Path, test_patients: str) -> None:
    """Held-out Pearson per pathway on the test patients' scored spots, printed and written beside ``out``."""
    from .._utils import atomic_path

    table = None
    if te is not None and te.n_obs:
        te = _finite(te, KEY)[0]
        table = per_pathway_pearson(te, KEY, m.predict(te, inplace=False), by="patient") if te.n_obs else None
    if table is None:
        c.print("[yellow]no imaged test spot with a score: nothing to evaluate[/yellow]")
        return
    _print_pearson(c, table, f"Held-out Pearson r per pathway ({', '.join(_split(test_patients))}; {te.n_obs} spots)")
    csv = out.with_name(out.stem + "_test_pearson.csv")
    with atomic_path(csv) as tmp:
        table.rename_axis("pathway").to_csv(tmp)
    c.print(f"per-pathway Pearson: {csv}")


def stamp(
    data: str = typer.Argument(..., help="Sections with images and counts (or scores in obsm): .h5ad, folder or name."),
    test_patients: str = test_patients_option(),
    val_patients: Optional[str] = val_patients_option(),
    out: Path = bundle_out_option("stdistill_out/stamp"),
    encoder: str = encoder_option(),
    adapter: str = typer.Option("miss", help="'miss' (peft MiSS), 'lora' or 'none' (heads only)."),
    rank: Optional[str] = rank_option(),
    lr: str = typer.Option("1e-3", help="Learning rate; a comma list (e.g. 3e-4,1e-3) is a grid."),
    w_con: str = typer.Option("1.0", help="Contrastive (InfoNCE) loss weight; a comma list (e.g. 0,0.5,1) is a grid."),
    w_reg: float = typer.Option(1.0, help="Regression (MSE on z-scored activities) loss weight."),
    max_epochs: int = typer.Option(10, help="Epochs (with a grid: the most tried; the best epoch is chosen)."),
    batch_size: int = typer.Option(64),
    val_metric: str = typer.Option("ridge", help="Validation score: 'ridge' (probe Pearson), 'head' or 'mse'."),
    genesets: str = typer.Option("hallmark", help=f"When obsm[{KEY!r}] is absent: {GENESETS_HELP}"),
    method: str = typer.Option("ulm", help=f"When obsm[{KEY!r}] is absent: {METHOD_HELP}"),
    size_um: float = typer.Option(112.0, help="Patch side in micrometres."),
    px: int = typer.Option(224, help="Patch side in pixels (the encoder's input)."),
    train_from: Optional[str] = train_from_option(),
    stain_norm: Optional[str] = stain_norm_flag(),
    seed: int = typer.Option(0),
    run_dir: Optional[str] = run_dir_option(),
    accelerator: str = typer.Option("cpu"), devices: str = typer.Option("auto"), strategy: str = typer.Option("auto"),
) -> None:
    """Train STAMP on the imaged sections of the non-test patients; report held-out Pearson per pathway.

    Pathway activities are scored (per-section standardised) when the data do not hold them:
    on the training patients first (which sets are kept, mean_z's per-gene statistics), then on
    the validation and test patients apart, with the sets kept on the training patients.
    Comma lists in --lr, --w-con or --rank form a grid: settings and epochs are then chosen by
    leave-one-patient-out among the training patients (select_stamp), and the winner is
    trained on all training patients.
    """
    from rich.console import Console

    from stdistill.recipes import STAMP, StampConfig, select_stamp

    grid = settings_grid(lr=_numbers(lr, float, "--lr"), w_con=_numbers(w_con, float, "--w-con"), rank=ranks(rank))
    cfg = StampConfig(adapter=adapter, max_epochs=max_epochs, w_reg=w_reg, batch_size=batch_size, val_metric=val_metric,
                      size_um=size_um, px=px, train_from=train_from, seed=seed, stain_norm=stain_norm_option(stain_norm),
                      **grid[0])
    if len(grid) > 1 and val_patients:
        raise StdistillError(GRID_WITH_VAL)
    check_target(out)
    c = Console()
    split, tr, va = _stamp_data(c, data, test_patients, val_patients, genesets, method)
    kw = {"accelerator": accelerator, "devices": int(devices) if devices.isdigit() else devices, "strategy": strategy}
    how, sel = "fixed", None
    if len(grid) > 1:
        sel = select_stamp(tr, grid, pathways=KEY, base=cfg, encoder=encoder, **kw)
        cfg = sel.config()
        print_selection(c, sel)
        how = "grid, leave one training patient out"
    elif va is not None:
        how = f"early stopping on {', '.join(_split(val_patients))}"
    m = STAMP(encoder, cfg, **kw).fit(tr, KEY, val=va, run_dir=run_dir, selection=sel)
    if m.resumed_:
        c.print(f"{m.resumed_} from checkpoints in {run_dir}")
    m.save(out)
    _print_stamp(c, m, cfg, encoder, how, tr)
    _stamp_test(c, m, split["test"], out, test_patients)
    c.print(f"[bold]saved[/bold] {out}")


def _pathway_plots(c, a, secs: list[str], pred, table, plot: Path, plot_pathways: Optional[str]) -> None:
    """Maps of the chosen pathways per section (default the 4 best predicted, or the first 4) and Pearson bars."""
    import stdistill as sd

    names = _split(plot_pathways)
    if not names:
        best = table.mean(axis=1).dropna().sort_values(ascending=False).index if table is not None else pred.columns
        names = list(best[:4])
    for s in secs:
        p = plot / f"pathways_{s}.png"
        sd.pl.pathways(a, names, section=s, measured_key=KEY, path=p)
        c.print(f"map: {p}")
    if table is not None:
        p = plot / "pathway_bars.png"
        sd.pl.pathway_bars(table, path=p, title="Per-pathway Pearson r (mean over sections)", fold_label="section")
        c.print(f"bars: {p}")


def predict(
    model: Path = typer.Argument(..., help="A STAMP model bundle folder (stdistill pathways stamp)."),
    data: str = typer.Argument(..., help="Sections or H&E-only tiles with images (no genes needed): .h5ad, folder or name."),
    out: Path = typer.Option(..., "--out", "-o", help='Output .h5ad with obsm["X_stamp"] and obsm["pathway_pred"].'),
    sections: Optional[str] = typer.Option(None, help="Comma-separated sections (default: all with an image)."),
    plot: Optional[Path] = typer.Option(None, help="Draw maps (and per-pathway Pearson bars when measured) into this folder."),
    plot_pathways: Optional[str] = typer.Option(None, help="Pathways to map (default: the 4 best predicted, or the first 4)."),
    encoder: Optional[str] = typer.Option(None, help="Encoder, when the saved one is not in the registry."),
) -> None:
    """Aligned features and pathway activities from H&E alone with a trained STAMP model."""
    from rich.console import Console

    import stdistill as sd
    from stdistill.io.summary import load_any
    from stdistill.recipes import STAMP

    if out.suffix != ".h5ad":
        raise StdistillError("output must end in .h5ad", out)
    m = STAMP.load(model, encoder=encoder)
    a = load_any(data)
    secs = chosen_sections(a, sections, imaged=True)
    if not secs:
        raise StdistillError("no section has an image")
    a = sd.io.subset_sections(a, secs)
    m.transform(a)  # obsm["X_stamp"]
    m.predict(a)  # obsm["pathway_pred"]
    pred = a.obsm[Key.obsm.pathway_pred]
    sd.io.write_h5ad(a, out)
    c = Console()
    table = per_pathway_pearson(a, KEY, pred, by="section")
    if table is not None:
        _print_pearson(c, table, f'Pearson r per pathway with the measured obsm["{KEY}"] ({a.n_obs} spots)')
    if plot is not None:
        _pathway_plots(c, a, secs, pred, table, plot, plot_pathways)
    c.print(f'[bold]{pred.shape[0]} spots x {pred.shape[1]} pathways[/bold] -> {out} (obsm["X_stamp"], obsm["pathway_pred"])')


def register(app: typer.Typer) -> None:
    """``stdistill pathways score|stamp|predict``."""
    sub = typer.Typer(help="Pathway activities: scoring the spots, STAMP alignment of an encoder, H&E-only prediction.",
                      no_args_is_help=True)
    app.add_typer(sub, name="pathways")
    for name, fn in (("score", score), ("stamp", stamp), ("predict", predict)):
        sub.command(name)(fn)
