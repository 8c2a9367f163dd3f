"""``stdistill genst fit|predict|sample``: GenST training (two aligned VQ-VAEs), H&E-only generation of
expression with its spread, and seeded samples."""

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
    patient_split,
    print_selection,
    test_patients_option,
    val_patients_option,
)

FEATURES_HELP = "obsm key of the patch features (extracted with --encoder when absent)."


def _h5ad_out(out: Path) -> None:
    if out.suffix != ".h5ad":
        raise StdistillError("output must end in .h5ad", out)


def _with_features(a, key: str, encoder: str, precision: str):
    """``a`` with ``obsm[key]`` (extracted on the imaged sections when absent)."""
    import stdistill as sd

    if key not in a.obsm:
        sd.features.extract(a, encoder, precision=precision, key_added=key, skip_missing=True)
    return a


def _print_predictability(c, table, title: str, top: int = 5) -> None:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("gene", "generated r", "reconstruction r (ceiling)"):
        t.add_column(col, justify="left" if col == "gene" else "right")
    mean = table.mean()
    t.add_row(f"mean over {len(table)} genes", f"{mean['generated']:.3f}", f"{mean['reconstruction']:.3f}", end_section=True)
    shown = table.dropna(subset=["generated"])
    rows = list(shown.head(top).iterrows()) + (list(shown.tail(top).iterrows()) if len(shown) > 2 * top else [])
    for i, (g, r) in enumerate(rows):
        t.add_row(str(g), f"{r['generated']:.3f}", f"{r['reconstruction']:.3f}", end_section=i == top - 1)
    c.print(t)


def _print_lines(c, title: str, rows: dict) -> None:
    c.print(f"[bold]{title}[/bold]")
    for k, v in rows.items():
        c.print(f"  {k}: {v}")


def _settings(m, features: str, how: str, tr) -> dict:
    """The fitted model's settings as printed by ``genst fit``."""
    cfg, meta = m.config, m.features_meta_
    src = (f"{features} ({meta.get('encoder', 'unknown')}, {meta.get('precision', '?')})" if cfg.histology == "features"
           else f"patch pixels, {cfg.patch_um:g} um at {cfg.patch_px} px")
    return {"histology": src, "chosen by": how, "w_con": cfg.w_con, "head input": cfg.head_input,
            "alignment epochs": cfg.max_epochs, "codebooks": f"{cfg.quantizer}, {m.net_.expr.codebook_size} codes",
            "likelihood": cfg.likelihood, "genes": len(m.genes_),
            "training spots": f"{tr.n_obs} ({tr.obs['patient'].nunique()} patients)", "seconds": f"{m.seconds_:.0f}"}


def _print_usage(c, usage) -> None:
    from rich.table import Table

    t = Table(title="Codebook usage (held-out spots)", title_justify="left")
    t.add_column("codebook")
    for col in usage.columns:
        t.add_column(str(col), justify="right")
    for name, r in usage.iterrows():
        t.add_row(str(name), *(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r.tolist()))
    c.print(t)


# options shared by predict and sample
MODEL = typer.Argument(..., help="A GenST model folder (stdistill genst fit).")
DATA = typer.Argument(..., help="Spots or H&E-only tiles (no genes needed): .h5ad, folder or name.")
SECTIONS = typer.Option(None, help="Comma-separated sections (default: all).")
TEMPERATURE = typer.Option(None, help="Code-distribution temperature (default: the model's).")
TOP_K = typer.Option(None, help="Keep the k most likely expression codes (default: the model's).")
EXTRACT = typer.Option(True, help="Extract missing features with the model's encoder.")


def _model_and_data(model: Path, data: str, out: Path, sections: Optional[str], extract: bool):
    """The loaded GenST model and the sections of ``data`` to generate on (features checked later)."""
    import stdistill as sd
    from stdistill.io.summary import load_any
    from stdistill.recipes import GenST

    _h5ad_out(out)
    m = GenST.load(model)
    a = load_any(data)
    have = sd.io.sections(a)
    secs = _split(sections) or have
    unknown = [s for s in secs if s not in have]
    if unknown:
        raise StdistillError(f"unknown sections {unknown[:3]} (have {have[:6]})")
    a = sd.io.subset_sections(a, secs)
    if m.config.histology == "features" and m.feature_key not in a.obsm and not extract:
        raise StdistillError(f'no obsm["{m.feature_key}"]; extract features first or drop --no-extract')
    return m, a


def _grid(w_con: str, head_input: str) -> list[dict]:
    """The settings grid: every --w-con with every --head-input."""
    grid = [{"w_con": w, "head_input": h} for w in _numbers(w_con, float, "--w-con") for h in _split(head_input)]
    if not grid:
        raise StdistillError("--head-input must name 'quantized' and/or 'continuous'")
    return grid


def _choose(c, tr, grid: list[dict], cfg, features: str, n_genes: int, extra_genes: Optional[str], val_patients: Optional[str]):
    """The configuration to train (chosen by leave-one-patient-out with a grid), its selection and how it was chosen."""
    from stdistill.recipes import select_genst

    if len(grid) < 2:
        return cfg, None, f"early stopping on {val_patients}" if val_patients else "fixed"
    sel = select_genst(tr, grid, base=cfg, feature_key=features, n_genes=n_genes, extra_genes=_split(extra_genes))
    print_selection(c, sel)
    return sel.config(), sel, "grid, leave one training patient out"


def _report_test(c, m, te, test_patients: Optional[str], out: Path) -> None:
    """Per-gene predictability and codebook usage on the held-out patients; test_predictability.csv."""
    from .._utils import atomic_path

    if te is None or not te.n_obs:
        return
    table = m.predictability(te)
    _print_predictability(c, table, f"Held-out Pearson r per gene ({test_patients}; {te.n_obs} spots)")
    _print_usage(c, m.codebook_usage(te))
    with atomic_path(out / "test_predictability.csv") as tmp:
        table.rename_axis("gene").to_csv(tmp)


def fit(
    data: str = typer.Argument(..., help="Sections with counts and images (or features): .h5ad, folder or name."),
    out: Path = typer.Option(Path("stdistill_out/genst"), "--out", "-o", help="Model bundle folder to write (config.json + model.safetensors)."),
    test_patients: Optional[str] = test_patients_option(None),
    val_patients: Optional[str] = val_patients_option(),
    features: str = typer.Option("X_effnet-lite0-imagenet", "--features", "-f", help=FEATURES_HELP),
    encoder: str = typer.Option("effnet-lite0-imagenet", help="Encoder for missing features (an ImageNet model by default)."),
    precision: str = typer.Option("fp32", help="Feature extraction precision ('fp32', 'bf16', 'auto')."),
    n_genes: int = typer.Option(50, help="Genes chosen HEST's way on the training sections."),
    extra_genes: Optional[str] = typer.Option("ERBB2", help="Comma-separated genes modelled beside them (when present)."),
    w_con: str = typer.Option("0.5", help="Contrastive weight; a comma list (e.g. 0,0.5) is a grid."),
    head_input: str = typer.Option("quantized", help="'quantized' or 'continuous' histology latent; a comma list is a grid."),
    codebook_size: int = typer.Option(64, help="Codes of each VQ codebook."),
    quantizer: str = typer.Option("vq", help="'vq' (VectorQuantize) or 'fsq' (FSQ)."),
    likelihood: str = typer.Option("nb", help="'nb' (negative binomial on raw counts) or 'mse' (log1p counts)."),
    expr_epochs: int = typer.Option(80, help="Epochs of the expression VQ-VAE."),
    max_epochs: int = typer.Option(30, help="Alignment epochs (with a grid: the most tried; the best is chosen)."),
    histology: str = typer.Option("features", help="'features' (VQ-VAE on --features) or 'pixels' (end to end on 112 um patches)."),
    patch_px: int = typer.Option(64, help="Pixels per 112 um patch with --histology pixels."),
    seed: int = typer.Option(0),
) -> None:
    """Train GenST on the non-test patients; report per-gene predictability and codebook usage on the test patients.

    Comma lists in --w-con or --head-input form a grid: settings and alignment epochs are then
    chosen by leave-one-patient-out among the training patients (select_genst).
    """
    from rich.console import Console

    import stdistill as sd
    from stdistill.io.summary import load_any
    from stdistill.recipes import GenST, GenstConfig

    grid = _grid(w_con, head_input)
    cfg = GenstConfig(codebook_size=codebook_size, hist_codebook_size=codebook_size, quantizer=quantizer,
                      likelihood=likelihood, expr_epochs=expr_epochs, max_epochs=max_epochs, seed=seed,
                      histology=histology, patch_px=patch_px, **grid[0])
    if len(grid) > 1 and val_patients:
        raise StdistillError(GRID_WITH_VAL)
    check_target(out)
    c = Console()
    a = load_any(data)
    a = _with_features(a, features, encoder, precision) if histology == "features" else a
    split = patient_split(a, test_patients, val_patients)
    tr = split["train"]
    g = sd.pp.hest_genes(tr, n_genes)
    genes = g + [x for x in _split(extra_genes) if x not in g and x in tr.var_names]
    cfg, sel, how = _choose(c, tr, grid, cfg, features, n_genes, extra_genes, val_patients)
    m = GenST(cfg, feature_key=features).fit(tr, genes, val=split["val"], selection=sel)
    m.save(out)
    _print_lines(c, "GenST settings", _settings(m, features, how, tr))
    _report_test(c, m, split["test"], test_patients, out)
    c.print(f"[bold]saved[/bold] {out}")


def predict(
    model: Path = MODEL,
    data: str = DATA,
    out: Path = typer.Option(..., "--out", "-o", help='Output .h5ad with obsm["genst_pred"] and obsm["genst_sd"].'),
    sections: Optional[str] = SECTIONS,
    temperature: Optional[float] = TEMPERATURE,
    top_k: Optional[int] = TOP_K,
    extract: bool = EXTRACT,
) -> None:
    """Generate expression (log1p, mixture mean) and its spread (mixture SD) from H&E features alone."""
    from rich.console import Console

    import stdistill as sd

    m, a = _model_and_data(model, data, out, sections, extract)
    m.predict(a, temperature=temperature, top_k=top_k, extract=extract)  # obsm["genst_pred"], obsm["genst_sd"]
    pred = a.obsm[Key.obsm.genst_pred]
    sd.io.write_h5ad(a, out)
    c = Console()
    if all(g in a.var_names for g in m.genes_):
        r = m.predictability(a)["generated"]
        c.print(f"Pearson r with the measured counts: mean {r.mean():.3f} over {int(r.notna().sum())} genes")
    c.print(f'[bold]{pred.shape[0]} spots x {pred.shape[1]} genes[/bold] -> {out} (obsm["genst_pred"], obsm["genst_sd"])')


def sample(
    model: Path = MODEL,
    data: str = DATA,
    out: Path = typer.Option(..., "--out", "-o", help='Output .h5ad with obsm["genst_samples"] (spots x samples x genes).'),
    n_samples: int = typer.Option(32, help="Draws per spot."),
    temperature: Optional[float] = TEMPERATURE,
    top_k: Optional[int] = TOP_K,
    counts: bool = typer.Option(False, help="Also draw counts from each code's negative binomial."),
    seed: int = typer.Option(0, help="Seed of the draws (same seed, same samples)."),
    sections: Optional[str] = SECTIONS,
    extract: bool = EXTRACT,
) -> None:
    """Draw expression samples (log1p) per spot; their SD goes to obsm["genst_sd"]."""
    from rich.console import Console

    import stdistill as sd

    m, a = _model_and_data(model, data, out, sections, extract)
    m.sample(a, n_samples, temperature=temperature, top_k=top_k, counts=counts, seed=seed, extract=extract)
    m.predict(a, sd_key=None, temperature=temperature, top_k=top_k)  # the samples' SD stays in obsm["genst_sd"]
    draws = a.obsm[Key.obsm.genst_samples]
    a.uns[Key.uns.genst] = {"genes": list(m.genes_), "params": {"n_samples": n_samples, "counts": counts, "seed": seed,
                                                          "temperature": temperature or m.config.temperature,
                                                          "top_k": top_k if top_k is not None else (m.config.top_k or 0)}}
    sd.io.write_h5ad(a, out)
    Console().print(f'[bold]{draws.shape[0]} spots x {n_samples} samples x {draws.shape[2]} genes[/bold] -> {out} '
                    '(obsm["genst_samples"], obsm["genst_sd"], obsm["genst_pred"])')


def register(app: typer.Typer) -> None:
    """``stdistill genst fit|predict|sample``."""
    sub = typer.Typer(help="GenST: expression generated from H&E through aligned VQ-VAEs, with its uncertainty.",
                      no_args_is_help=True)
    app.add_typer(sub, name="genst")
    for name, fn in (("fit", fit), ("predict", predict), ("sample", sample)):
        sub.command(name)(fn)
