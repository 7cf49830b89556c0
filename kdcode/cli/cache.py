"""`kdcode cache-teacher`: a frozen teacher's top-k soft targets over the training blocks, stored for reuse."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from kdcode.cli._common import OverwriteOpt, fail, handle_errors
from kdcode.cli._console import out_console, styled
from kdcode.cli._options import from_flags, spec_option
from kdcode.spec import CacheSpec, StrategySpec

T = functools.partial(spec_option, CacheSpec)  # cache-teacher's options: fields of its spec


@handle_errors
def cache_teacher(
    out: Annotated[Path, typer.Option(help="Cache folder to write.")],
    teacher: T("teacher", "--teacher") = None,
    data: T("data.source", "--data") = None,
    glob: T("data.glob") = None,
    data_format: T("data.format", "--format") = None,
    block_size: T("block_size") = None,
    top_k: T("top_k") = None,
    temperature: T("temperature") = None,
    batch_size: T("batch_size") = None,
    max_blocks: T("max_blocks") = None,
    max_steps: T("max_steps") = None,
    train_batch_size: T("train_batch_size") = None,
    fim_rate: T("data.fim.rate", "--fim-rate") = None,
    fim_spm_rate: T("data.fim.spm_rate", "--fim-spm-rate") = None,
    fim_mode: T("data.fim.mode", "--fim-mode") = None,
    fim_format: T("data.fim.format", "--fim-format") = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run a frozen teacher once over the training blocks and store its top-k soft targets for reuse.

    The blocks are FIM-transformed as `distil` will transform them: give it the same --fim-* flags. By default the
    whole training split is cached; --max-steps/--max-blocks cache what one run reads (`distil --teacher-cache`
    builds or grows a cache to its own run by itself)."""
    from kdcode.train.distil import run_cache_teacher

    spec = from_flags(CacheSpec, cache_teacher, locals())
    if spec.max_blocks is not None and spec.max_steps is not None:
        fail("give --max-blocks or --max-steps, not both")
    limit = spec.max_blocks if spec.max_steps is None else spec.max_steps * spec.train_batch_size
    temperature = default_temperature() if spec.temperature is None else spec.temperature
    m = run_cache_teacher(spec.teacher, spec.data, spec.block_size, spec.top_k, temperature, out, spec.batch_size,
                          overwrite, max_blocks=limit)
    out_console().print(styled(
        "teacher cache written to", "green", f"{out}  ({m['blocks']} of {m['total_blocks']} training blocks of "
        f"{m['block_size']} tokens, "
        f"top-{m['top_k']} at T={m['temperature']}); use: kdcode distil --teacher {spec.teacher} --teacher-cache "
        f"{out}"
    ))


def default_temperature() -> float:
    """The temperature a `distil` run with no strategy flags asks a teacher cache for."""
    from kdcode.plugins import make_strategy
    return float(make_strategy(StrategySpec().name, {}).params.temperature)


def register(app: typer.Typer) -> None:
    app.command("cache-teacher")(cache_teacher)
