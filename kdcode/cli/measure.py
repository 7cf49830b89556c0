"""`kdcode eval` and `kdcode bench`: accuracy and speed, printed as tables and written as JSON."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from kdcode.cli._common import (
    MODEL_HELP,
    DraftOpt,
    DraftTokensOpt,
    JsonFileOpt,
    NoVerifyOpt,
    RecordOpt,
    check_json_path,
    draft_arg,
    handle_errors,
    record_metrics,
    refuse_with,
    write_json,
)
from kdcode.cli._console import metrics_table, out_console, styled
from kdcode.cli._options import from_flags, runtime_given, runtime_of, spec_option
from kdcode.cli.plan import latency_budget
from kdcode.cli.speculate import bench_draft, eval_acceptance
from kdcode.spec import BenchSpec, EvalSpec, LoadSpec, RuntimeSpec

E = functools.partial(spec_option, EvalSpec)  # eval's options: fields of its spec
B = functools.partial(spec_option, BenchSpec)
RT = functools.partial(spec_option, RuntimeSpec)
LD = functools.partial(spec_option, LoadSpec)
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
    data: E("data.source", "--data") = None,
    glob: E("data.glob") = None,
    data_format: E("data.format") = None,
    task: E("task") = None,
    fim_format: E("fim_format") = None,
    fim_order: E("fim_order") = None,
    split: E("split") = None,
    lines: E("lines") = None,
    samples: E("samples") = None,
    seed: E("seed") = None,
    beams: E("beams") = None,
    max_new_tokens: E("max_new_tokens") = None,
    context: E("context_tokens", "--context") = None,
    batch_size: E("batch_size") = None,
    ppl_blocks: E("ppl_blocks") = None,
    device: E("device") = None,
    dtype: E("dtype") = None,
    threads: E("threads") = None,
    backend: RT("backend") = None,
    kv_cache: RT("kv_cache") = None,
    compile_step: RT("compile") = None,
    predictions: Annotated[
        Path | None, typer.Option(help="Write predictions, one per line (CodeXGLUE format).")
    ] = None,
    draft_for: Annotated[str | None, typer.Option(help="Measure MODEL as this teacher's speculative draft: "
                                                "acceptance on the held-out lines.")] = None,
    draft_tokens: DraftTokensOpt = "4",
    json_out: JsonFileOpt = None,
    record: RecordOpt = False,
    no_verify: NoVerifyOpt = False,
    trust_remote_code: LD("trust_remote_code") = None,
    allow_pickle: LD("allow_pickle") = None,
) -> None:
    """Line-level code completion (ES, EM as CodeXGLUE defines them) and perplexity on held-out code; with
    --task infill, single-line infilling of the same lines."""
    from kdcode.evaluation.evaluate import run_eval

    spec = from_flags(EvalSpec, eval_cmd, locals())
    runtime = runtime_of(eval_cmd, locals())
    load = from_flags(LoadSpec, eval_cmd, locals())
    check_json_path(json_out, model)
    if draft_for:
        refuse_with(f"--draft-for {draft_for}", {
            "--task infill": spec.task == "infill", "--predictions": bool(predictions),
            **runtime_given(runtime),
        }, "it measures acceptance on greedy line completion, each model on its own backend; drop them, or run "
            "eval without --draft-for")

        return eval_acceptance(model, draft_for, spec, draft_tokens, not no_verify, json_out, record)
    result = run_eval(model, spec, verify=not no_verify, predictions=predictions, allow_pickle=load.allow_pickle,
                      trust_remote_code=load.trust_remote_code, runtime=runtime)
    rows = [(model, result)]
    for key in ("prefix_only", "prefix_only_same_window", "baseline"):
        if result.get(key):
            rows.append((f"{key.replace('_', '-')}: " + result[key]["name"], result[key]))
    if str(json_out) != "-":
        rt = result["runtime"]
        what = "single-line infilling" if spec.task == "infill" else "line completion"
        title = (f"{what}, {spec.split} split, seed {spec.seed} ({rt['device']}, {rt['dtype']}, "
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
    data: B("data.source", "--data") = None,
    prompts: B("prompts") = None,
    rounds: B("rounds") = None,
    new_tokens: B("new_tokens") = None,
    context: B("context_tokens", "--context") = None,
    batch_size: B("batch_size") = None,
    device: B("device") = None,
    dtype: B("dtype") = None,
    threads: B("threads") = None,
    backend: RT("backend") = None,
    kv_cache: RT("kv_cache") = None,
    compile_step: RT("compile") = None,
    seed: B("seed") = None,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = "4",
    json_out: JsonFileOpt = None,
    record: RecordOpt = False,
    no_verify: NoVerifyOpt = False,
    trust_remote_code: LD("trust_remote_code") = None,
    allow_pickle: LD("allow_pickle") = None,
) -> None:
    """Params, size on disk, peak memory, throughput and latency, side by side with --compare."""
    from kdcode.evaluation.bench import run_bench

    spec = from_flags(BenchSpec, bench, locals())
    runtime = runtime_of(bench, locals())
    load = from_flags(LoadSpec, bench, locals())
    check_json_path(json_out, model, compare)
    if draft_arg(draft):
        refuse_with(f"--draft {draft}", {
            "--compare": bool(compare), **runtime_given(runtime),
        }, "it times MODEL alone and with its draft, each on its own backend; run bench MODEL --compare M (or "
            "with the runtime flags) separately")

        return bench_draft(model, spec, draft, draft_tokens, not no_verify, json_out, record, BENCH_COLUMNS,
                           with_ranges)
    result = run_bench(model, spec, compare=compare, verify=not no_verify, allow_pickle=load.allow_pickle,
                       trust_remote_code=load.trust_remote_code, runtime=runtime)
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
