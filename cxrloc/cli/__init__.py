"""The ``cxrloc`` command line (typer + rich).

Each command lives in its own module of this package with a ``register(app)``
function; the modules only parse options and call one library function.
"""

from __future__ import annotations

import sys

import typer

from cxrloc import __version__
from cxrloc.cli import calibrate, demo, ensemble, evaluate, export, fit_thresholds, predict, prepare, train
from cxrloc.utils import CxrlocError, console

app = typer.Typer(
    name="cxrloc",
    help="Localize chest X-ray findings with limited box annotation (Rozenberg et al. 2019).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _version(value: bool) -> None:
    if value:
        typer.echo(f"cxrloc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """cxrloc: localization with limited annotation for chest X-rays."""


# The commands, in the order of the pipeline (each module only parses options and calls the library).
for _module in (prepare, train, ensemble, predict, export, fit_thresholds, calibrate, evaluate, demo):
    _module.register(app)


def main() -> None:
    """Entry point: run the app, turning user errors into one clear line and exit code 2.

    typer handles usage errors (unknown option, bad value) itself in standalone mode;
    a ``CxrlocError`` raised by a command reaches here and is printed without a traceback.
    """
    try:
        app()
    except CxrlocError as exc:
        console.print(f"[bold red]Error:[/] {exc}", highlight=False)
        sys.exit(2)
