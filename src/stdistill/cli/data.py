"""``stdistill info`` and ``stdistill demo``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        path: str = typer.Argument(..., help="An .h5ad file, a Visium outs/ folder, a her2st copy, or a dataset name: 'her2st', 'simulated', 'mob'."),
    ) -> None:
        """Summarise sections: spots, genes, microns per pixel, image size, spots inside the image, labels."""
        from ..io.summary import load_any, summarise

        summarise(load_any(path))
