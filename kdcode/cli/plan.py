"""`kdcode plan`: the student shapes a latency budget allows on this machine, measured, without training; and the
budget line `kdcode bench` prints for a student made by `kdcode distil --latency-ms`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import typer

from kdcode.cli._common import JsonFileOpt, check_json_path, fail, handle_errors, write_json
from kdcode.cli._console import metrics_table, out_console
from kdcode.cli._options import from_flags, spec_option
from kdcode.spec import PlanSpec

L = functools.partial(spec_option, PlanSpec)  # plan's options: fields of its spec


COLUMNS = [("precision", "precision"), ("ms", "ms / completion"), ("params_m", "params (M)"), ("size_mb", "MB"),
           ("proxy_loss", "proxy loss"), ("tie_loss", "near-tie proxy"), ("meets", "meets"), ("chosen", "chosen")]


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
    spec = plan["spec"]
    if any(r.get("tie_loss") is not None for r in plan["candidates"]):
        console.print(f"near-tie proxy: the same after {spec['tie_steps']} KD steps, for the finalists within "
                      f"{spec['proxy_tie']:.0%} of the best proxy loss; it decides among them", markup=False)
    if plan["chosen"]:
        c = plan["chosen"]
        tie = "" if c.get("tie_loss") is None else f" ({c['tie_loss']} after {spec['tie_steps']} steps)"
        console.print(f"chosen: {Shape.of(c).label()}: {c['ms']} ms, proxy loss {c['proxy_loss']}{tie}, teacher "
                      f"blocks {c['teacher_blocks']}", markup=False)


@handle_errors
def plan(
    teacher: L("teacher") = None,
    latency_ms: L("latency.latency_ms") = None,
    task: L("latency.task") = None,
    prompt_tokens: L("latency.prompt_tokens") = None,
    new_tokens: L("latency.new_tokens") = None,
    precisions: L("latency.precisions") = None,
    threads: L("latency.threads") = None,
    device: L("latency.device") = None,
    ffn_keep: L("latency.ffn_keep") = None,
    head_prune: L("latency.head_prune") = None,
    rounds: L("latency.rounds") = None,
    margin: L("latency.margin") = None,
    proxy_steps: L("latency.proxy_steps") = None,
    tie_steps: L("latency.tie_steps") = None,
    data: L("data.source", "--data") = None,
    glob: L("data.glob") = None,
    json_out: JsonFileOpt = None,
) -> None:
    """The student shapes a latency budget allows on this machine: measured candidates, a quality proxy, the choice.

    Nothing is trained; `kdcode distil --latency-ms N` runs the same plan and distils the chosen shape."""
    from kdcode.planning.plan import run_plan

    if latency_ms is None:
        fail("--latency-ms is required: the milliseconds a completion may take on this machine")
    check_json_path(json_out, teacher or "bundled")  # before minutes of timing, not after
    spec = from_flags(PlanSpec, plan, locals())
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

