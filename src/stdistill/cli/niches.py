"""``stdistill niches teacher|distill|predict|evaluate``: the niche distillation recipe from the shell.

Data go in as anything :func:`stdistill.io.load_any` reads (validated: an .h5ad in the
stdistill layout, a Visium or her2st folder, or a dataset name ``her2st``, ``mob``,
``simulated``) and out as validated .h5ad files. Models are folders with ``config.json`` + safetensors weights.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .._defaults import N_NEIGHBORS
from .._errors import StdistillError
from .._keys import Key
from ..bundle import check_target
from ._common import _not_rank_zero, devices_option, num_nodes_option, run_dir_option, strategy_option

FEATURES_DEFAULT = "X_effnet-lite0-imagenet"
#: The same default as the Python API (``radius_um=None``): derived from the spot pitch.
TRANSFER_HELP = ("Choose the transfer setting on the validation patient inside the training patients: 'auto' "
                 "(every combination of macenko, views, context), a comma list of settings such as "
                 "'plain,macenko,macenko+context', or 'none'. Needs images and plain features from 'stdistill features'.")
RADIUS_HELP = (f"Neighbourhood radius in micrometres (default: the radius holding {N_NEIGHBORS} neighbouring spots, "
               "from the spot pitch, as in Python).")


def _load(data: str, obsm: tuple[str, ...] = ()):
    """Sections from an .h5ad, a Visium/her2st folder or a dataset name, validated by
    :func:`stdistill.io.load_any`; ``obsm`` keys that must be present are checked naming the file."""
    from ..io import load_any

    adata = load_any(data)
    missing = [k for k in obsm if k not in adata.obsm]
    if missing:
        have = ", ".join(sorted(adata.obsm)) or "none"
        raise StdistillError(f"obsm lacks {missing} (has: {have})", data)
    return adata


def _write(adata, path: str) -> Path:
    """Validate and write atomically (in-memory HDF5 first: a full disk is one error line)."""
    from ..io import write_h5ad

    p = Path(path)
    if p.suffix != ".h5ad":
        raise StdistillError("output must end in .h5ad", p)
    return write_h5ad(adata, p)


def teacher(
    data: str = typer.Argument(..., help=".h5ad with raw counts (any sections, images not needed), a Visium/her2st folder, or a dataset name: 'her2st', 'mob', 'simulated'."),
    out: str = typer.Option(..., "--out", "-o", help="Output .h5ad with obs['niche'] and obsm['niche_probs']."),
    n_niches: str = typer.Option("6", "--n-niches", "-k", help="Number of niches K; 'auto' (3..10), a range '4-10' or "
                                 "a list '4,6,8': the K whose repeated fits agree best (curve printed, kept in uns)."),
    method: str = typer.Option("aggregate", help="'aggregate' (CellCharter-like) or 'nolan' (self-supervised)."),
    consensus: int = typer.Option(1, help="'aggregate': bagged mixture fits combined into one partition (1: one fit)."),
    pca_solver: str = typer.Option("auto", "--pca-solver", help="'auto', 'randomized' or 'exact'."),
    batch_key: str = typer.Option("section", help="obs column whose effects are removed ('section' or 'patient')."),
    batch_correction: str = typer.Option("standardize", help="'standardize', 'harmony', 'scvi' or 'none'."),
    feature_key: str = typer.Option(None, "--feature-key", help="obsm embedding to use instead of PCA of counts (e.g. X_scVI)."),
    use_rep: str = typer.Option(None, "--use-rep", hidden=True, help="Old name of --feature-key (one more release)."),
    radius_um: float = typer.Option(None, help=RADIUS_HELP),
    key_added: str = typer.Option(Key.obs.niche, help="obs/obsm key prefix to write."),
    model: str = typer.Option(None, help="Also save the fitted teacher to this bundle folder."),
    seed: int = typer.Option(0),
) -> None:
    """Fit the transcriptomic niche teacher; print NMI(niche, patient) and niche sizes per patient."""
    from ..teachers.niche import NicheTeacher

    if use_rep is not None:
        typer.echo("warning: --use-rep is now --feature-key (the old name goes in the next release)", err=True)
        feature_key = feature_key or use_rep
    if model:
        check_target(model)
    adata = _load(data)
    t = NicheTeacher(_parse_k(n_niches), method=method, batch_key=batch_key,
                     batch_correction=None if batch_correction == "none" else batch_correction,
                     feature_key=feature_key, radius_um=radius_um, seed=seed, consensus=consensus, pca_solver=pca_solver)
    t.fit_predict(adata, key_added=key_added)
    _print_teacher(t, t.diagnostics(adata, key=key_added))
    if model:
        t.save(model)
        typer.echo(f"teacher saved to {model}")
    typer.echo(f"wrote {_write(adata, out)}")


def _parse_k(text: str):
    """``-k``: an int, ``auto``, a range ``lo-hi`` (tuple) or a list ``a,b,c``."""
    t = text.strip()
    try:
        if t == "auto":
            return t
        if "-" in t:
            lo, hi = t.split("-")
            return (int(lo), int(hi))
        return [int(v) for v in t.split(",")] if "," in t else int(t)
    except ValueError:
        raise StdistillError(f"-k must be an int, 'auto', a range like 4-10 or a list like 4,6,8; got {text!r}") from None


def _print_teacher(t, d: dict) -> None:
    """The stability curve (K chosen), NMI(niche, patient), niche sizes per patient, patients held in one
    niche and niches held by one patient only (teacher diagnostics ``d``)."""
    st = t.state_.get("stability")
    if st is not None:
        typer.echo(f"K chosen by stability: {st['chosen']} ({st['criterion']}, {st['n_repeats']} bagged fits):")
        typer.echo("  " + ", ".join(f"K={k}: {v:.3f}" for k, v in zip(st["k"], st["score"])))
    typer.echo(f"NMI(niche, patient) = {d['nmi_patient']:.3f} (0: niches shared by patients; 1: one niche per patient)")
    typer.echo("niche sizes per patient (spots):")
    typer.echo(d["sizes"].to_string())
    if d["single_niche_patients"]:
        typer.echo(f"warning: patients with >= 95% of spots in one niche: {d['single_niche_patients']}")
    held = d["patients_per_niche"]
    alone = held[held["n_patients"] <= 1]
    if len(alone):
        typer.echo("warning: niches held by one patient or none (>= 2% of a patient's spots), which a student "
                   "trained on other patients cannot learn: " + ", ".join(f"{n} ({r['patients'] or '-'})"
                                                                         for n, r in alone.iterrows()))


def _train_patients(adata, train_patients: str | None, data: str):
    """``adata`` restricted to the sections of ``--train-patients`` (all when none are given)."""
    from ..io._section import PATIENT_KEY, SECTION_KEY, subset_sections

    if not train_patients:
        return adata
    keep = [p.strip() for p in train_patients.split(",") if p.strip()]
    unknown = set(keep) - set(adata.obs[PATIENT_KEY].astype(str))
    if unknown:
        raise StdistillError(f"unknown patients {sorted(unknown)}", data)
    secs = adata.obs.loc[adata.obs[PATIENT_KEY].astype(str).isin(keep), SECTION_KEY].astype(str).unique()
    return subset_sections(adata, list(secs))


def _fit_student(adata, features: str, transfer: str, views: bool, context_key: str | None, transfer_views: int,
                 kw: dict, fit_kw: dict):
    """A NicheStudent fitted as asked, or the one whose transfer setting won on the validation patient."""
    from ..recipes._niches_transfer import fit_transfer, parse_transfer
    from ..students.niche import NicheStudent

    choice = parse_transfer(transfer)
    if choice is None:
        return NicheStudent(feature_key=features, views=views, context_key=context_key, **kw).fit(adata, **fit_kw)
    if views or context_key:
        raise StdistillError("--views / --context-key are chosen by --transfer; leave them out")
    return fit_transfer(adata, features, choice, student_kwargs=kw, n_views=transfer_views, **fit_kw)


def _print_student(s, model: str) -> None:
    """Where the student trained and stopped, the refinement and transfer chosen, where it went."""
    from ..recipes._niches_transfer import describe_choice

    typer.echo(f"student trained on patients {s.info_['train_patients']} ({s.info_['n_train_spots']} spots), "
               f"early stopping on {_val_desc(s.info_)} at epoch {s.info_['best_epoch']}; "
               f"refinement chosen there: {s.info_.get('refine')}; saved to {model}")
    if s.info_.get("transfer"):
        typer.echo(f"transfer chosen: {describe_choice(s.info_['transfer'])}")
        typer.echo(str(s.selection_))  # the candidates x validation patients table, as every recipe prints it


def distill(
    data: str = typer.Argument(..., help=".h5ad with teacher niches (obsm[<key>_probs]) and patch features."),
    model: str = typer.Option(..., "--model", "-m", help="Bundle folder to write the student to (for 'stdistill predict')."),
    features: str = typer.Option(FEATURES_DEFAULT, help="obsm key of the patch features."),
    teacher_key: str = typer.Option(Key.obs.niche, help="Teacher key: uses obsm['<key>_probs']."),
    train_patients: str = typer.Option(None, help="Comma-separated patients to train on (default: all)."),
    radius_um: float = typer.Option(None, help=RADIUS_HELP),
    temperature: float = typer.Option(2.0, help="KD temperature T (KL scaled by T^2)."),
    hard_weight: float = typer.Option(0.0, help="Share of hard-label cross-entropy."),
    val_patient: str = typer.Option("smallest", help="Early-stopping patient ('smallest', an id, or 'none'); 'each': "
                                    "with --transfer, every training patient validates the candidates in turn."),
    max_epochs: int = typer.Option(60, help="Most training epochs."),
    val_block: float = typer.Option(0.2, help="With one training patient: share of each section held out as a "
                                              "spatial block for early stopping (0: none)."),
    views: bool = typer.Option(False, help="Sample augmented views (obsm['<features>_views'], from "
                                           "'stdistill features --views K') each epoch."),
    context_key: str = typer.Option(None, "--context-key", help="obsm key of features of a larger field of view "
                                    "(e.g. from 'stdistill features --size-um 224'): one extra token per spot."),
    seed: int = typer.Option(0),
    run_dir: str = run_dir_option(),
    devices: int = devices_option(1),
    strategy: str = strategy_option(),
    num_nodes: int = num_nodes_option(),
    accelerator: str = typer.Option(None, "--accelerator", help="cpu, gpu, auto (default: the student's --device)."),
    transfer: str = typer.Option("none", "--transfer", help=TRANSFER_HELP),
    transfer_views: int = typer.Option(2, "--transfer-views", help="Augmented views per patch for --transfer candidates with views."),
) -> None:
    """Train the H&E-only student on the teacher's soft labels (patients listed, or all)."""
    check_target(model)
    adata = _train_patients(_load(data, obsm=(features, f"{teacher_key}_probs")), train_patients, data)
    vp = None if val_patient == "none" else (val_patient if val_patient in ("smallest", "each") else [val_patient])
    kw = dict(radius_um=radius_um, temperature=temperature, hard_weight=hard_weight, val_patients=vp,
              val_block=val_block, max_epochs=max_epochs, seed=seed)
    fit_kw = dict(probs_key=f"{teacher_key}_probs", run_dir=run_dir, devices=devices,
                  strategy="ddp" if devices * num_nodes > 1 and strategy == "auto" else strategy,
                  num_nodes=num_nodes, accelerator=accelerator)
    s = _fit_student(adata, features, transfer, views, context_key, transfer_views, kw, fit_kw)
    if _not_rank_zero():  # DDP: every process holds the same weights; one writes the bundle
        return
    if s.info_.get("resumed"):
        typer.echo(f"resumed from checkpoints in {run_dir}: {', '.join(s.info_['resumed'])}")
    s.save(model)
    _print_student(s, model)


def predict(
    data: str = typer.Argument(..., help=".h5ad of spots or of pp.tile output (H&E only; features extracted if missing)."),
    model: str = typer.Option(..., "--model", "-m", help="Student folder written by 'niches distill'."),
    out: str = typer.Option(..., "--out", "-o", help="Output .h5ad with obs['niche_pred'], obsm['niche_pred_probs']."),
    key_added: str = typer.Option(Key.obs.niche_pred, help="obs/obsm key prefix to write (differs from the teacher's 'niche')."),
    plot: str = typer.Option(None, help="Also write niche maps (PNG) here: this file with one section, else one <name>_<section>.png per section."),
    refine: str = typer.Option("none", help="Test-time refinement with the section's own structure (label-free): "
                                            "auto (the one chosen on the validation patient at distill), none, "
                                            "propagate, gmm or both; written as '<key>_refined' beside the raw."),
) -> None:
    """Map niches from H&E alone."""
    from ..students.niche import NicheStudent

    s = NicheStudent.load(model)
    adata = _load(data)
    s.predict(adata, key_added=key_added, refine=None if refine == "none" else refine)
    for k in (key_added, f"{key_added}_refined"):
        if k in adata.obs:
            counts = adata.obs[k].value_counts().sort_index()
            typer.echo(f"spots per niche ({k}): " + ", ".join(f"{c}: {v}" for c, v in counts.items()))
    if plot:
        from ..pl import niche_maps_per_section

        for p in niche_maps_per_section(adata, [key_added], plot, names=s.info_.get("niche_names")):
            typer.echo(f"wrote {p}")
    typer.echo(f"wrote {_write(adata, out)}")


def evaluate(
    data: str = typer.Argument(..., help=".h5ad with counts and patch features, or a dataset name: 'her2st', 'mob', 'simulated'."),
    out_dir: str = typer.Option("niches_out", "--out-dir", "-o", help="Folder for metrics CSVs and niche maps."),
    features: str = typer.Option(FEATURES_DEFAULT, help="obsm key of the patch features."),
    n_niches: int = typer.Option(6, "--n-niches", "-k"),
    method: str = typer.Option("aggregate", help="Teacher method: 'aggregate' or 'nolan'."),
    max_epochs: int = typer.Option(60, help="Most student training epochs."),
    seed: int = typer.Option(0),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Sections without an H&E image get NaN features instead of an error (her2st has 29)."),
    refine: bool = typer.Option(False, "--refine", help="Also score the student refined on each held-out section (label-free; the refinement chosen on its validation patient)."),
    transfer: str = typer.Option("none", "--transfer", help=TRANSFER_HELP + " Chosen again in every fold."),
    transfer_views: int = typer.Option(2, "--transfer-views", help="Augmented views per patch for --transfer candidates with views."),
) -> None:
    """Leave-one-patient-out: teacher -> student -> baselines -> ARI/NMI/ID-accuracy/macro-F1 -> figures."""
    from ..recipes._niches_transfer import parse_transfer
    from ..recipes.niches import run
    from ..teachers.niche import NicheTeacher

    adata = _load(data)
    if features not in adata.obsm:
        from .. import features as feat

        feat.extract(adata, encoder=features[2:] if features.startswith("X_") else features, skip_missing=skip_missing)
    df, figs = run(adata, features, n_niches, out_dir=out_dir, seed=seed, teacher=NicheTeacher(n_niches, method=method, seed=seed),
                   student_kwargs={"max_epochs": max_epochs}, refine=refine, transfer=parse_transfer(transfer),
                   transfer_kwargs={"n_views": transfer_views})
    _print_evaluation(df, figs, Path(out_dir) / f"metrics_K{n_niches}.csv")


def _print_evaluation(df, figs: list, metrics: Path) -> None:
    """The per-fold table, transfer chosen per fold, the means, the teacher's NMI(niche, patient), files."""
    from ..recipes._niches_transfer import describe_choice
    from ..recipes.niches import format_table, summary

    typer.echo(format_table(df))
    for fold, t in df.attrs.get("transfer", {}).items():
        typer.echo(f"fold {fold}: transfer chosen {describe_choice(t)}")
    typer.echo("\nmean over folds:\n" + summary(df).round(3).to_string())
    typer.echo(f"\nteacher NMI(niche, patient) = {df.attrs['teacher_nmi_patient']:.3f}")
    for p in figs:
        typer.echo(f"figure: {p}")
    typer.echo(f"metrics: {metrics}")


def register(app: typer.Typer) -> None:
    """``stdistill niches teacher|distill|predict|evaluate``."""
    niches = typer.Typer(help="Niche distillation: ST teacher -> H&E student -> niche maps.", no_args_is_help=True)
    app.add_typer(niches, name="niches")
    for name, fn in (("teacher", teacher), ("distill", distill), ("predict", predict), ("evaluate", evaluate)):
        niches.command(name)(fn)


def _val_desc(info: dict) -> str:
    """Where early stopping looked: the validation patients, a spatial block, or nowhere."""
    if info.get("val_patients"):
        return str(info["val_patients"])
    if info.get("val_block_spots"):
        return f"a spatial block of {info['val_block_spots']} spots (one training patient)"
    return "none"
