"""``stdistill predict SLIDE --model BUNDLE --out DIR``: any trained student on a whole H&E slide."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import _split, command_line


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict(
        slide: Path = typer.Argument(..., help="H&E image: SVS/TIFF/OME-TIFF (tiffslide) or JPEG/PNG (with --mpp)."),
        model: Path = typer.Option(..., "--model", "-m", help="Model bundle folder (config.json + model.safetensors)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (maps/, .h5ad, .geojson, chunks/ for resuming)."),
        mpp: Optional[float] = typer.Option(None, "--mpp", help="Microns per pixel of the full-resolution image (default: from the slide's metadata)."),
        genes: Optional[str] = typer.Option(None, "--genes", help="Comma-separated genes to map (default: the first four the model predicts)."),
        chunk_tiles: int = typer.Option(256, "--chunk-tiles", min=1, help="Tiles per chunk (memory holds about one chunk of patches)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, help="Patches per forward pass."),
        min_tissue: float = typer.Option(0.5, "--min-tissue", min=0.0, max=1.0, help="Least tissue fraction of a tile (0-1)."),
        device: str = typer.Option("cpu", "--device", help="'cpu', 'cuda', 'cuda:1' ..."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh when OUT holds a run with other inputs."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        zarr: bool = typer.Option(False, "--zarr", help="Also write <slide>.zarr, a SpatialData store (extra [spatialdata])."),
    ) -> None:
        """Tissue detection, tiling at the model's patch size, features, prediction, maps; resumable."""
        from ..slide import predict_slide

        r = predict_slide(slide, model, out, mpp=mpp, chunk_tiles=chunk_tiles, batch_size=batch_size, device=device,
                          min_tissue=min_tissue, map_genes=_split(genes) or None, quiet=quiet, overwrite=overwrite,
                          command=command_line(), zarr=zarr)
        if not quiet:
            done = f" ({r.chunks_reused} finished chunks reused)" if r.chunks_reused else ""
            typer.echo(f"{r.n_tiles} tiles in {r.seconds:.1f} s{done}")
            for p in (r.h5ad, r.geojson, *r.maps, *([r.zarr] if r.zarr else [])):
                typer.echo(f"wrote {p}")
