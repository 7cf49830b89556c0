"""Where the CLI prints: consoles that print text as it is, never reading Rich markup (a model path holding
``[/b]`` prints as it is, as does ``pip install 'kdcode[onnx]'``), lines whose label alone is coloured, and the
metrics tables. Colour comes from :func:`styled` (a Rich ``Text``), never from tags inside a message."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Wide tables are cut to 80 columns when stdout is not a terminal; printed that wide they keep every figure.
PIPE_WIDTH = 400


def out_console() -> Console:
    """stdout, printing text as it is (no markup); as wide as any table needs when it is not a terminal (a pipe,
    a file, CI)."""
    console = Console(markup=False, highlight=False)
    return console if console.is_terminal else Console(width=PIPE_WIDTH, markup=False, highlight=False)


def err_console() -> Console:
    """stderr, printing text as it is (no markup)."""
    return Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def styled(label: str, style: str, rest: str = "") -> Text:
    """A message line: ``label`` in ``style`` (e.g. "green"), then ``rest``; both are text, never markup."""
    return Text.assemble((label, style), f" {rest}" if rest else "")


def metrics_table(title: str, rows: list[tuple[str, dict[str, Any]]], columns: list[tuple[str, str]]) -> Table:
    """Cells are Text: "[min-max]" and a model path with brackets print as they are, on any console."""
    table = Table(title=Text(title))
    table.add_column("model")
    for _, header in columns:
        table.add_column(header, justify="right")
    for label, row in rows:
        table.add_row(Text(label), *(Text("" if row.get(k) is None else str(row.get(k))) for k, _ in columns))
    return table
