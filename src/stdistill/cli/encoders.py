"""``stdistill encoders list`` and ``stdistill features``."""

from __future__ import annotations

from pathlib import Path

import typer

from .._keys import Key


def _load_data(data: str):
    """Validated sections (:func:`stdistill.io.load_any`); her2st is read with its imaged sections only."""
    if data.lower() == "her2st" and not Path(data).exists():
        from ..datasets import her2st

        return her2st(images_only=True)
    from ..io import load_any

    return load_any(data)


def _write(adata, out: Path) -> None:
    from .._utils import follow_umask
    from ..io import write_h5ad

    write_h5ad(adata, out)
    follow_umask(out)  # atomic writes start as 0600 temporary files; follow the umask like a plain write


def _manifest(console, manifest: str, out: Path, encoder: str, kwargs: dict) -> None:
    """``stdistill features MANIFEST -o DIR``: one output per entry; exit 1 when any entry failed."""
    import time

    from rich.table import Table

    from .._errors import StdistillError
    from ..features import extract_manifest

    if out.suffix == ".h5ad":
        raise StdistillError("a manifest writes one file per entry: --out must be a folder, not an .h5ad file", out)
    t0 = time.perf_counter()
    report = extract_manifest(manifest, out, encoder, **kwargs)
    table = Table(title=f"{encoder}: {len(report.entries)} manifest entries -> {out}")
    for col in ("entry", "spots", "status", "seconds"):
        table.add_column(col)
    for e in report.entries:
        table.add_row(e.name, str(e.n_spots or ""), e.status, f"{e.seconds:.1f}")
    console.print(table)
    counts: dict[str, int] = {}
    for e in report.entries:
        counts[e.status] = counts.get(e.status, 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in counts.items()) + f"; wall {time.perf_counter() - t0:.1f} s")
    if report.failed:
        typer.secho(f"{len(report.failed)} entr{'y' if len(report.failed) == 1 else 'ies'} failed:", fg="red", err=True)
        for e in report.failed:
            typer.secho(f"  {e.name}: {e.message}", fg="red", err=True)
        raise typer.Exit(1)


def list_cmd() -> None:
    """Print every registered encoder: name, dimension, licence, gated, usable offline."""
    from rich.console import Console
    from rich.table import Table

    from ..encoders import list_encoders

    df = list_encoders()
    table = Table(title="stdistill encoders", show_lines=False)
    for col in ("name", "dim", "input px", "licence", "gated", "usable offline", "students restricted", "stain (auto)"):
        table.add_column(col, overflow="fold")
    yes = {True: "yes", False: "no"}
    for name, r in df.iterrows():
        table.add_row(
            str(name), str(r["dim"]), str(r["input_px"]), str(r["licence"]), yes[bool(r["gated"])],
            yes[bool(r["usable_offline"])], yes[bool(r["restricts_derivatives"])], str(r["stain_norm"] or "none"),
        )
    console = Console(width=max(120, Console().width))
    console.print(table)
    console.print(
        "The default effnet-lite0-imagenet is an ImageNet model, not a pathology model. 'students restricted': "
        "the licence counts students distilled from the encoder's features as (non-commercial) derivatives. "
        "'stain (auto)': the stain normalisation of 'stdistill features --stain-norm auto'. "
        "See docs/encoders.md."
    )


def _imaged_sections(console, data: str):
    """The sections of ``data`` that have an image (the others left out, with one line saying so)."""
    from .._errors import StdistillError
    from ..io import has_image, sections, subset_sections

    adata = _load_data(data)
    secs = sections(adata)
    imaged = [s for s in secs if has_image(adata, s)]
    if not imaged:
        raise StdistillError("no section has an H&E image", data)
    if len(imaged) < len(secs):
        console.print(f"left out {len(secs) - len(imaged)} section(s) without an image: {[s for s in secs if s not in imaged]}")
        adata = subset_sections(adata, imaged)
    return adata


def _print_extraction(console, report, adata, out: Path, views: int, t_load: float, t_write: float, t0: float) -> None:
    """Per-section table, counts and timings of one extraction."""
    import time

    from rich.table import Table

    table = Table(title=f"{report.key_added}: {report.encoder} on {report.device}, {report.precision}")
    for col in ("section", "spots", "features"):
        table.add_column(col)
    for s in report.sections:
        table.add_row(s.section, str(s.n_spots), s.status)
    console.print(table)
    hits = sum(s.status == "cache hit" for s in report.sections)
    console.print(
        f"{adata.n_obs} spots, {len(report.sections)} sections ({hits} cache hits, "
        f"{report.patches_computed} patches computed); load {t_load:.1f} s, extract {report.seconds:.1f} s, "
        f"write {t_write:.1f} s; wall {time.perf_counter() - t0:.1f} s -> {out}"
    )
    if views:
        console.print(f"augmented views: {report.views} views x {adata.n_obs} spots in {report.seconds_views:.1f} s "
                      f"({report.seconds_views / report.views:.1f} s per view; clean pass {report.seconds_clean:.1f} s)")


def features_cmd(
    data: str = typer.Argument(..., help="An .h5ad file, a dataset name ('her2st': imaged sections, 'simulated'), or a "
                               "manifest of many slides (.tsv/.csv with a 'path' column; see docs/encoders.md)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .h5ad with obsm['X_<encoder>'] (written atomically); "
                             "for a manifest, a folder receiving <name>.h5ad per entry."),
    encoder: str = typer.Option("effnet-lite0-imagenet", "--encoder", "-e", help="Registry name (stdistill encoders list)."),
    size_um: float = typer.Option(112.0, "--size-um", help="Patch side in micrometres."),
    px: int = typer.Option(224, "--px", help="Patch side in pixels."),
    batch_size: int = typer.Option(64, "--batch-size", help="Patches per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16, fp16."),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader worker processes (0: a background thread)."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Feature cache (default $STDISTILL_CACHE/features or ~/.cache/stdistill/features)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the feature cache."),
    weights: Path | None = typer.Option(None, "--weights", help="Local weights (safetensors or a state dict)."),
    devices: int = typer.Option(1, "--devices", help="Processes/GPUs per node; > 1 uses Lightning DDP."),
    strategy: str = typer.Option("ddp_spawn", "--strategy", help="Lightning strategy when --devices > 1 (ddp, ddp_spawn)."),
    stain_norm: str | None = typer.Option(None, "--stain-norm", help="Normalise stains first: auto (the encoder's registry choice, "
                                                "see 'stdistill encoders list'), macenko or reinhard (needs stdistill[stain])."),
    stain_reference: str | None = typer.Option(
        None, "--stain-reference",
        help="Reference stain: a section name here (default: the first imaged section), or a features .h5ad "
             "of the training sections (its stored reference: new slides normalised as the training ones)."),
    views: int = typer.Option(0, "--views", help="Also encode this many augmented views per patch (obsm['<key>_views'])."),
    view_seed: int = typer.Option(0, "--view-seed", help="Seed of the augmented views."),
    key_added: str | None = typer.Option(None, "--key-added", help="obsm key to write (default X_<encoder>); e.g. "
                                         "X_<encoder>_ctx for a larger --size-um used as 'niches distill --context-key'."),
) -> None:
    """Encode a patch around every spot and write the sections with their features to --out."""
    import time

    from rich.console import Console

    from .._errors import StdistillError
    from ..features import run_extraction

    console = Console()
    t0 = time.perf_counter()
    common = dict(size_um=size_um, px=px, batch_size=batch_size, device=device, precision=precision,
                  num_workers=num_workers, cache_dir=False if no_cache else cache_dir, weights=weights)
    if Path(data).suffix.lower() in (".tsv", ".csv"):
        if devices > 1:
            raise StdistillError("--devices > 1 is not supported with a manifest; split the manifest across jobs instead")
        return _manifest(console, data, out, encoder, common)
    if out.suffix != ".h5ad":
        raise StdistillError("output must end in .h5ad", out)
    adata = _imaged_sections(console, data)
    t_load = time.perf_counter() - t0
    report = run_extraction(
        adata, encoder, **common, strategy=strategy if devices > 1 else None, devices=devices, stain_norm=stain_norm,
        stain_reference=_stain_reference(stain_reference, encoder), views=views, view_seed=view_seed,
        **({"key_added": key_added} if key_added else {}),
    )
    t1 = time.perf_counter()
    _write(adata, out)
    _print_extraction(console, report, adata, out, views, t_load, time.perf_counter() - t1, t0)


def register(app: typer.Typer) -> None:
    """``stdistill encoders list`` and ``stdistill features``."""
    enc_app = typer.Typer(help="Patch encoders: the registry of names.", no_args_is_help=True)
    enc_app.command("list")(list_cmd)
    app.add_typer(enc_app, name="encoders")
    app.command("features")(features_cmd)


def _stain_reference(value: str | None, encoder: str):
    """``--stain-reference``: None, a section name, or the stored reference of a features .h5ad."""
    if value is None or not value.endswith(".h5ad"):
        return value
    import anndata as ad

    from .._errors import StdistillError

    p = Path(value)
    if not p.is_file():
        raise StdistillError("no such features file for --stain-reference", p)
    stored = ad.read_h5ad(p).uns.get(Key.uns.features, {})
    rec = [v["stain"] for k, v in stored.items() if isinstance(v, dict) and "stain" in v and v.get("encoder") == encoder]
    if not rec:
        raise StdistillError(f"holds no stain reference for encoder {encoder!r} (extract it with --stain-norm first)", p)
    return dict(rec[0])
