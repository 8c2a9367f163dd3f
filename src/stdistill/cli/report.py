"""``stdistill report RUN_DIR``: one self-contained HTML page for a predict or benchmark folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(..., help="A 'stdistill predict' output folder or a benchmark folder (results.csv, table.md, PNGs)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
    ) -> None:
        """What was run (command, versions, data, encoder licence), metrics with spreads, the maps."""
        from ..report import write_report

        typer.echo(f"wrote {write_report(run_dir, out)}")
