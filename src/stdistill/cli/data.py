"""``stdistill info`` and ``stdistill import``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        path: str = typer.Argument(..., help="An .h5ad file, a Visium outs/ folder, a her2st copy, or a dataset name: 'her2st', 'simulated', 'mob'."),
    ) -> None:
        """Summarise sections: spots, genes, microns per pixel, image size, spots inside the image, labels."""
        from ..io.summary import load_any, summarise

        summarise(load_any(path))

    @app.command("import")
    def import_(
        counts: Path = typer.Argument(..., help="An .h5ad with obsm['spatial'] (image pixels), or a counts table (spots x genes, tab or comma)."),
        image: Path = typer.Option(..., "--image", help="Full-resolution H&E image the spot pixels refer to."),
        mpp: float = typer.Option(..., "--mpp", help="Microns per pixel of that image (e.g. 0.5 for a 20x scan)."),
        out: Path = typer.Option(..., "--out", "-o", help="The .h5ad to write (validated, atomic)."),
        positions: Optional[Path] = typer.Option(None, "--positions", help="Table of spot ids and pixel x, y (with a counts table)."),
        section: Optional[str] = typer.Option(None, "--section", help="Section name (default: the image's file name)."),
        patient: Optional[str] = typer.Option(None, "--patient", help="Patient (default: the section); folds are by patient."),
        spot_diameter_um: float = typer.Option(55.0, "--spot-diameter-um", help="Spot diameter in um (55 Visium, 100 legacy ST)."),
        x_col: Optional[str] = typer.Option(None, "--x-col", help="Positions column of pixel x (default: x, pxl_col_in_fullres, ...)."),
        y_col: Optional[str] = typer.Option(None, "--y-col", help="Positions column of pixel y (default: y, pxl_row_in_fullres, ...)."),
    ) -> None:
        """Your own data in one step: spots + counts + image into a validated stdistill .h5ad."""
        from ..io import read_spots, write_h5ad
        from ..io.summary import summarise

        a = read_spots(counts, image=image, microns_per_pixel=mpp, positions=positions, section=section,
                       patient=patient, spot_diameter_um=spot_diameter_um, x=x_col, y=y_col)
        write_h5ad(a, out)
        summarise(a)
        typer.echo(f"wrote {out}")
