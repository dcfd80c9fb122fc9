"""The ``cxrloc`` command line (typer + rich).

Each command lives in its own module of this package with a ``register(app)``
function; the modules only parse options and call one library function.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from cxrloc import __version__
from cxrloc.cli import (
    calibrate,
    demo,
    ensemble,
    evaluate,
    export,
    fit_thresholds,
    predict,
    prepare,
    pretrain,
    train,
)
from cxrloc.utils import CxrlocError, console, os_error_message

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
for _module in (prepare, pretrain, train, ensemble, predict, export, fit_thresholds, calibrate, evaluate, demo):
    _module.register(app)


def _error(message: str) -> None:
    # soft_wrap: the message stays one line (greppable, copyable) whatever the terminal width.
    console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every failure into one clear line, never a traceback.

    typer handles usage errors (unknown option, bad value) itself in standalone mode (exit 2).
    A ``CxrlocError`` raised by a command (bad input, option or output) reaches here and is
    printed without a traceback (exit 2). As the last line of defence, an unexpected
    ``OSError`` (a disk that fills up, a folder that becomes read-only) or ``MemoryError`` is
    also printed as one line (exit 1).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``); tests pass them here.
    """
    try:
        app(args=argv)
    except CxrlocError as exc:
        _error(str(exc))
        sys.exit(2)
    except OSError as exc:
        _error(os_error_message(exc))
        sys.exit(1)
    except MemoryError:
        _error("out of memory; use smaller inputs, a smaller --batch-size or fewer --workers")
        sys.exit(1)
