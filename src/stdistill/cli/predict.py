"""``stdistill predict SLIDE --model BUNDLE --out DIR``: any trained student on a whole H&E slide,
or on every slide of a cohort (a folder of slides or a CSV of paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import _split, command_line


def _cohort(source: Path, model: Path, out: Path, shard: Optional[str], merge: bool, quiet: bool, **kw) -> None:
    from .._errors import StdistillError
    from ..slide import predict_cohort

    r = predict_cohort(source, model, out, shard=shard, merge_only=merge, quiet=True, log=None if quiet else typer.echo,
                       command=command_line(), **kw)
    n = len(r.ok) + len(r.failed)
    if kw.get("clinical") is not None and (out / "km.json").is_file():
        import json

        km = json.loads((out / "km.json").read_text())
        typer.echo(f"Kaplan-Meier of the predicted groups: log-rank p = {km['logrank_p']}; wrote {out / 'km.png'}")
    if not quiet or merge:
        kept = f", {len(r.reused)} finished earlier" if r.reused else ""
        typer.echo(f"{len(r.ok)} of {n} slides ok{kept}, {len(r.failed)} failed; wrote {r.summary}")
    if n and not r.ok:
        raise StdistillError(f"every slide failed ({n}); the reasons are in the 'error' column of {r.summary}")


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        slide: Path = typer.Argument(..., help="H&E image (SVS/TIFF/OME-TIFF through tiffslide, or JPEG/PNG with --mpp); "
                                               "or a cohort: a folder of slide images, or a CSV with a 'path' column "
                                               "(optional: mpp, slide_id, patient)."),
        model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder (config.json + model.safetensors)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (maps/, .h5ad, .geojson, chunks/ for resuming; "
                                                         "for a cohort one folder per slide and summary.csv)."),
        mpp: Optional[float] = typer.Option(None, "--mpp", help="Microns per pixel of the full-resolution image (default: "
                                                                "from the slide's metadata)."),
        force: bool = typer.Option(False, "--force", help="Accept an mpp outside 0.1-10 um/px or tiles under 16 px."),
        genes: Optional[str] = typer.Option(None, "--genes", help="Comma-separated genes to map (default: the first four "
                                                                  "the model predicts)."),
        chunk_tiles: int = typer.Option(256, "--chunk-tiles", min=1, help="Tiles per chunk (memory holds about one "
                                                                         "chunk of patches)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Patches per forward pass."),
        num_workers: int = typer.Option(2, "--num-workers", min=0, help="Processes reading and decoding tiles while "
                                                                        "the encoder runs (0: a thread)."),
        min_tissue: float = typer.Option(0.5, "--min-tissue", min=0.0, max=1.0, help="Least tissue fraction of a tile "
                                                                                    "(0-1)."),
        max_unreadable: float = typer.Option(0.1, "--max-unreadable", min=0.0, max=1.0, help="Largest share of tissue "
                                             "tiles that may fail to decode (skipped, counted); above it the slide "
                                             "is refused as damaged."),
        device: str = typer.Option("cpu", "--device", help="'cpu', 'cuda', 'cuda:1' ..."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh when OUT holds a run with other inputs."),
        shard: Optional[str] = typer.Option(None, "--shard", help="Cohorts: i/n runs every n-th slide from the i-th "
                                                                  "(0 <= i < n), e.g. $SLURM_ARRAY_TASK_ID/8."),
        merge: bool = typer.Option(False, "--merge", help="Cohorts: only rebuild OUT/summary.csv from the slides "
                                                          "finished so far (after a SLURM array)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        zarr: bool = typer.Option(False, "--zarr", help="Also write <slide>.zarr, a SpatialData store (extra "
                                                        "[spatialdata])."),
        window_mm: float = typer.Option(6.5, "--window-mm", min=0.01, help="GenST models: side in mm of the windows "
                                        "ranked by predicted uncertainty (where to sequence next; 6.5 = a Visium "
                                        "capture area)."),
        clinical: Optional[Path] = typer.Option(None, "--clinical", help="Cohorts, survival models: CSV with patient "
                                                "(or slide_id), time, event; writes Kaplan-Meier curves of the "
                                                "predicted risk groups with the log-rank p (km.png, km.json)."),
    ) -> None:
        """Tissue detection, tiling at the model's patch size, features, prediction, maps; resumable.
        Runs every model bundle: niche students, PEKA, STAMP, the frozen probe (expression maps), GenST
        (expression, uncertainty, windows to sequence next) and survival students (slide risk and its
        group from the model's stored cut, attention map). Broken slides are refused in one line
        (exit 2); in a cohort they are recorded and skipped."""
        kw = dict(mpp=mpp, force=force, chunk_tiles=chunk_tiles, batch_size=batch_size, num_workers=num_workers,
                  device=device, min_tissue=min_tissue, max_unreadable=max_unreadable, map_genes=_split(genes) or None,
                  overwrite=overwrite, zarr=zarr, window_mm=window_mm)
        if slide.is_dir() or slide.suffix.lower() == ".csv":
            return _cohort(slide, model, out, shard, merge, quiet, clinical=clinical, **kw)
        if shard or merge or clinical:
            from .._errors import StdistillError

            raise StdistillError("--shard, --merge and --clinical apply to cohorts (a folder of slides or a CSV)", slide)
        from ..slide import predict_slide

        r = predict_slide(slide, model, out, quiet=quiet, command=command_line(), **kw)
        if not quiet:
            done = f" ({r.chunks_reused} finished chunks reused)" if r.chunks_reused else ""
            bad = f"; {r.n_unreadable} unreadable tiles skipped" if r.n_unreadable else ""
            typer.echo(f"{r.n_tiles} tiles in {r.seconds:.1f} s{done}{bad}")
            if "risk" in r.summary:
                typer.echo(f"slide risk {r.summary['risk']:.4g}: {r.summary['risk_group']} (cut {r.summary['risk_cut']:.4g}, "
                           "stored in the model)")
            for p in (r.h5ad, r.geojson, *r.maps, *([r.zarr] if r.zarr else [])):
                typer.echo(f"wrote {p}")
