"""`kdcode distil`, `kdcode pretrain`, `kdcode cache-teacher`: training commands."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from kdcode.cli._common import (
    AllowPickleOpt,
    DataOpt,
    FimFormatOpt,
    FimModeOpt,
    FimRateOpt,
    FimSpmRateOpt,
    GlobOpt,
    InitOpt,
    OverwriteOpt,
    PrecisionOpt,
    StrategyOpt,
    TeacherOpt,
    TemperatureOpt,
    TrustRemoteCodeOpt,
    fail,
    fim_overrides,
    handle_errors,
    overrides,
)
from kdcode.cli._console import out_console, styled
from kdcode.cli.plan import (
    LatencyMsOpt,
    NewTokensOpt,
    PrecisionsOpt,
    PromptTokensOpt,
    RunThreadsOpt,
    latency_overrides,
)

MaxStepsOpt = Annotated[int | None, typer.Option(help="Stop after this many optimiser steps.")]
EpochsOpt = Annotated[float | None, typer.Option(help="Stop after this many passes over the train split.")]
MaxMinutesOpt = Annotated[float | None, typer.Option(help="Wall-clock budget; the LR schedule follows it.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
CheckpointEveryOpt = Annotated[int | None, typer.Option(help="Checkpoint into OUT.ckpt every N steps.")]
TensorboardOpt = Annotated[bool, typer.Option("--tensorboard", help="Also log to OUT.tensorboard.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in OUT.ckpt.")]


@handle_errors
def distil(
    spec: Annotated[Path | None, typer.Option("--spec", help="Run spec (YAML/JSON); flags override it.")] = None,
    teacher: TeacherOpt = None,
    teacher_revision: Annotated[str | None, typer.Option(help="Hub revision (commit, branch, tag).")] = None,
    teacher_dtype: Annotated[str | None, typer.Option(help="Teacher held in fp32, bf16 or fp16.")] = None,
    layers: Annotated[int | None, typer.Option(help="Student depth (transformer blocks).")] = None,
    strategy: StrategyOpt = None,
    init: InitOpt = None,
    data: DataOpt = None,
    glob: GlobOpt = None,
    max_steps: MaxStepsOpt = None,
    epochs: EpochsOpt = None,
    max_minutes: MaxMinutesOpt = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Blocks per step.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per block.")] = None,
    temperature: TemperatureOpt = None,
    hidden_size: Annotated[int | None, typer.Option(help="Narrower student width (random/pretrained init).")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads of a narrower student.")] = None,
    teacher_cache: Annotated[str | None, typer.Option(help="Train from a teacher-logit cache (cache-teacher).")] = None,
    latency_ms: LatencyMsOpt = None,
    prompt_tokens: PromptTokensOpt = None,
    new_tokens: NewTokensOpt = None,
    precisions: PrecisionsOpt = None,
    run_threads: RunThreadsOpt = None,
    fim_rate: FimRateOpt = None,
    fim_spm_rate: FimSpmRateOpt = None,
    fim_mode: FimModeOpt = None,
    fim_format: FimFormatOpt = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimiser step.")] = None,
    loss_chunk: Annotated[int | None, typer.Option(help="Positions per KD-loss chunk (0: one pass).")] = None,
    activation_checkpointing: Annotated[bool, typer.Option(
        "--activation-checkpointing", help="Recompute the student's activations in the backward (less memory).")
    ] = False,
    checkpoint_every: CheckpointEveryOpt = None,
    tensorboard: TensorboardOpt = False,
    resume: ResumeOpt = False,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    out: Annotated[str | None, typer.Option(help="Student folder to write.")] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    print_spec: Annotated[bool, typer.Option("--print-spec", help="Print the resolved spec as YAML and exit.")] = False,
    validate: Annotated[bool, typer.Option("--validate", help="Check the spec and plugins only.")] = False,
) -> None:
    """Distil a teacher into a smaller student (default: the bundled teacher into 6 layers on the stdlib).

    Without --fim-* flags (data.fim) the student is trained with fill-in-the-middle as its teacher was, if it was."""
    from kdcode.spec import dump_yaml, read_spec_file, resolve_run_spec

    flags = overrides({
        "teacher.name": teacher, "teacher.revision": teacher_revision, "teacher.dtype": teacher_dtype,
        "teacher.trust_remote_code": trust_remote_code or None, "teacher.allow_pickle": allow_pickle or None,
        "student.layers": layers, "student.init.name": init, "student.hidden_size": hidden_size,
        "student.heads": heads, "strategy.name": strategy, "strategy.params.temperature": temperature,
        "teacher_cache": teacher_cache, "data.source": data, "data.glob": glob,
        "train.max_steps": max_steps, "train.epochs": epochs, "train.max_minutes": max_minutes, "train.lr": lr,
        "train.batch_size": batch_size, "train.block_size": block_size, "train.grad_accum": grad_accum,
        "train.loss_chunk": loss_chunk, "train.activation_checkpointing": activation_checkpointing or None,
        "train.checkpoint_every": checkpoint_every, "train.tensorboard": tensorboard or None,
        "train.precision": precision, "train.seed": seed, "out": out,
        "data.fim": fim_overrides(fim_rate, fim_spm_rate, fim_mode, fim_format) or None,
        **latency_overrides(latency_ms, None, prompt_tokens, new_tokens, precisions, run_threads),
    })
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
    data: Annotated[str, typer.Option(help="Folder of source files, .jsonl, HF dataset id, or 'stdlib'.")] = "stdlib",
    glob: Annotated[str, typer.Option(help="File pattern inside a data folder.")] = "**/*.py",
    include_tests: Annotated[bool, typer.Option(help="Keep the stdlib's test/ folders in the corpus.")] = False,
    layers: Annotated[int | None, typer.Option(help="Transformer blocks.  [default: 12]", show_default=False)] = None,
    hidden: Annotated[int | None, typer.Option(help="Model width.  [default: 128]", show_default=False)] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.  [default: 4]", show_default=False)] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="BPE vocabulary size.  [default: 8192]", show_default=False)
    ] = None,
    block_size: Annotated[int, typer.Option(help="Tokens per block (= the model's positions).")] = 256,
    tokenizer: Annotated[str | None, typer.Option(help="Reuse this tokenizer folder instead of training one.")] = None,
    init: Annotated[
        str | None,
        typer.Option(help="Continue training this GPT-2 (folder or 'bundled'); its shape and tokenizer are kept."),
    ] = None,
    max_steps: MaxStepsOpt = None,
    epochs: EpochsOpt = None,
    max_minutes: MaxMinutesOpt = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Blocks per step.")] = 16,
    eval_every: Annotated[int, typer.Option(help="Held-out loss every N steps.")] = 200,
    fim_rate: FimRateOpt = None,
    fim_spm_rate: FimSpmRateOpt = None,
    fim_mode: FimModeOpt = None,
    fim_format: FimFormatOpt = None,
    checkpoint_every: CheckpointEveryOpt = None,
    tensorboard: TensorboardOpt = False,
    resume: ResumeOpt = False,
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[str, typer.Option(help="Model folder to write.")] = "pretrained",
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a byte-level BPE tokenizer and a GPT-2 from scratch on code (how the bundled teacher was made).

    --fim-rate trains fill-in-the-middle (FIM tokens are added to a tokenizer without them); with --init and no
    --fim-* flags, FIM goes on as the --init model was trained."""
    from kdcode.spec import PretrainSpec, build_spec
    from kdcode.train.pretrain import run_pretrain

    budget = overrides({"max_steps": max_steps, "epochs": epochs, "max_minutes": max_minutes}) or {"max_steps": 1000}
    spec = build_spec(
        PretrainSpec,
        {
            "model": overrides({"layers": layers, "hidden": hidden, "heads": heads, "vocab_size": vocab_size}),
            "tokenizer": tokenizer,
            "init": init,
            "data": {"source": data, "glob": glob, "exclude_tests": not include_tests,
                     **overrides({"fim": fim_overrides(fim_rate, fim_spm_rate, fim_mode, fim_format) or None})},
            "train": {
                "lr": lr, "warmup_steps": warmup_steps, "batch_size": batch_size, "block_size": block_size,
                "eval_every": eval_every, "precision": precision, "seed": seed, "tensorboard": tensorboard,
                **budget, **overrides({"checkpoint_every": checkpoint_every}),
            },
            "out": out,
        },
        "flags",
    )
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
