"""`kdcode eval` and `kdcode bench`: accuracy and speed, printed as tables and written as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdcode.cli._common import (
    MODEL_HELP,
    AllowPickleOpt,
    BackendOpt,
    CompileOpt,
    ContextOpt,
    DataOpt,
    DeviceOpt,
    DraftOpt,
    DraftTokensOpt,
    DtypeOpt,
    FimFormatOpt,
    FimOrderOpt,
    GlobOpt,
    JsonFileOpt,
    KvCacheOpt,
    NoVerifyOpt,
    RecordOpt,
    ThreadsOpt,
    TrustRemoteCodeOpt,
    check_json_path,
    draft_arg,
    handle_errors,
    overrides,
    record_metrics,
    refuse_with,
    runtime_flags,
    write_json,
)
from kdcode.cli._console import metrics_table, out_console, styled
from kdcode.cli.plan import latency_budget
from kdcode.cli.speculate import bench_draft, eval_acceptance

EVAL_COLUMNS = [("es", "ES"), ("em", "EM %"), ("token_accuracy", "token acc %"), ("perplexity", "perplexity"),
                ("samples", "samples")]
BENCH_COLUMNS = [
    ("params_m", "params (M)"),
    ("size_mb", "size (MB)"),
    ("weights_memory_mb", "weights in mem (MB)"),
    ("peak_memory_mb", "peak mem (MB)"),
    ("samples_per_s", "samples/s"),
    ("ms_per_token_p50", "ms/token p50"),
    ("ms_per_token_p95", "ms/token p95"),
    ("ms_first_token_p50", "first token (ms)"),
]
RECORDED_EVAL = ("es", "em", "token_accuracy", "perplexity", "samples", "baseline", "decoding", "split", "seed",
                 "runtime")
RECORDED_INFILL = ("es", "em", "samples", "prefix_only", "prefix_only_same_window", "baseline", "fim", "window",
                   "decoding", "split", "seed", "runtime")


@handle_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    data: DataOpt = None,
    glob: GlobOpt = None,
    data_format: Annotated[str | None, typer.Option("--format", help="raw or py150.")] = None,
    task: Annotated[
        str, typer.Option(help="line (complete a line from the code before it) or infill (fill a removed line from "
                          "the code before and after it; prefix-only completion of the same holes beside it).")
    ] = "line",
    fim_format: FimFormatOpt = None,
    fim_order: FimOrderOpt = "auto",
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
    context: ContextOpt = None,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together (greedy).")] = 8,
    ppl_blocks: Annotated[int, typer.Option(help="Held-out blocks for perplexity (0 skips it).")] = 64,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    backend: BackendOpt = "auto",
    kv_cache: KvCacheOpt = "dynamic",
    compile_step: CompileOpt = False,
    predictions: Annotated[
        Path | None, typer.Option(help="Write predictions, one per line (CodeXGLUE format).")
    ] = None,
    draft_for: Annotated[str | None, typer.Option(help="Measure MODEL as this teacher's speculative draft: "
                                                "acceptance on the held-out lines.")] = None,
    draft_tokens: DraftTokensOpt = "4",
    json_out: JsonFileOpt = None,
    record: RecordOpt = False,
    no_verify: NoVerifyOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Line-level code completion (ES, EM as CodeXGLUE defines them) and perplexity on held-out code; with
    --task infill, single-line infilling of the same lines."""
    from kdcode.evaluation.evaluate import run_eval
    from kdcode.spec import EvalSpec, build_spec

    spec = build_spec(
        EvalSpec,
        {
            "data": overrides({"source": data, "glob": glob, "format": data_format}),
            "split": split, "lines": str(lines) if lines else None, "samples": samples, "seed": seed,
            "task": task, "fim_format": fim_format, "fim_order": fim_order,
            "beams": beams, "max_new_tokens": max_new_tokens, "context_tokens": context, "batch_size": batch_size,
            "ppl_blocks": ppl_blocks,
            "threads": threads, "device": device, "dtype": dtype,
        },
        "flags",
    )
    runtime = runtime_flags(backend, kv_cache, compile_step)
    check_json_path(json_out, model)
    if draft_for:
        refuse_with(f"--draft-for {draft_for}", {
            "--task infill": spec.task == "infill", "--predictions": bool(predictions),
            f"--backend {backend}": backend != "auto", "--kv-cache static": kv_cache == "static",
            "--compile": compile_step,
        }, "it measures acceptance on greedy line completion, each model on its own backend; drop them, or run "
            "eval without --draft-for")

        return eval_acceptance(model, draft_for, spec, draft_tokens, not no_verify, json_out, record)
    result = run_eval(model, spec, verify=not no_verify, predictions=predictions, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code, runtime=runtime)
    rows = [(model, result)]
    for key in ("prefix_only", "prefix_only_same_window", "baseline"):
        if result.get(key):
            rows.append((f"{key.replace('_', '-')}: " + result[key]["name"], result[key]))
    if str(json_out) != "-":
        rt = result["runtime"]
        what = "single-line infilling" if spec.task == "infill" else "line completion"
        title = (f"{what}, {spec.split} split, seed {seed} ({rt['device']}, {rt['dtype']}, "
                 f"{rt['threads']} threads, {rt.get('backend', 'torch')})")
        console = out_console()
        console.print(metrics_table(title, rows, EVAL_COLUMNS))
        if result.get("verified") is None:
            console.print(styled("note:", "yellow", "no kdcode.json manifest: weights unverified"))
    write_json(json_out, result)
    if record:
        name, keys = ("infill", RECORDED_INFILL) if spec.task == "infill" else ("eval", RECORDED_EVAL)
        record_metrics(model, name, {k: result.get(k) for k in keys})


@handle_errors
def bench(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    compare: Annotated[str | None, typer.Option(help="Measure this model too (e.g. the teacher) and compare.")] = None,
    data: Annotated[str | None, typer.Option(help="Corpus for the prompts (default: the stdlib test split).")] = None,
    prompts: Annotated[int, typer.Option(help="Timed completions per round.")] = 16,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds (A B, B A, ...): medians with their range.")] = 5,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per completion (no early stop).")] = 16,
    context: ContextOpt = None,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    backend: BackendOpt = "auto",
    kv_cache: KvCacheOpt = "dynamic",
    compile_step: CompileOpt = False,
    seed: Annotated[int, typer.Option(help="Seed of the prompt draw.")] = 0,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = "4",
    json_out: JsonFileOpt = None,
    record: RecordOpt = False,
    no_verify: NoVerifyOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Params, size on disk, peak memory, throughput and latency, side by side with --compare."""
    from kdcode.evaluation.bench import run_bench
    from kdcode.spec import BenchSpec, build_spec

    spec = build_spec(
        BenchSpec,
        {
            "data": overrides({"source": data}), "prompts": prompts, "rounds": rounds, "new_tokens": new_tokens,
            "context_tokens": context,
            "batch_size": batch_size, "threads": threads, "device": device, "dtype": dtype, "seed": seed,
        },
        "flags",
    )
    runtime = runtime_flags(backend, kv_cache, compile_step)
    check_json_path(json_out, model, compare)
    if draft_arg(draft):
        refuse_with(f"--draft {draft}", {
            "--compare": bool(compare), f"--backend {backend}": backend != "auto",
            "--kv-cache static": kv_cache == "static", "--compile": compile_step,
        }, "it times MODEL alone and with its draft, each on its own backend; run bench MODEL --compare M (or "
            "with the runtime flags) separately")

        return bench_draft(model, spec, draft, draft_tokens, not no_verify, json_out, record, BENCH_COLUMNS,
                           with_ranges)
    result = run_bench(model, spec, compare=compare, verify=not no_verify, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, runtime=runtime)
    rows = [(model, with_ranges(result))] + ([(compare, with_ranges(result["compare"]))] if compare else [])
    # models on different backends or dtypes (a GGUF against its torch folder): each row says its own
    mixed = bool(compare) and any(result[k] != result["compare"][k] for k in ("backend", "dtype"))
    if str(json_out) != "-":
        console = out_console()
        console.print(
            metrics_table(
                f"bench: {result['device']} ({result['cpu']}), "
                + ("" if mixed else f"{result['dtype']}, {result['backend']}, ")
                + f"{result['threads']} threads, batch {spec.batch_size}, {spec.new_tokens} new tokens x "
                f"{result['prompts']} prompts x {result['rounds']} interleaved rounds (median [min-max])",
                rows,
                [("backend", "backend"), ("dtype", "dtype"), *BENCH_COLUMNS] if mixed else BENCH_COLUMNS,
            )
        )
        if compare:
            console.print(ratio_line(compare, result["ratios"]))
    result.update(latency_budget(model, json_out))
    write_json(json_out, result)
    if record:
        record_metrics(model, "bench", {k: v for k, v in result.items() if k != "compare"})


def with_ranges(result: dict) -> dict:
    """A result whose timed figures read ``median [min-max]`` (the table's cells)."""
    ranged = {k: (v, result.get(f"{k}_range")) for k, v in result.items()}
    return {k: f"{v} [{r[0]}-{r[1]}]" if r is not None and v is not None else v for k, (v, r) in ranged.items()}


def ratio_line(compare: str, r: dict) -> str:
    size = f"size x{r['size']}" if r.get("size") is not None else "size not measured"
    lo, hi = r["speedup_range"]
    rank = (f"ranges separate: {r['ranking']} is faster" if r["separated"]
            else "ranges overlap: too close to rank; add --rounds or quiet the machine")
    return f"vs {compare}: {r['speedup']}x throughput [{lo}-{hi}] ({rank}), {size}, params x{r['params']}"


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command()(bench)
