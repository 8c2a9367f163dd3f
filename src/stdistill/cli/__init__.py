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


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"stdistill {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (same as STDISTILL_PROGRESS=0)."),
) -> None:
    """Distil spatial transcriptomics into H&E-only models (run a subcommand with --help)."""
    if quiet:  # for this command only (and the worker processes it starts); restored when it ends
        import os

        from .._utils import PROGRESS_ENV

        before = os.environ.get(PROGRESS_ENV)
        os.environ[PROGRESS_ENV] = "0"
        ctx.call_on_close(lambda: os.environ.pop(PROGRESS_ENV) if before is None else os.environ.update({PROGRESS_ENV: before}))


def _register() -> None:
    import importlib

    for mod in ("data", "demo", "encoders", "niches", "expression", "pathways", "genst", "survival", "predict", "report"):
        try:
            importlib.import_module(f".{mod}", __name__).register(app)
        except ModuleNotFoundError as e:  # a sub-app not written yet
            if e.name != f"{__name__}.{mod}":
                raise


_register()


def _is_usage_error(e: BaseException) -> bool:
    """A click/typer usage error (typer vendors its own click, so match by shape, not class)."""
    return isinstance(getattr(e, "exit_code", None), int) and hasattr(e, "format_message") and hasattr(e, "show")


def main() -> None:
    """The ``stdistill`` entry point: bad input and usage errors print one ``error:`` line, exit 2."""
    try:
        rc = app(standalone_mode=False)
    except StdistillError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:
        if not _is_usage_error(e):
            raise
        msg = " ".join(e.format_message().split())
        if not msg:  # no arguments: help was printed
            sys.exit(0)
        cmd = getattr(getattr(e, "ctx", None), "command_path", None) or "stdistill"
        typer.secho(f"error: {msg} (see '{cmd} --help')", fg="red", err=True)
        sys.exit(e.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)
