"""``stdistill expression bench|peka|predict``: HEST-protocol evaluation, PEKA training, prediction + maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .._keys import Key
from ..bundle import check_target
from ._common import (
    GRID_WITH_VAL,
    _not_rank_zero,
    _numbers,
    _split,
    bundle_out_option,
    devices_option,
    encoder_option,
    imaged_sections,
    num_nodes_option,
    patient_split,
    print_selection,
    rank_option,
    ranks,
    run_dir_option,
    settings_grid,
    stain_norm_flag,
    stain_norm_option,
    strategy_option,
    test_patients_option,
    train_from_option,
    trainer_kwargs,
    val_patients_option,
)


def _feature_candidates(text: str) -> str | list[str] | dict[str, list[str]]:
    """``--features`` of ``expression bench``: ``KEY``, ``KEY1+KEY2`` (concatenated) or candidates
    ``name=KEY,name=KEY1+KEY2`` (:func:`stdistill.bench.expression`'s dict)."""
    from .._errors import StdistillError

    if "=" not in text:
        keys = [k for k in text.split("+") if k]
        return keys[0] if len(keys) == 1 else keys
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, keys = item.partition("=")
        if not sep or not name or not keys or name in out:
            raise StdistillError(f"--features: {item!r} is not name=KEY or name=KEY1+KEY2 (or a name is repeated); "
                                 "candidates are separated by ','")
        out[name] = [k for k in keys.split("+") if k]
    return out


def _bench_data(data: str, features: str, encoder: Optional[str], images_only: bool):
    """The sections (imaged only, by default) and the feature key or candidates, extracting features when asked."""
    import stdistill as sd
    from stdistill.io.summary import load_any

    from .._errors import StdistillError

    a = load_any(data)
    if images_only:
        a = imaged_sections(a)
    fk = _feature_candidates(features)
    if isinstance(fk, str) and fk not in a.obsm:
        if encoder is None:
            raise StdistillError(f"no obsm[{features!r}]; pass --encoder to extract features first")
        sd.features.extract(a, encoder, key_added=fk)
    return a, fk


def _write_bench(res, out: Path) -> None:
    """per_fold.csv, per_gene.csv, selection.csv (with candidates), summary.json and pearson_bars.png."""
    import stdistill as sd

    from .._utils import atomic_path

    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    tables = [("per_fold.csv", res.per_fold, False), ("per_gene.csv", res.per_gene, True)]
    if res.selections:  # the candidates x inner folds table of every fold
        tables.append(("selection.csv", pd.concat([s.table.assign(fold=k) for k, s in res.selections.items()]), False))
    for name, df, index in tables:
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=index)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps({"pearson_mean": res.mean, "pearson_std": res.std, **res.params}, indent=2))
    sd.pl.pearson_bars(res.per_gene, path=out / "pearson_bars.png")


def bench(
    data: str = typer.Argument(..., help="An .h5ad file, a Visium/her2st folder, or a dataset name ('her2st')."),
    features: str = typer.Option(
        "X_effnet-lite0-imagenet", "--features", "-f",
        help="obsm key of patch features; KEY1+KEY2 concatenates keys; name=KEY,name=KEY1+KEY2,... are candidates, "
             "one chosen per fold inside its training patients (leave-one-patient-out; see selection.csv)."),
    encoder: Optional[str] = typer.Option(None, help="Extract features with this encoder first (stdistill encoders list)."),
    folds: Optional[str] = typer.Option(None, help="HEST splits/ folder, or a number of patient folds (default: leave-one-patient-out)."),
    genes: Optional[str] = typer.Option(None, help="Gene list (HEST var_50genes.json); default: 50 genes chosen on each fold's training sections."),
    alpha: str = typer.Option("hest", help="'hest' (100/(d*n_genes)), 'cv' (inner patient CV) or a number."),
    extra_genes: Optional[str] = typer.Option("ERBB2", help="Comma-separated genes reported beside the score."),
    images_only: bool = typer.Option(True, help="Keep only sections with an image (the others have no features)."),
    out: Path = typer.Option(Path("stdistill_out/expression_bench"), "--out", "-o", help="Output folder."),
) -> None:
    """HEST-Benchmark protocol: per-fold and per-gene Pearson, mean +- std over folds."""
    from rich.console import Console

    import stdistill as sd

    a, fk = _bench_data(data, features, encoder, images_only)
    fl = int(folds) if folds and folds.isdigit() else folds
    al = alpha if alpha in ("hest", "cv") else float(alpha)
    res = sd.bench.expression(a, fk, folds=fl, genes=genes, alpha=al, extra_genes=_split(extra_genes))
    _write_bench(res, out)
    c = Console()
    for k, sel in (res.selections or {}).items():
        print_selection(c, sel, f"fold {k}: feature candidates on its training patients")
    c.print(res.per_fold.to_string(index=False))
    c.print(f"[bold]{res.summary()}[/bold]  ({out})")


def _choose_peka(c, tr, train_all, teacher, g: list[str], own_genes: bool, grid: list[dict], cfg, encoder: str, kw: dict):
    """PEKA settings and epochs chosen by leave-one-patient-out among the training patients (each
    validation patient's genes and teacher left out); the selection printed on rank 0."""
    import stdistill as sd
    from stdistill.recipes import select_peka
    from stdistill.teachers import ExpressionTeacher

    def inner(inner_tr, val_p):  # genes and teacher without the validation patient
        rest = train_all[(train_all.obs[Key.obs.patient].astype(str) != val_p).to_numpy()].copy()
        t = ExpressionTeacher("pca").fit(rest)
        return {"teacher": t.transform(inner_tr), "genes": g if own_genes else sd.pp.hest_genes(inner_tr, 50)}

    sel = select_peka(tr, teacher.transform(tr), g, grid, base=cfg, inner=inner, encoder=encoder, **kw)
    c.quiet = _not_rank_zero()  # DDP: rank 0 prints
    print_selection(c, sel)
    return sel


def peka(
    data: str = typer.Argument(..., help="All sections (with and without images): .h5ad, her2st folder, or 'her2st'."),
    test_patients: str = test_patients_option(never_used_for="training, genes or teacher"),
    val_patients: Optional[str] = val_patients_option(),
    out: Path = bundle_out_option("stdistill_out/peka"),
    encoder: str = encoder_option("Encoder name (the default is an ImageNet model)."),
    adapter: str = typer.Option("miss", help="'miss' (block-affine, peft MissConfig) or 'lora'."),
    rank: Optional[str] = rank_option(),
    lr: str = typer.Option("1e-4", help="Learning rate; a comma list (e.g. 3e-5,1e-4) is a grid."),
    epochs: int = typer.Option(4, help="Epochs (with a grid: the most tried; the best epoch is chosen)."),
    w_kd: str = typer.Option("1.0", help="KD loss weight; a comma list (e.g. 0,0.1,1) is a grid."),
    w_sa: float = typer.Option(1.0), w_reg: float = typer.Option(1.0), seed: int = typer.Option(0),
    n_clusters: int = typer.Option(16, help="Teacher k-means groups for KD."),
    train_from: Optional[str] = train_from_option(),
    genes: Optional[str] = typer.Option(None, help="Gene list JSON; default: 50 HEST genes of the training sections."),
    extra_genes: Optional[str] = typer.Option(None, "--extra-genes", help="Comma-separated genes learnt besides those (e.g. ERBB2), so they can be mapped."),
    stain_norm: Optional[str] = stain_norm_flag(),
    run_dir: Optional[str] = run_dir_option(),
    accelerator: str = typer.Option("cpu", "--accelerator", help="cpu, gpu, auto."),
    devices: str = devices_option("auto"),
    strategy: str = strategy_option(),
    num_nodes: int = num_nodes_option(),
) -> None:
    """Train PEKA on the imaged sections of the non-test patients; the teacher sees all their sections.

    Comma lists in --lr, --w-kd or --rank form a grid: settings and epochs are then chosen by
    leave-one-patient-out among the training patients (select_peka; each validation patient's
    genes and teacher are left out), and the winner is trained on all training patients.
    """
    from rich.console import Console

    import stdistill as sd
    from stdistill.io.summary import load_any
    from stdistill.recipes import PEKA, PekaConfig
    from stdistill.teachers import ExpressionTeacher

    from .._errors import StdistillError

    stain = stain_norm_option(stain_norm)  # checked before the data are read
    check_target(out)
    split = patient_split(load_any(data), test_patients, val_patients)
    train_all, tr, va = split["train_all"], split["train"], split["val"]
    g = sd.pp.read_gene_list(genes) if genes else sd.pp.hest_genes(tr, 50)
    teacher = ExpressionTeacher("pca").fit(train_all)
    grid = settings_grid(lr=_numbers(lr, float, "--lr"), w_kd=_numbers(w_kd, float, "--w-kd"), rank=ranks(rank))
    cfg = PekaConfig(adapter=adapter, max_epochs=epochs, w_sa=w_sa, w_reg=w_reg, seed=seed, train_from=train_from,
                     n_clusters=n_clusters, stain_norm=stain, **grid[0])
    kw = trainer_kwargs(accelerator, devices, strategy, num_nodes)
    c, sel = Console(), None
    if len(grid) > 1:
        if va is not None:
            raise StdistillError(GRID_WITH_VAL)
        sel = _choose_peka(c, tr, train_all, teacher, g, bool(genes), grid, cfg, encoder, kw)
        cfg = sel.config()
    m = PEKA(encoder, cfg, **kw).fit(tr, teacher.transform(tr), g, kd_reference=teacher.transform(train_all), val=va,
                                     extra_genes=_split(extra_genes), run_dir=run_dir, selection=sel)
    if _not_rank_zero():  # DDP: every process holds the same weights; one writes the model
        return
    if m.resumed_:
        c.print(f"{m.resumed_} from checkpoints in {run_dir}")
    m.save(out)
    c.print(_peka_summary(m.report(), len(m.genes_)))
    if m.stain_:
        c.print(f"stain: {m.stain_['method']} onto training section {m.stain_['reference_section']}")
    c.print(f"[bold]saved[/bold] {out}")


def predict(
    model: Path = typer.Argument(..., help="A PEKA model bundle folder (stdistill expression peka)."),
    data: str = typer.Argument(..., help="Sections with images: .h5ad, her2st folder, or a dataset name."),
    sections: Optional[str] = typer.Option(None, help="Comma-separated sections (default: all with an image)."),
    out: Path = typer.Option(Path("stdistill_out/predictions.csv"), "--out", "-o", help="CSV of predicted log1p expression (spots x genes; clipped at 0)."),
    features_out: Optional[Path] = typer.Option(None, help="Also write adapted features + predictions to this .h5ad."),
    map_gene: Optional[str] = typer.Option("ERBB2", help="Comma-separated genes to map (any the model predicts; measured drawn beside when the data have it)."),
    encoder: Optional[str] = typer.Option(None, help="Encoder, when the saved one is not in the registry."),
) -> None:
    """Predict expression (and adapted features) from H&E alone with a trained PEKA model."""
    import numpy as np
    from rich.console import Console

    import stdistill as sd
    from stdistill.io.summary import load_any
    from stdistill.recipes import PEKA

    from .._utils import atomic_path

    m = PEKA.load(model, encoder=encoder)
    a = load_any(data)
    secs = _split(sections) or [s for s in sd.io.sections(a) if sd.io.has_image(a, s)]
    a = sd.io.subset_sections(a, secs)
    pred = m.predict(a, inplace=False).clip(lower=0.0)  # log1p expression is never negative; heads can undershoot
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        pred.to_csv(tmp)
    if features_out is not None:
        m.transform(a)  # obsm["X_peka"]
        a.obsm[Key.obsm.peka_pred] = pred.astype(np.float32)  # genes as the frame's columns
        sd.io.write_h5ad(a, features_out)
    c = Console()
    for p in _gene_maps(a, pred, _split(map_gene), secs, out.parent, c):
        c.print(f"map: {p}")
    c.print(f"[bold]{pred.shape[0]} spots x {pred.shape[1]} genes[/bold] -> {out}")


def probe(
    data: str = typer.Argument(..., help="Training sections with counts and patch features: .h5ad, folder or dataset name."),
    feature_key: str = typer.Option("X_effnet-lite0-imagenet", "--feature-key", "-f",
                                    help="obsm key of the patch features (their uns['features'] record goes into the bundle)."),
    encoder: Optional[str] = typer.Option(None, help="Extract the features with this encoder first when they are absent."),
    out: Path = bundle_out_option("stdistill_out/probe"),
    n_genes: int = typer.Option(50, help="Genes chosen HEST's way on the given sections."),
    genes: Optional[str] = typer.Option(None, help="Gene list (HEST var_50genes.json) instead of choosing them."),
) -> None:
    """Fit HEST's frozen probe (StandardScaler -> PCA(256) -> ridge, alpha = 100 / (d * n_genes)) on every
    imaged spot given, and save it as a bundle for `stdistill predict`. Give only training patients."""
    from rich.console import Console

    import stdistill as sd
    from stdistill.bench import HestRidge
    from stdistill.io.summary import load_any

    check_target(out)
    a = imaged_sections(load_any(data))
    if feature_key not in a.obsm and encoder is not None:
        sd.features.extract(a, encoder, key_added=feature_key)
    F = sd.features.feature_matrix(a, feature_key)
    g = sd.pp.read_gene_list(genes) if genes else sd.pp.hest_genes(a, n_genes)
    made = a.uns.get(Key.uns.features, {}).get(feature_key)
    p = HestRidge().fit(F, sd.pp.log1p_targets(a, g), genes=g, features=made)
    p.save(out)
    c = Console()
    if not made:
        c.print(f'[yellow]obsm["{feature_key}"] has no uns["features"] record: the bundle cannot make such features '
                "on a new slide (extract them with stdistill features)[/yellow]")
    c.print(f"frozen probe: {a.n_obs} spots of {a.obs['patient'].nunique()} patients, {len(g)} genes, "
            f"{F.shape[1]} features -> PCA {p.n_components_}, alpha {p.alpha_:.3g} "
            f"({(made or {}).get('encoder', 'encoder unknown')})")
    c.print(f"[bold]saved[/bold] {out}")


def register(app: typer.Typer) -> None:
    """``stdistill expression probe|bench|peka|predict``."""
    sub = typer.Typer(help="Gene expression from H&E: HEST-Benchmark evaluation, the frozen probe and PEKA distillation.",
                      no_args_is_help=True)
    app.add_typer(sub, name="expression")
    for name, fn in (("probe", probe), ("bench", bench), ("peka", peka), ("predict", predict)):
        sub.command(name)(fn)


def _peka_summary(r: dict, n_genes: int) -> str:
    """One readable line from :meth:`PEKA.report` (adapter, trainable share, heads, best epoch, time)."""
    rank = f" rank {r['rank']}" if r.get("rank") is not None else ""
    return (f"PEKA: {n_genes} genes; adapter {r.get('adapter', '?')}{rank} on {r.get('n_targets', 0)} layers, "
            f"{r.get('n_trainable', 0):,} trainable parameters ({float(r.get('share', 0.0)):.2%} of the encoder), "
            f"{r.get('n_head_params', 0):,} in the heads; best epoch {r.get('best_epoch')}, {r.get('fit_seconds')} s")


def _gene_maps(a, pred, genes: list[str], secs: list[str], folder: Path, console) -> list[Path]:
    """``folder/<gene>_<section>.png`` for each requested gene the model predicts: the prediction,
    with the measured values beside it only where the data have the gene."""
    import stdistill as sd

    missing = [g for g in genes if g not in pred.columns]
    if missing:
        console.print(f"[yellow]no map for {', '.join(missing)}: not among the model's {pred.shape[1]} genes "
                      f"({', '.join(map(str, pred.columns[:8]))}{', ...' if pred.shape[1] > 8 else ''}); "
                      "train with --extra-genes to add them[/yellow]")
    out = []
    for g in (g for g in genes if g in pred.columns):
        for s in secs:
            p = folder / f"{g}_{s}.png"
            sd.pl.expression_maps(a, g, {"PEKA head": pred[g]}, section=s, path=p)
            out.append(p)
    return out
