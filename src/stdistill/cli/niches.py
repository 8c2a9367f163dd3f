"""``stdistill niches teacher|distill|predict|evaluate``: the niche distillation recipe from the shell.

Data go in and out as .h5ad files in the stdistill layout (or a dataset name: ``her2st``,
``simulated``). Models are folders with ``config.json`` + safetensors weights.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .._errors import StdistillError

FEATURES_DEFAULT = "X_effnet-lite0-imagenet"


def _load(path: str):
    """An .h5ad file or a dataset name."""
    import anndata as ad

    if path in ("her2st", "simulated"):
        from .. import datasets

        return getattr(datasets, path)()
    p = Path(path)
    if not p.exists():
        raise StdistillError("no such file (expected an .h5ad in the stdistill layout, or 'her2st'/'simulated')", p)
    if p.suffix != ".h5ad":
        raise StdistillError("expected an .h5ad file", p)
    try:
        return ad.read_h5ad(p)
    except Exception as e:  # noqa: BLE001 - unreadable file
        raise StdistillError(f"cannot read as AnnData: {e}", p) from None


def _write(adata, path: str) -> Path:
    from .._utils import atomic_path

    p = Path(path)
    if p.suffix != ".h5ad":
        raise StdistillError("output must end in .h5ad", p)
    # images held as paths stay paths; in-memory images are kept (small, simulated)
    with atomic_path(p) as tmp:
        adata.write_h5ad(tmp)
    return p


def register(app: typer.Typer) -> None:
    niches = typer.Typer(help="Niche distillation: ST teacher -> H&E student -> niche maps.", no_args_is_help=True)
    app.add_typer(niches, name="niches")

    @niches.command("teacher")
    def teacher(
        data: str = typer.Argument(..., help=".h5ad with raw counts (any sections, images not needed) or 'her2st'."),
        out: str = typer.Option(..., "--out", "-o", help="Output .h5ad with obs['niche'] and obsm['niche_probs']."),
        n_niches: int = typer.Option(6, "--n-niches", "-k", help="Number of niches K."),
        method: str = typer.Option("aggregate", help="'aggregate' (CellCharter-like) or 'nolan' (self-supervised)."),
        batch_key: str = typer.Option("section", help="obs column whose effects are removed ('section' or 'patient')."),
        batch_correction: str = typer.Option("standardize", help="'standardize', 'harmony', 'scvi' or 'none'."),
        use_rep: str = typer.Option(None, help="obsm embedding to use instead of PCA of counts (e.g. X_scVI)."),
        radius_um: float = typer.Option(None, help="Neighbourhood radius in micrometres (default: from the spot pitch)."),
        key_added: str = typer.Option("niche", help="obs/obsm key prefix to write."),
        model: str = typer.Option(None, help="Also save the fitted teacher to this folder."),
        seed: int = typer.Option(0),
    ) -> None:
        """Fit the transcriptomic niche teacher; print NMI(niche, patient) and niche sizes per patient."""
        from ..teachers.niche import NicheTeacher

        adata = _load(data)
        t = NicheTeacher(n_niches, method=method, batch_key=batch_key,
                         batch_correction=None if batch_correction == "none" else batch_correction,
                         use_rep=use_rep, radius_um=radius_um, seed=seed)
        t.fit_predict(adata, key_added=key_added)
        d = t.diagnostics(adata, key=key_added)
        typer.echo(f"NMI(niche, patient) = {d['nmi_patient']:.3f} (0: niches shared by patients; 1: one niche per patient)")
        typer.echo("niche sizes per patient (spots):")
        typer.echo(d["sizes"].to_string())
        if d["single_niche_patients"]:
            typer.echo(f"warning: patients with >= 95% of spots in one niche: {d['single_niche_patients']}")
        if model:
            t.save(model)
            typer.echo(f"teacher saved to {model}")
        typer.echo(f"wrote {_write(adata, out)}")

    @niches.command("distill")
    def distill(
        data: str = typer.Argument(..., help=".h5ad with teacher niches (obsm[<key>_probs]) and patch features."),
        model: str = typer.Option(..., "--model", "-m", help="Folder to write the student to."),
        features: str = typer.Option(FEATURES_DEFAULT, help="obsm key of the patch features."),
        teacher_key: str = typer.Option("niche", help="Teacher key: uses obsm['<key>_probs']."),
        train_patients: str = typer.Option(None, help="Comma-separated patients to train on (default: all)."),
        radius_um: float = typer.Option(450.0, help="Neighbourhood radius in micrometres."),
        temperature: float = typer.Option(2.0, help="KD temperature T (KL scaled by T^2)."),
        hard_weight: float = typer.Option(0.0, help="Share of hard-label cross-entropy."),
        val_patient: str = typer.Option("smallest", help="Early-stopping patient ('smallest', an id, or 'none')."),
        max_epochs: int = typer.Option(60, help="Most training epochs."),
        val_block: float = typer.Option(0.2, help="With one training patient: share of each section held out as a "
                                                  "spatial block for early stopping (0: none)."),
        views: bool = typer.Option(False, help="Sample augmented views (obsm['<features>_views'], from "
                                               "'stdistill features --views K') each epoch."),
        seed: int = typer.Option(0),
    ) -> None:
        """Train the H&E-only student on the teacher's soft labels (patients listed, or all)."""
        from ..io._section import PATIENT_KEY, SECTION_KEY, subset_sections
        from ..students.niche import NicheStudent

        adata = _load(data)
        if train_patients:
            keep = [p.strip() for p in train_patients.split(",") if p.strip()]
            unknown = set(keep) - set(adata.obs[PATIENT_KEY].astype(str))
            if unknown:
                raise StdistillError(f"unknown patients {sorted(unknown)}", data)
            secs = adata.obs.loc[adata.obs[PATIENT_KEY].astype(str).isin(keep), SECTION_KEY].astype(str).unique()
            adata = subset_sections(adata, list(secs))
        vp = None if val_patient == "none" else ("smallest" if val_patient == "smallest" else [val_patient])
        s = NicheStudent(feature_key=features, radius_um=radius_um, temperature=temperature, hard_weight=hard_weight,
                         val_patients=vp, val_block=val_block, views=views, max_epochs=max_epochs, seed=seed)
        s.fit(adata, probs_key=f"{teacher_key}_probs")
        s.save(model)
        typer.echo(f"student trained on patients {s.info_['train_patients']} ({s.info_['n_train_spots']} spots), "
                   f"early stopping on {_val_desc(s.info_)} at epoch {s.info_['best_epoch']}; saved to {model}")

    @niches.command("predict")
    def predict(
        data: str = typer.Argument(..., help=".h5ad of spots or of pp.tile output (H&E only; features extracted if missing)."),
        model: str = typer.Option(..., "--model", "-m", help="Student folder written by 'niches distill'."),
        out: str = typer.Option(..., "--out", "-o", help="Output .h5ad with obs['niche'], obsm['niche_probs']."),
        key_added: str = typer.Option("niche"),
        plot: str = typer.Option(None, help="Also write a niche map PNG of the first section here."),
        refine: str = typer.Option("none", help="Test-time refinement with the section's own structure (label-free): "
                                                "none, propagate, gmm or both; written as '<key>_refined' beside the raw."),
    ) -> None:
        """Map niches from H&E alone."""
        from ..io._section import sections
        from ..students.niche import NicheStudent

        s = NicheStudent.load(model)
        adata = _load(data)
        s.predict(adata, key_added=key_added, refine=None if refine == "none" else refine)
        for k in (key_added, f"{key_added}_refined"):
            if k in adata.obs:
                counts = adata.obs[k].value_counts().sort_index()
                typer.echo(f"spots per niche ({k}): " + ", ".join(f"{c}: {v}" for c, v in counts.items()))
        if plot:
            from ..pl import niches as plot_niches

            sec = sections(adata)[0]
            from ..io._section import subset_sections

            plot_niches(subset_sections(adata, [sec]), [key_added], section=sec, path=plot)
            typer.echo(f"wrote {plot}")
        typer.echo(f"wrote {_write(adata, out)}")

    @niches.command("evaluate")
    def evaluate(
        data: str = typer.Argument(..., help=".h5ad with counts and patch features, or 'her2st'/'simulated'."),
        out_dir: str = typer.Option("niches_out", "--out-dir", "-o", help="Folder for metrics CSVs and niche maps."),
        features: str = typer.Option(FEATURES_DEFAULT, help="obsm key of the patch features."),
        n_niches: int = typer.Option(6, "--n-niches", "-k"),
        method: str = typer.Option("aggregate", help="Teacher method: 'aggregate' or 'nolan'."),
        max_epochs: int = typer.Option(60, help="Most student training epochs."),
        seed: int = typer.Option(0),
    ) -> None:
        """Leave-one-patient-out: teacher -> student -> baselines -> ARI/NMI/ID-accuracy/macro-F1 -> figures."""
        from ..recipes.niches import format_table, run, summary
        from ..teachers.niche import NicheTeacher

        adata = _load(data)
        if features not in adata.obsm:
            from .. import features as feat

            feat.extract(adata, encoder=features[2:] if features.startswith("X_") else features)
        df, figs = run(adata, features, n_niches, out_dir=out_dir, seed=seed, teacher=NicheTeacher(n_niches, method=method, seed=seed),
                      student_kwargs={"max_epochs": max_epochs})
        typer.echo(format_table(df))
        typer.echo("\nmean over folds:\n" + summary(df).round(3).to_string())
        typer.echo(f"\nteacher NMI(niche, patient) = {df.attrs['teacher_nmi_patient']:.3f}")
        for p in figs:
            typer.echo(f"figure: {p}")
        typer.echo(f"metrics: {Path(out_dir) / f'metrics_K{n_niches}.csv'}")


def _val_desc(info: dict) -> str:
    """Where early stopping looked: the validation patients, a spatial block, or nowhere."""
    if info.get("val_patients"):
        return str(info["val_patients"])
    if info.get("val_block_spots"):
        return f"a spatial block of {info['val_block_spots']} spots (one training patient)"
    return "none"
