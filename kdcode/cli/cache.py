"""`kdcode cache-teacher`: a frozen teacher's top-k soft targets over the training blocks, stored for reuse."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kdcode.cli._common import (
    TEACHER_HELP,
    FimFormatOpt,
    FimModeOpt,
    FimRateOpt,
    FimSpmRateOpt,
    OverwriteOpt,
    fail,
    fim_overrides,
    handle_errors,
    overrides,
)
from kdcode.cli._console import out_console, styled


@handle_errors
def cache_teacher(
    out: Annotated[Path, typer.Option(help="Cache folder to write.")],
    teacher: Annotated[str, typer.Option(help=TEACHER_HELP)] = "bundled",
    data: Annotated[str, typer.Option(help="Corpus whose train split is cached.")] = "stdlib",
    glob: Annotated[str, typer.Option(help="File pattern inside a data folder.")] = "**/*.py",
    data_format: Annotated[str, typer.Option("--format", help="raw or py150.")] = "raw",
    block_size: Annotated[int, typer.Option(help="Tokens per block (must match the distil runs).")] = 256,
    top_k: Annotated[int, typer.Option(help="Teacher logits kept per position.")] = 64,
    temperature: Annotated[float | None, typer.Option(help="Temperature of the stored soft targets (default: what "
                                                     "the default strategy asks for).")] = None,
    batch_size: Annotated[int, typer.Option(help="Blocks per teacher forward pass.")] = 8,
    max_blocks: Annotated[int | None, typer.Option(min=1, help="Cache only this many training blocks (a seeded "
                                                   "random sample; distil grows it when a run needs more).")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Size the cache to a run of this many steps "
                                                  "(x --train-batch-size blocks).")] = None,
    train_batch_size: Annotated[int, typer.Option(min=1, help="The distil run's batch size (with --max-steps).")] = 16,
    fim_rate: FimRateOpt = None,
    fim_spm_rate: FimSpmRateOpt = None,
    fim_mode: FimModeOpt = None,
    fim_format: FimFormatOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run a frozen teacher once over the training blocks and store its top-k soft targets for reuse.

    The blocks are FIM-transformed as `distil` will transform them: give it the same --fim-* flags. By default the
    whole training split is cached; --max-steps/--max-blocks cache what one run reads (`distil --teacher-cache`
    builds or grows a cache to its own run by itself)."""
    from kdcode.spec import DataSpec, build_spec
    from kdcode.train.distil import run_cache_teacher

    fim = fim_overrides(fim_rate, fim_spm_rate, fim_mode, fim_format) or None
    spec: Any = build_spec(DataSpec, {"source": data, "glob": glob, "format": data_format,
                                      **overrides({"fim": fim})}, "flags")
    if max_blocks is not None and max_steps is not None:
        fail("give --max-blocks or --max-steps, not both")
    limit = max_blocks if max_steps is None else max_steps * train_batch_size
    if temperature is None:
        temperature = default_temperature()
    m = run_cache_teacher(teacher, spec, block_size, top_k, temperature, out, batch_size, overwrite,
                          max_blocks=limit)
    out_console().print(styled(
        "teacher cache written to", "green", f"{out}  ({m['blocks']} of {m['total_blocks']} training blocks of "
        f"{m['block_size']} tokens, "
        f"top-{m['top_k']} at T={m['temperature']}); use: kdcode distil --teacher {teacher} --teacher-cache {out}"
    ))


def default_temperature() -> float:
    """The temperature a `distil` run with no strategy flags asks a teacher cache for."""
    from kdcode.plugins import make_strategy
    from kdcode.spec import StrategySpec

    return float(make_strategy(StrategySpec().name, {}).params.temperature)


def register(app: typer.Typer) -> None:
    app.command("cache-teacher")(cache_teacher)
