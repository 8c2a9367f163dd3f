"""The ``stdistill`` command. Sub-apps live beside this file, one per concern; heavy imports
happen inside commands so ``--help`` stays fast. Bad input prints one ``error:`` line, exit 2."""

from __future__ import annotations

import sys

import typer

from .._errors import StdistillError

app = typer.Typer(
    name="stdistill",
    help="Distil spatial transcriptomics into H&E-only models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Distil spatial transcriptomics into H&E-only models (run a subcommand with --help)."""


def _register() -> None:
    import importlib

    for mod in ("data", "demo", "encoders", "niches", "expression", "pathways", "genst", "survival"):
        try:
            importlib.import_module(f".{mod}", __name__).register(app)
        except ModuleNotFoundError as e:  # a sub-app not written yet
            if e.name != f"{__name__}.{mod}":
                raise


_register()


def main() -> None:
    try:
        app(standalone_mode=False)
    except StdistillError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
