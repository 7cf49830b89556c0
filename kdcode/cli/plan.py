"""`kdcode plan`: the student shapes a latency budget allows on this machine, measured, without training; and the
budget flags `kdcode distil --latency-ms` shares with it (help text from the spec's fields, written once there)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kdcode.cli._common import (
    DataOpt,
    GlobOpt,
    JsonFileOpt,
    TeacherOpt,
    check_json_path,
    fail,
    handle_errors,
    overrides,
    write_json,
)
from kdcode.cli._console import metrics_table, out_console
from kdcode.spec_latency import LatencySpec


def _help(field: str) -> str:
    return str(LatencySpec.model_fields[field].description)


LatencyMsOpt = Annotated[float | None, typer.Option("--latency-ms", help=_help("latency_ms"))]
TaskOpt = Annotated[str | None, typer.Option("--task", help=_help("task"))]
PromptTokensOpt = Annotated[int | None, typer.Option("--prompt-tokens", help=_help("prompt_tokens"))]
NewTokensOpt = Annotated[int | None, typer.Option("--new-tokens", help=_help("new_tokens"))]
PrecisionsOpt = Annotated[str | None, typer.Option("--precisions", help=_help("precisions") + "; comma-separated")]
RunThreadsOpt = Annotated[int | None, typer.Option("--run-threads", help=_help("threads"))]


def _floats(value: str | None, flag: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} {value!r}: give comma-separated fractions, e.g. 1,0.75,0.5")


def latency_overrides(latency_ms: float | None, task: str | None, prompt_tokens: int | None, new_tokens: int | None,
                      precisions: str | None, threads: int | None, prefix: str = "latency.") -> dict[str, Any]:
    """The budget flags as dotted spec keys (shared by plan and distil)."""
    return {f"{prefix}latency_ms": latency_ms, f"{prefix}task": task, f"{prefix}prompt_tokens": prompt_tokens,
            f"{prefix}new_tokens": new_tokens, f"{prefix}threads": threads,
            f"{prefix}precisions": [p.strip() for p in precisions.split(",")] if precisions else None}


COLUMNS = [("precision", "precision"), ("ms", "ms / completion"), ("params_m", "params (M)"), ("size_mb", "MB"),
           ("proxy_loss", "proxy loss"), ("meets", "meets"), ("chosen", "chosen")]


def print_plan(plan: dict[str, Any]) -> None:
    from kdcode.planning.shapes import Shape

    m, t = plan["machine"], plan["task"]
    rows = []
    for r in plan["candidates"]:
        timed = f"{r['ms']} [{r['ms_range'][0]}-{r['ms_range'][1]}]" + ("" if r["phase"] == "final" else " s")
        cell = {**r, "ms": timed,
                "meets": "yes" if r["meets"] else "no", "chosen": "<-" if r.get("chosen") else ""}
        rows.append((Shape.of(r).label(precision=False), cell))
    where = m["cpu"] if m["device"].startswith("cpu") else m["device"]
    title = (f"plan: {plan['budget_ms']:g} ms for {t['prompt_tokens']} prompt + {t['new_tokens']} new tokens "
             f"({t['task']}), {where} [{' '.join(m['cpu_features'])}], {m['threads']} threads, torch "
             "(median [min-max]; s: search rounds, else the finalists' interleaved rounds)")
    console = out_console()
    console.print(metrics_table(title, rows, COLUMNS))
    console.print(f"quality proxy: {plan['proxy']}", markup=False)
    if plan["chosen"]:
        c = plan["chosen"]
        console.print(f"chosen: {Shape.of(c).label()}: {c['ms']} ms, proxy loss {c['proxy_loss']}, teacher "
                      f"blocks {c['teacher_blocks']}", markup=False)


@handle_errors
def plan(
    teacher: TeacherOpt = None,
    latency_ms: LatencyMsOpt = None,
    task: TaskOpt = None,
    prompt_tokens: PromptTokensOpt = None,
    new_tokens: NewTokensOpt = None,
    precisions: PrecisionsOpt = None,
    threads: Annotated[int | None, typer.Option("--threads", help=_help("threads"))] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, or cuda / cuda:N")] = None,
    ffn_keep: Annotated[str | None, typer.Option("--ffn-keep", help=_help("ffn_keep"))] = None,
    head_prune: Annotated[str | None, typer.Option("--head-prune", help=_help("head_prune"))] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", help=_help("rounds"))] = None,
    margin: Annotated[float | None, typer.Option("--margin", help=_help("margin"))] = None,
    data: DataOpt = None,
    glob: GlobOpt = None,
    json_out: JsonFileOpt = None,
) -> None:
    """The student shapes a latency budget allows on this machine: measured candidates, a quality proxy, the choice.

    Nothing is trained; `kdcode distil --latency-ms N` runs the same plan and distils the chosen shape."""
    from kdcode.planning.plan import run_plan
    from kdcode.spec import PlanSpec, build_spec

    if latency_ms is None:
        fail("--latency-ms is required: the milliseconds a completion may take on this machine")
    check_json_path(json_out, teacher or "bundled")  # before minutes of timing, not after
    latency = overrides({**latency_overrides(latency_ms, task, prompt_tokens, new_tokens, precisions, threads, ""),
                         "device": device, "ffn_keep": _floats(ffn_keep, "--ffn-keep"),
                         "head_prune": _floats(head_prune, "--head-prune"), "rounds": rounds,
                         "margin": margin})
    spec = build_spec(PlanSpec, overrides({"teacher": teacher, "data.source": data, "data.glob": glob})
                      | {"latency": latency}, "flags")
    result = run_plan(spec)
    if str(json_out) != "-":
        print_plan(result)
    write_json(json_out, result)
    if result["outcome"] == "none":
        fail(result["line"], code=1)
    if result["outcome"] == "teacher":
        typer.echo(result["line"], err=True)


def latency_budget(model: str, json_out: Path | None) -> dict[str, Any]:
    """A student made by `distil --latency-ms`: its budget's task timed on it here, after the bench, and the verdict
    (``{"latency_budget": ...}``; empty for any other model)."""
    from kdcode.models.artifacts import read_manifest
    from kdcode.models.load import input_path
    from kdcode.planning.plan import budget_line, budget_of, check_budget

    folder = input_path(model)
    plan = budget_of(read_manifest(folder)) if folder is not None and folder.is_dir() else None
    if plan is None:
        return {}
    check = check_budget(model, plan)
    if str(json_out) != "-":
        out_console().print(budget_line(check), markup=False)
    return {"latency_budget": check}


def register(app: typer.Typer) -> None:
    app.command()(plan)

