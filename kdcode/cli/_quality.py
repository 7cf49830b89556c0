"""The before/after quality check's flags and lines, shared by `kdcode compress` and `kdcode export`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kdcode.cli._common import warn
from kdcode.cli._console import out_console

CheckSamplesOpt = Annotated[
    int, typer.Option(help="Held-out line completions scored before and after, for ES (0 skips).")
]
CheckBlocksOpt = Annotated[int, typer.Option(help="Held-out blocks scored before and after, for perplexity (0 skips).")]
MaxEsDropOpt = Annotated[float, typer.Option(help="Warn when ES drops by more than this many points.")]
MaxPplRiseOpt = Annotated[float, typer.Option(help="Warn when perplexity rises by more than this many percent.")]


def check_flags(check_samples: int, check_blocks: int, max_es_drop: float, max_ppl_rise: float) -> dict[str, Any]:
    return {"check_samples": check_samples, "check_blocks": check_blocks, "max_es_drop": max_es_drop,
            "max_ppl_rise": max_ppl_rise}


def print_quality(quality: dict[str, Any] | None) -> None:
    """The quality check's lines on stdout, its warning (when beyond the thresholds) on stderr."""
    from kdcode.compression.quality import quality_lines

    for line in quality_lines(quality):
        out_console().print(line)
    if quality and quality.get("warning"):
        warn(quality["warning"])
