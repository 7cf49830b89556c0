"""`kdcode distil`, `kdcode pretrain`, `kdcode cache-teacher`: training commands."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from kdcode.cli._common import OverwriteOpt, TemperatureOpt, fail, handle_errors, overrides
from kdcode.cli._console import out_console, styled
from kdcode.cli._options import spec_flags, spec_option
from kdcode.spec import RunSpec, dump_yaml, read_spec_file, resolve_run_spec
from kdcode.spec_pretrain import PretrainSpec, resolve_pretrain_spec

MaxStepsOpt = Annotated[int | None, typer.Option(help="Stop after this many optimiser steps.")]
EpochsOpt = Annotated[float | None, typer.Option(help="Stop after this many passes over the train split.")]
MaxMinutesOpt = Annotated[float | None, typer.Option(help="Wall-clock budget; the LR schedule follows it.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
CheckpointEveryOpt = Annotated[int | None, typer.Option(help="Checkpoint into OUT.ckpt every N steps.")]
TensorboardOpt = Annotated[bool, typer.Option("--tensorboard", help="Also log to OUT.tensorboard.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in OUT.ckpt.")]


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in OUT.ckpt.")]
R = functools.partial(spec_option, RunSpec)  # `kdcode distil`'s options: fields of its run spec
P = functools.partial(spec_option, PretrainSpec)


@handle_errors
def distil(
    spec: Annotated[Path | None, typer.Option("--spec", help="Run spec (YAML/JSON); flags override it.")] = None,
    teacher: R("teacher.name", "--teacher") = None,
    teacher_revision: R("teacher.revision", "--teacher-revision") = None,
    teacher_dtype: R("teacher.dtype", "--teacher-dtype") = None,
    layers: R("student.layers") = None,
    strategy: R("strategy.name", "--strategy") = None,
    init: R("student.init.name", "--init") = None,
    data: R("data.source", "--data") = None,
    glob: R("data.glob") = None,
    max_steps: R("train.max_steps") = None,
    epochs: R("train.epochs") = None,
    max_minutes: R("train.max_minutes") = None,
    lr: R("train.lr") = None,
    batch_size: R("train.batch_size") = None,
    block_size: R("train.block_size") = None,
    temperature: TemperatureOpt = None,
    hidden_size: R("student.hidden_size") = None,
    heads: R("student.heads") = None,
    teacher_cache: R("teacher_cache") = None,
    latency_ms: R("latency.latency_ms") = None,
    prompt_tokens: R("latency.prompt_tokens") = None,
    new_tokens: R("latency.new_tokens") = None,
    precisions: R("latency.precisions") = None,
    run_threads: R("latency.threads", "--run-threads") = None,
    proxy_steps: R("latency.proxy_steps") = None,
    tie_steps: R("latency.tie_steps") = None,
    fim_rate: R("data.fim.rate", "--fim-rate") = None,
    fim_spm_rate: R("data.fim.spm_rate", "--fim-spm-rate") = None,
    fim_mode: R("data.fim.mode", "--fim-mode") = None,
    fim_format: R("data.fim.format", "--fim-format") = None,
    grad_accum: R("train.grad_accum") = None,
    loss_chunk: R("train.loss_chunk") = None,
    activation_checkpointing: R("train.activation_checkpointing") = None,
    checkpoint_every: R("train.checkpoint_every") = None,
    tensorboard: R("train.tensorboard") = None,
    resume: ResumeOpt = False,
    precision: R("train.precision") = None,
    seed: R("train.seed") = None,
    out: R("out") = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: R("teacher.trust_remote_code") = None,
    allow_pickle: R("teacher.allow_pickle") = None,
    print_spec: Annotated[bool, typer.Option("--print-spec", help="Print the resolved spec as YAML and exit.")] = False,
    validate: Annotated[bool, typer.Option("--validate", help="Check the spec and plugins only.")] = False,
) -> None:
    """Distil a teacher into a smaller student (default: the bundled teacher into 6 layers on the stdlib).

    Without --fim-* flags (data.fim) the student is trained with fill-in-the-middle as its teacher was, if it was."""
    flags = spec_flags(distil, locals()) | overrides({"strategy.params.temperature": temperature})
    if latency_ms is not None and (layers is not None or init is not None):
        fail("--latency-ms chooses the student's depth and blocks by measurement; drop "
             + ("--layers" if layers is not None else "--init"))
    run = resolve_run_spec(read_spec_file(spec) if spec else {}, flags, str(spec) if spec else "flags")
    if print_spec:
        typer.echo(dump_yaml(run), nl=False)
        return
    if validate:
        from kdcode.models.load import check_depth
        from kdcode.plugins import validate_plugins

        validate_plugins(run)
        if run.student.init.name != "pretrained" and run.latency is None:
            check_depth(run.teacher.name, run.student.layers, run.teacher.revision)
        typer.echo(f"spec is valid: strategy {run.strategy.name!r}, init {run.student.init.name!r}")
        return
    from kdcode.train.distil import run_distil

    folder, manifest = run_distil(run, overwrite=overwrite, resume=resume)
    if not manifest:  # a data-parallel worker process: the main process reports
        return
    console = out_console()
    tr = manifest["training"]
    console.print(styled(
        "student written to", "green", f"{folder}  ({manifest['model']['n_layer']} layers, "
        f"{manifest['model']['params_m']}M params, {tr['steps']} steps in {tr['wall_time_s']:.0f} s, "
        f"valid loss {tr['final'].get('valid_loss', float('nan')):.3f})"
    ))
    _print_skipped(console, manifest, run.data)
    console.print("next:")
    console.print(f"  kdcode eval {folder}")
    console.print(f"  kdcode bench {folder} --compare {run.teacher.name}")


@handle_errors
def pretrain(
    data: P("data.source", "--data") = None,
    glob: P("data.glob") = None,
    exclude_tests: P("data.exclude_tests", "--exclude-tests/--include-tests") = None,
    layers: P("model.layers") = None,
    hidden: P("model.hidden") = None,
    heads: P("model.heads") = None,
    vocab_size: P("model.vocab_size") = None,
    block_size: P("train.block_size") = None,
    tokenizer: P("tokenizer") = None,
    init: P("init") = None,
    max_steps: P("train.max_steps") = None,
    epochs: P("train.epochs") = None,
    max_minutes: P("train.max_minutes") = None,
    lr: P("train.lr") = None,
    warmup_steps: P("train.warmup_steps") = None,
    batch_size: P("train.batch_size") = None,
    eval_every: P("train.eval_every") = None,
    fim_rate: P("data.fim.rate", "--fim-rate") = None,
    fim_spm_rate: P("data.fim.spm_rate", "--fim-spm-rate") = None,
    fim_mode: P("data.fim.mode", "--fim-mode") = None,
    fim_format: P("data.fim.format", "--fim-format") = None,
    checkpoint_every: P("train.checkpoint_every") = None,
    tensorboard: P("train.tensorboard") = None,
    resume: ResumeOpt = False,
    precision: P("train.precision") = None,
    seed: P("train.seed") = None,
    out: P("out") = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a byte-level BPE tokenizer and a GPT-2 from scratch on code (how the bundled teacher was made).

    --fim-rate trains fill-in-the-middle (FIM tokens are added to a tokenizer without them); with --init and no
    --fim-* flags, FIM goes on as the --init model was trained."""
    from kdcode.train.pretrain import run_pretrain

    spec = resolve_pretrain_spec(spec_flags(pretrain, locals()), "flags")
    folder, manifest = run_pretrain(spec, overwrite=overwrite, resume=resume)
    tr = manifest["training"]
    out_console().print(styled(
        "model written to", "green", f"{folder}  ({manifest['model']['params_m']}M params, {tr['steps']} steps, "
        f"{tr['tokens_seen']} tokens in {tr['wall_time_s']:.0f} s, "
        f"valid loss {tr['final'].get('valid_loss', float('nan')):.3f})"
    ))
    _print_skipped(out_console(), manifest, spec.data)


def _print_skipped(console: Any, manifest: dict[str, Any], data: Any) -> None:
    from kdcode.data.corpus import skip_reasons

    skipped = Counter(manifest.get("data", {}).get("skipped") or {})
    if skipped:
        console.print(styled("skipped:", "yellow", skip_reasons(skipped, data)))


def register(app: typer.Typer) -> None:
    app.command()(distil)
    app.command()(pretrain)
