"""The `kdcode` command line: a thin Typer layer over library functions.

Each command parses flags, calls one library function, and prints a rich table (or JSON). Errors the
user can fix are one line on stderr and a non-zero exit; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kdcode import __version__
from kdcode.errors import KdcodeError

app = typer.Typer(
    name="kdcode",
    help="Distil code-completion language models into small, fast students, and measure them honestly.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

EXIT_USAGE = 2
# Set by the root callback on every invocation. (Typer >= 0.29 vendors its own click, so
# click.get_current_context() does not see Typer's context; a module flag works with any version.)
_STATE: dict[str, bool] = {"debug": False}


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
    _STATE["debug"] = debug


def out_console() -> Console:
    return Console()


def fail(message: str, code: int = EXIT_USAGE) -> None:
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=code)


def write_json(path: Path | None, data: Any) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a KdcodeError into one line on stderr and exit code 2 (the traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdcodeError as exc:
            if _STATE["debug"]:
                raise
            fail(str(exc), code=exc.exit_code)
        except OSError as exc:  # disk full, permissions...: the system's own words, on one line
            if _STATE["debug"]:
                raise
            fail(f"{exc} (--debug shows the traceback)")
        except KeyboardInterrupt:
            fail("interrupted; no output folder was written", code=130)

    return wrapper


# Flags that `distil` and `sweep` share (None = keep the spec's value).
TeacherOpt = Annotated[str | None, typer.Option("--teacher", help="Teacher: 'bundled', a HF id or a local folder.")]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="Folder of source files, .jsonl, HF dataset id, or 'stdlib'.")
]
StrategyOpt = Annotated[str | None, typer.Option("--strategy", help="KD strategy (see `kdcode list`).")]
InitOpt = Annotated[str | None, typer.Option("--init", help="Student init scheme (see `kdcode list`).")]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", help="Softmax temperature of the soft loss.")]


def _record(model: str, name: str, metrics: dict[str, Any]) -> None:
    """--record: store ``metrics`` under manifest["metrics"][name] of a local model folder."""
    from kdcode.artifacts import update_metrics
    from kdcode.models import resolve_path

    path = resolve_path(model)
    if path is None:
        fail("--record needs a local model folder")
    update_metrics(path, name, metrics)


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None:
        return
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


# ---------------------------------------------------------------------------------------- distil
@app.command()
@handle_errors
def distil(
    spec: Annotated[Path | None, typer.Option("--spec", help="Run spec (YAML/JSON); flags override it.")] = None,
    teacher: TeacherOpt = None,
    layers: Annotated[int | None, typer.Option(help="Student depth (transformer blocks).")] = None,
    strategy: StrategyOpt = None,
    init: InitOpt = None,
    data: DataOpt = None,
    glob: Annotated[str | None, typer.Option(help="File pattern inside a data folder.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimiser steps.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Stop after this many passes over the train split.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget; the LR schedule follows it.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Blocks per step.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per block.")] = None,
    temperature: TemperatureOpt = None,
    hidden_size: Annotated[int | None, typer.Option(help="Narrower student width (random/pretrained init).")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads of a narrower student.")] = None,
    teacher_cache: Annotated[str | None, typer.Option(help="Train from a teacher-logit cache (cache-teacher).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimiser step.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint into OUT.ckpt every N steps.")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log to OUT.tensorboard.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in OUT.ckpt.")] = False,
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    out: Annotated[str | None, typer.Option(help="Student folder to write.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Run the model repo's own Python code (only if you trust it).")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Load pickle weights (pytorch_model.bin), which can run code.")
    ] = False,
    print_spec: Annotated[bool, typer.Option("--print-spec", help="Print the resolved spec as YAML and exit.")] = False,
    validate: Annotated[
        bool, typer.Option("--validate", help="Check the spec and plugin params, load nothing.")
    ] = False,
) -> None:
    """Distil a teacher into a smaller student (default: the bundled teacher into 6 layers on the stdlib)."""
    from kdcode.spec import dump_yaml, read_spec_file, resolve_run_spec

    overrides: dict[str, Any] = {}
    for key, value in {
        "teacher.name": teacher,
        "teacher.trust_remote_code": trust_remote_code or None,
        "teacher.allow_pickle": allow_pickle or None,
        "student.layers": layers,
        "student.init": init,
        "strategy.name": strategy,
        "strategy.params.temperature": temperature,
        "student.hidden_size": hidden_size,
        "student.heads": heads,
        "teacher_cache": teacher_cache,
        "train.grad_accum": grad_accum,
        "train.checkpoint_every": checkpoint_every,
        "train.tensorboard": tensorboard or None,
        "data.source": data,
        "data.glob": glob,
        "train.max_steps": max_steps,
        "train.epochs": epochs,
        "train.max_minutes": max_minutes,
        "train.lr": lr,
        "train.batch_size": batch_size,
        "train.block_size": block_size,
        "train.precision": precision,
        "train.seed": seed,
        "out": out,
    }.items():
        _set(overrides, key, value)
    file_data = read_spec_file(spec) if spec else {}
    run = resolve_run_spec(file_data, overrides, str(spec) if spec else "flags")
    if print_spec:
        typer.echo(dump_yaml(run), nl=False)
        return
    if validate:
        from kdcode.plugins import validate_plugins

        validate_plugins(run)
        typer.echo(f"spec is valid: strategy {run.strategy.name!r}, init {run.student.init!r}")
        return
    from kdcode.distil import run_distil

    folder, manifest = run_distil(run, overwrite=overwrite, resume=resume)
    if not manifest:  # a data-parallel worker process: the main process reports
        return
    console = out_console()
    tr = manifest["training"]
    console.print(
        f"[green]student written to[/] {folder}  ({manifest['model']['n_layer']} layers, "
        f"{manifest['model']['params_m']}M params, {tr['steps']} steps in {tr['wall_time_s']:.0f} s, "
        f"valid loss {tr['final'].get('valid_loss', float('nan')):.3f})"
    )
    console.print("next:")
    console.print(f"  kdcode eval {folder}")
    console.print(f"  kdcode bench {folder} --compare {run.teacher.name}")


# -------------------------------------------------------------------------------------- pretrain
@app.command()
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
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Stop after this many passes.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget; the LR schedule follows it.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 100,
    batch_size: Annotated[int, typer.Option(help="Blocks per step.")] = 16,
    eval_every: Annotated[int, typer.Option(help="Held-out loss every N steps.")] = 200,
    precision: Annotated[str, typer.Option(help="auto, fp32 or bf16.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[str, typer.Option(help="Model folder to write.")] = "pretrained",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Train a byte-level BPE tokenizer and a GPT-2 from scratch on code (how the bundled teacher was made)."""
    from kdcode.distil import run_pretrain
    from kdcode.spec import PretrainSpec, build_spec

    train: dict[str, Any] = {
        "lr": lr,
        "warmup_steps": warmup_steps,
        "batch_size": batch_size,
        "block_size": block_size,
        "eval_every": eval_every,
        "precision": precision,
        "seed": seed,
    }
    for k, v in {"max_steps": max_steps, "epochs": epochs, "max_minutes": max_minutes}.items():
        _set(train, k, v)
    if not any(k in train for k in ("max_steps", "epochs", "max_minutes")):
        train["max_steps"] = 1000
    shape: dict[str, Any] = {}
    for k, v in {"layers": layers, "hidden": hidden, "heads": heads, "vocab_size": vocab_size}.items():
        _set(shape, k, v)
    spec = build_spec(
        PretrainSpec,
        {
            "model": shape,
            "tokenizer": tokenizer,
            "init": init,
            "data": {"source": data, "glob": glob, "exclude_tests": not include_tests},
            "train": train,
            "out": out,
        },
        "flags",
    )
    folder, manifest = run_pretrain(spec, overwrite=overwrite)
    tr = manifest["training"]
    out_console().print(
        f"[green]model written to[/] {folder}  ({manifest['model']['params_m']}M params, {tr['steps']} steps, "
        f"{tr['tokens_seen']} tokens in {tr['wall_time_s']:.0f} s, "
        f"valid loss {tr['final'].get('valid_loss', float('nan')):.3f})"
    )


# --------------------------------------------------------------------------------- cache-teacher
@app.command("cache-teacher")
@handle_errors
def cache_teacher(
    out: Annotated[Path, typer.Option(help="Cache folder to write.")],
    teacher: Annotated[str, typer.Option(help="Teacher: 'bundled', a HF id or a local folder.")] = "bundled",
    data: Annotated[str, typer.Option(help="Corpus whose train split is cached.")] = "stdlib",
    glob: Annotated[str, typer.Option(help="File pattern inside a data folder.")] = "**/*.py",
    data_format: Annotated[str, typer.Option("--format", help="raw or py150.")] = "raw",
    block_size: Annotated[int, typer.Option(help="Tokens per block (must match the distil runs).")] = 256,
    top_k: Annotated[int, typer.Option(help="Teacher logits kept per position.")] = 64,
    temperature: Annotated[float, typer.Option(help="Temperature of the stored soft targets.")] = 2.0,
    batch_size: Annotated[int, typer.Option(help="Blocks per teacher forward pass.")] = 8,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
) -> None:
    """Run a frozen teacher once over the training blocks and store its top-k soft targets for reuse."""
    from kdcode.distil import run_cache_teacher
    from kdcode.spec import DataSpec, build_spec

    spec = build_spec(DataSpec, {"source": data, "glob": glob, "format": data_format}, "flags")
    m = run_cache_teacher(teacher, spec, block_size, top_k, temperature, out, batch_size, overwrite)
    out_console().print(
        f"[green]teacher cache written to[/] {out}  ({m['blocks']} blocks of {m['block_size']} tokens, "
        f"top-{m['top_k']} at T={m['temperature']}); use: kdcode distil --teacher {teacher} --teacher-cache {out}"
    )


# ------------------------------------------------------------------------------------------ eval
def _data_overrides(data: str | None, glob: str | None, fmt: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    _set(d, "source", data)
    _set(d, "glob", glob)
    _set(d, "format", fmt)
    return d


def _metrics_table(title: str, rows: list[tuple[str, dict[str, Any]]], columns: list[tuple[str, str]]) -> Table:
    table = Table(title=title)
    table.add_column("model")
    for _, header in columns:
        table.add_column(header, justify="right")
    for label, row in rows:
        table.add_row(label, *("" if row.get(k) is None else str(row.get(k)) for k, _ in columns))
    return table


@app.command("eval")
@handle_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Model folder, 'bundled', or a HF id.")],
    data: Annotated[str | None, typer.Option(help="Evaluate on this corpus (default: the stdlib).")] = None,
    glob: Annotated[str | None, typer.Option(help="File pattern inside a data folder.")] = None,
    data_format: Annotated[str | None, typer.Option("--format", help="raw or py150.")] = None,
    split: Annotated[str, typer.Option(help="test, valid, train, or all (every file of --data).")] = "test",
    lines: Annotated[
        Path | None,
        typer.Option(
            help="A completion set: {id,input,gt} or {code} .jsonl/.json, or a CodeXGLUE completion dataset id."
        ),
    ] = None,
    samples: Annotated[int, typer.Option(help="Completions to score.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the sample draw.")] = 0,
    beams: Annotated[int, typer.Option(help="1 = greedy; >1 = beam search.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Longest completion in tokens.")] = 48,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together (greedy).")] = 8,
    ppl_blocks: Annotated[int, typer.Option(help="Held-out blocks for perplexity (0 skips it).")] = 64,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    predictions: Annotated[
        Path | None, typer.Option(help="Write predictions, one per line (CodeXGLUE format).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics as JSON ('-' for stdout).")] = None,
    record: Annotated[bool, typer.Option(help="Store the metrics in the model's manifest.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the weights' sha256 check.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Run the model repo's own Python code (only if you trust it).")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Load pickle weights (pytorch_model.bin), which can run code.")
    ] = False,
) -> None:
    """Line-level code completion (ES, EM as CodeXGLUE defines them) and perplexity on held-out code."""
    from kdcode.evaluate import run_eval
    from kdcode.spec import EvalSpec, build_spec

    spec = build_spec(
        EvalSpec,
        {
            "data": _data_overrides(data, glob, data_format),
            "split": split,
            "lines": str(lines) if lines else None,
            "samples": samples,
            "seed": seed,
            "beams": beams,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "ppl_blocks": ppl_blocks,
            "threads": threads,
        },
        "flags",
    )
    result = run_eval(
        model,
        spec,
        verify=not no_verify,
        predictions=predictions,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    rows = [(model, result)]
    if result.get("baseline"):
        rows.append(("baseline: " + result["baseline"]["name"], result["baseline"]))
    cols = [("es", "ES"), ("em", "EM %"), ("token_accuracy", "token acc %"), ("perplexity", "perplexity"),
            ("samples", "samples")]
    if str(json_out) != "-":
        out_console().print(_metrics_table(f"line completion, {spec.split} split, seed {seed}", rows, cols))
        if result.get("verified") is None:
            out_console().print("[yellow]note:[/] no kdcode.json manifest: weights unverified")
    write_json(json_out, result)
    if record:
        _record(
            model,
            "eval",
            {k: result.get(k) for k in ("es", "em", "token_accuracy", "perplexity", "samples", "baseline", "decoding",
                                        "split", "seed")},
        )


# ----------------------------------------------------------------------------------------- bench
@app.command()
@handle_errors
def bench(
    model: Annotated[str, typer.Argument(help="Model folder, 'bundled', or a HF id.")],
    compare: Annotated[str | None, typer.Option(help="Measure this model too (e.g. the teacher) and compare.")] = None,
    data: Annotated[str | None, typer.Option(help="Corpus for the prompts (default: the stdlib test split).")] = None,
    prompts: Annotated[int, typer.Option(help="Timed completions.")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per completion (no early stop).")] = 16,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 1,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the prompt draw.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON ('-' for stdout).")] = None,
    record: Annotated[bool, typer.Option(help="Store the figures in the model's manifest.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the weights' sha256 check.")] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Run the model repo's own Python code (only if you trust it).")
    ] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Load pickle weights (pytorch_model.bin), which can run code.")
    ] = False,
) -> None:
    """Params, size on disk, peak memory, throughput and latency, side by side with --compare."""
    from kdcode.bench import run_bench
    from kdcode.spec import BenchSpec, build_spec

    spec = build_spec(
        BenchSpec,
        {
            "data": _data_overrides(data, None, None),
            "prompts": prompts,
            "new_tokens": new_tokens,
            "batch_size": batch_size,
            "threads": threads,
            "device": device,
            "seed": seed,
        },
        "flags",
    )
    result = run_bench(
        model,
        spec,
        compare=compare,
        verify=not no_verify,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    rows = [(model, result)] + ([(compare, result["compare"])] if compare else [])
    cols = [
        ("params_m", "params (M)"),
        ("size_mb", "size (MB)"),
        ("weights_memory_mb", "weights in mem (MB)"),
        ("peak_memory_mb", "peak mem (MB)"),
        ("samples_per_s", "samples/s"),
        ("ms_per_token_p50", "ms/token p50"),
        ("ms_per_token_p95", "ms/token p95"),
        ("ms_first_token_p50", "first token (ms)"),
    ]
    if str(json_out) != "-":
        console = out_console()
        console.print(
            _metrics_table(
                f"bench: {result['device']} ({result['cpu']}), {result['dtype']}, {result['threads']} threads, "
                f"batch {spec.batch_size}, {spec.new_tokens} new tokens x {result['prompts']} prompts",
                rows,
                cols,
            )
        )
        if compare:
            r = result["ratios"]
            console.print(f"vs {compare}: {r['speedup']}x throughput, size x{r['size']}, params x{r['params']}")
    write_json(json_out, result)
    if record:
        _record(model, "bench", {k: v for k, v in result.items() if k != "compare"})


# ------------------------------------------------------------------------------------------ list
@app.command("list")
@handle_errors
def list_cmd(
    name: Annotated[str | None, typer.Argument(help="A strategy or init: print its params schema.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every KD strategy and student-init scheme, with its summary and params."""
    from kdcode.inits import INITS
    from kdcode.strategies import STRATEGIES

    entries = []
    for kind, reg in (("strategy", STRATEGIES), ("init", INITS)):
        for n in reg.names():
            if name and n != name:
                continue
            cls = reg.get(n)
            schema = cls.Params.model_json_schema()
            entries.append({"kind": kind, "name": n, "summary": cls.summary, "source": reg.source(n), "params": schema})
    if name and not entries:
        from kdcode.registry import did_you_mean

        fail(f"no strategy or init named {name!r}.{did_you_mean(name, STRATEGIES.names() + INITS.names())}")
    if json_out:
        typer.echo(json.dumps(entries if not name else entries[0], indent=2))
        return
    table = Table(title="kdcode methods")
    for col in ("kind", "name", "summary", "params (name: type = default)"):
        table.add_column(col)
    for e in entries:
        props = e["params"].get("properties", {})
        params = ", ".join(f"{k}: {v.get('type', 'any')} = {v.get('default')}" for k, v in props.items())
        table.add_row(e["kind"], e["name"], e["summary"], params)
    out_console().print(table)


# ---------------------------------------------------------------------------------------- doctor
@app.command()
@handle_errors
def doctor(
    folder: Annotated[
        str | None, typer.Argument(help="A model folder to check (verified / unverified / refused).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON ('-' for stdout).")] = None,
) -> None:
    """Versions, device, threads, bf16, hub reachability, bundled teacher, HF cache; exit 1 if FOLDER is refused."""
    from kdcode.doctor import collect, rows

    report = collect(folder)
    if str(json_out) != "-":
        table = Table(title=f"kdcode doctor ({report['executable']})", show_header=False)
        table.add_column("what")
        table.add_column("value")
        for label, value in rows(report):
            table.add_row(label, value)
        out_console().print(table)
    write_json(json_out, report)
    if report.get("folder", {}).get("status") == "refused":
        raise typer.Exit(code=1)


from kdcode.cli_data import data_app  # noqa: E402

app.add_typer(data_app, name="data")


# -------------------------------------------------------------------------------------- compress
@app.command()
@handle_errors
def compress(
    model: Annotated[str, typer.Argument(help="Model folder (or 'bundled') to compress.")],
    out: Annotated[Path, typer.Option(help="Folder to write.")],
    dtype: Annotated[str | None, typer.Option(help="Store the weights as fp16, bf16 (or fp32).")] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="Dynamic int8 quantization of Linear/Conv1D weights, for CPU inference.")
    ] = False,
    prune_heads: Annotated[float, typer.Option(help="Fraction of attention heads removed per layer.")] = 0.0,
    prune_ffn: Annotated[float, typer.Option(help="Fraction of MLP neurons removed per layer.")] = 0.0,
    data: Annotated[str | None, typer.Option(help="Calibration corpus for pruning (its train split).")] = None,
    glob: Annotated[str | None, typer.Option(help="File pattern inside a data folder.")] = None,
    calib_batches: Annotated[int, typer.Option(help="Calibration batches that score heads/neurons.")] = 8,
    calib_batch_size: Annotated[int, typer.Option(help="Blocks per calibration batch.")] = 8,
    calib_block_size: Annotated[int | None, typer.Option(help="Tokens per calibration block (default 256).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the weights' sha256 check.")] = False,
) -> None:
    """Prune (heads, MLP neurons), then store as fp16/bf16 or int8; the manifest keeps the parent chain."""
    from kdcode.compress import CompressSpec, run_compress
    from kdcode.spec import build_spec

    spec = build_spec(
        CompressSpec,
        {
            "dtype": dtype,
            "int8": int8,
            "prune_heads": prune_heads,
            "prune_ffn": prune_ffn,
            "data": _data_overrides(data, glob, None),
            "calib_batches": calib_batches,
            "calib_batch_size": calib_batch_size,
            "calib_block_size": calib_block_size,
        },
        "flags",
    )
    folder, manifest = run_compress(model, spec, out, overwrite=overwrite, verify=not no_verify)
    from kdcode.artifacts import weights_size

    comp, m = manifest["compression"], manifest["model"]
    out_console().print(
        f"[green]compressed model written to[/] {folder}  ({', '.join(s['step'] for s in comp['steps'])}; "
        f"{m['params_m_before']}M -> {m['params_m']}M params, {weights_size(folder) / 1e6:.2f} MB on disk; "
        f"loads with {comp['loading']})"
    )
    out_console().print(f"next:\n  kdcode eval {folder}\n  kdcode bench {folder} --compare {model} --device cpu")


# ----------------------------------------------------------------------------------- sweep, report
def _print_report(written: dict[str, Any], records: list[dict[str, Any]]) -> None:
    from kdcode.report import table

    headers, rows = table(records)
    t = Table(title="sweep results (ratio: model / teacher)")
    for h in headers:
        t.add_column(h, justify="left" if h == "Model" else "right")
    for row in rows:
        t.add_row(*row)
    console = out_console()
    console.print(t)
    png = f" and {written['pareto_png']}" if written["pareto_png"] else ""
    console.print(f"[green]wrote[/] {written['results_md']}{png}")
    if written["note"]:
        console.print(f"[yellow]note:[/] {written['note']}")


@app.command()
@handle_errors
def sweep(
    spec: Annotated[
        Path | None, typer.Argument(help="Sweep spec (YAML/JSON). Without it: sweep --layers, all else fixed.")
    ] = None,
    teacher: TeacherOpt = None,
    data: DataOpt = None,
    layers: Annotated[str | None, typer.Option(help="Student depths to sweep, e.g. 4,6,8.")] = None,
    strategy: StrategyOpt = None,
    init: InitOpt = None,
    max_steps: Annotated[int | None, typer.Option(help="Steps per point.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-clock budget per point.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Blocks per step.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per block.")] = None,
    temperature: TemperatureOpt = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16 (CUDA).")] = None,
    samples: Annotated[int | None, typer.Option(help="Line completions scored per model (eval).")] = None,
    prompts: Annotated[int | None, typer.Option(help="Timed completions per model (bench).")] = None,
    new_tokens: Annotated[int | None, typer.Option(help="Longest eval completion and bench tokens per prompt.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (train, eval, bench).")] = None,
    out: Annotated[str | None, typer.Option(help="Sweep folder (default: the spec's out, or 'sweep').")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip the points done in OUT/results.jsonl.")] = False,
    validate: Annotated[
        bool, typer.Option("--validate", help="Expand and check every point (plugin params too), load nothing.")
    ] = False,
) -> None:
    """Distil, evaluate and benchmark every point of a sweep (teacher first); results.jsonl, results.md, pareto.png."""
    from kdcode.spec import read_spec_file
    from kdcode.sweep import build_sweep, plan_sweep, read_records, run_sweep

    if spec is None and layers is None:
        fail("pass a sweep spec file, or --layers (e.g. 4,6,8) for the quick form")
    depths = None
    if layers is not None:
        try:
            depths = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            fail(f"--layers {layers!r}: give student depths separated by commas, e.g. 4,6,8")
        if not depths:
            fail("--layers needs at least one depth, e.g. 4,6,8")
    base: dict[str, Any] = {}
    for key, value in {
        "teacher.name": teacher,
        "data.source": data,
        "strategy.name": strategy,
        "strategy.params.temperature": temperature,
        "student.init": init,
        "train.max_steps": max_steps,
        "train.max_minutes": max_minutes,
        "train.batch_size": batch_size,
        "train.block_size": block_size,
        "train.precision": precision,
        "train.threads": threads,
    }.items():
        _set(base, key, value)
    ev: dict[str, Any] = {}
    bn: dict[str, Any] = {}
    for d, key, v in ((ev, "samples", samples), (ev, "max_new_tokens", new_tokens), (ev, "threads", threads),
                      (bn, "prompts", prompts), (bn, "new_tokens", new_tokens), (bn, "threads", threads)):
        _set(d, key, v)
    where = str(spec) if spec else "flags"
    sweep_spec = build_sweep(read_spec_file(spec) if spec else {}, base, depths, ev, bn, out, where)
    if validate:
        plan = plan_sweep(sweep_spec, where)
        cached = sum(len(c.points) for c in plan.caches)
        typer.echo(
            f"sweep is valid: {len(plan.points)} points ({', '.join(p.name for p in plan.points)}), "
            f"{len(plan.caches)} teacher cache(s) for {cached} frozen-teacher points, out {plan.out}"
        )
        return
    from kdcode.distil import Interrupted

    console = out_console()
    try:
        run_sweep(sweep_spec, resume=resume, where=where, log=lambda m: console.print(m, highlight=False))
    except (KeyboardInterrupt, Interrupted) as exc:
        fail(f"{exc or 'interrupted'}; finished points are in {sweep_spec.out}/results.jsonl: rerun the sweep with "
             "--resume", code=130)
    from kdcode.report import latest, write_report

    records = read_records(Path(sweep_spec.out) / "results.jsonl")
    _print_report(write_report(records, Path(sweep_spec.out)), records)
    failed = [r["name"] for r in latest(records) if r.get("status") != "ok"]
    if failed:
        fail(f"{len(failed)} point(s) failed ({', '.join(failed)}); see results.md, fix, and rerun with --resume",
             code=1)


@app.command()
@handle_errors
def report(
    results: Annotated[Path, typer.Argument(help="A sweep's results.jsonl.")],
    out: Annotated[Path | None, typer.Option(help="Folder for results.md and pareto.png (default: beside it).")] = None,
) -> None:
    """Rebuild results.md and pareto.png from a sweep's results.jsonl alone."""
    from kdcode.report import write_report
    from kdcode.sweep import read_records

    records = read_records(results)
    _print_report(write_report(records, out or results.parent), records)


# ------------------------------------------------------------------------------- complete, serve
@app.command()
@handle_errors
def complete(
    model: Annotated[str, typer.Argument(help="Model folder, 'bundled', or a HF id.")],
    file: Annotated[Path | None, typer.Option("--file", help="Source file (default: the text on stdin).")] = None,
    line: Annotated[
        int | None, typer.Option(help="Cursor line, 1-based (default: the end of the text: it is all prefix).")
    ] = None,
    col: Annotated[
        int | None, typer.Option(help="Cursor column, 1-based characters (default: after the line's indentation).")
    ] = None,
    beams: Annotated[int, typer.Option(help="1 = greedy; >1 = beam search.")] = 1,
    n: Annotated[int, typer.Option("--n", help="Alternatives: the n best distinct beams (fewer if beams agree).")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Longest completion in tokens.")] = 48,
    temperature: Annotated[float, typer.Option(help="0 = greedy / beams; >0 samples.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "cpu",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON: completions, finish reasons, token counts, timings.")
    ] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the weights' sha256 check.")] = False,
) -> None:
    """Complete the line at a cursor (--file/--line/--col, or the prefix on stdin) up to its end or --max-tokens."""
    from kdcode.complete import load_engine, prefix_at

    if file is not None:
        text = file.read_text(encoding="utf-8")
    elif sys.stdin is None or sys.stdin.isatty():
        fail("give --file FILE, or pipe the text before the cursor on stdin")
    else:
        text = sys.stdin.read()
    prefix = prefix_at(text, line, col) if line is not None else text
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr stays clean for editors that read it
    engine = load_engine(model, device=device, threads=threads, verify=not no_verify, warm_up=False)
    result = engine.complete(prefix, max_tokens, n=n, beams=beams, temperature=temperature, seed=seed)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "model": model,
                    "prompt_tokens": result.prompt_tokens,
                    "completions": [vars(c) for c in result.choices],
                    "first_token_ms": None if result.first_token_s is None else round(1000 * result.first_token_s, 1),
                    "total_ms": round(1000 * result.total_s, 1),
                },
                indent=2,
            )
        )
        return
    for choice in result.choices:
        typer.echo(choice.text)


@app.command()
@handle_errors
def serve(
    model: Annotated[str, typer.Argument(help="Model folder, 'bundled', or a HF id.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback: only this machine).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Longest prompt accepted, in tokens (default: the model's context).")
    ] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 128,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the weights' sha256 check.")] = False,
) -> None:
    """An OpenAI-compatible completion server (POST /v1/completions, GET /v1/models, GET /health)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        fail("kdcode serve needs FastAPI and uvicorn: pip install 'kdcode\\[serve]'")  # \\[ escapes rich markup
    from transformers.utils import logging as hf_logging

    from kdcode.serve import create_app

    hf_logging.disable_progress_bar()
    app_ = create_app(
        model,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        threads=threads,
        device=device,
        verify=not no_verify,
    )
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host}: anyone who can reach it can use the model (no auth)")
    console.print(f"serving {model} on http://{host}:{port}/v1 (OpenAI completions API); Ctrl-C stops")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def main() -> None:
    """Console entry point."""
    app()
