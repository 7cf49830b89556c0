"""The `kdcode` command line: a thin Typer layer over library functions, one small module per group.

Each command parses flags into a spec, calls one library function, and prints a rich table (or JSON).
Errors the user can fix are one line on stderr and a non-zero exit; `--debug` shows the traceback instead.
"""

from __future__ import annotations

from typing import Annotated

import typer

from kdcode import __version__
from kdcode.cli import cache, data, export, measure, plan, serving, study, tools, train

app = typer.Typer(
    name="kdcode",
    help="Distil code-completion language models into small, fast students, and measure them honestly.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdcode {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Distil code-completion language models into small, fast students, and measure them honestly."""
    ctx.obj = {"debug": debug}


for module in (train, plan, cache, measure, study, serving, tools, export):
    module.register(app)
app.add_typer(data.data_app, name="data")


def main() -> None:
    """Console entry point."""
    app()
