"""`kdcode sweep` and `kdcode report`: the study in one command, and its table and plot from results alone."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from kdcode.cli._common import TemperatureOpt, fail, handle_errors, overrides
from kdcode.cli._console import out_console, styled
from kdcode.cli._options import spec_flags, spec_option
from kdcode.spec import BenchSpec, EvalSpec, RunSpec, SweepSpec, read_spec_file

# sweep's quick form: fields of the run spec (each point's base), of eval's and bench's specs, and of the sweep's
R, E, B, W = (functools.partial(spec_option, model) for model in (RunSpec, EvalSpec, BenchSpec, SweepSpec))


def _print_report(written: dict[str, Any], records: list[dict[str, Any]]) -> None:
    from kdcode.study.report import table

    headers, rows = table(records)
    t = Table(title="sweep results (ratio: model / teacher)")
    for h in headers:
        t.add_column(h, justify="left" if h == "Model" else "right")
    for row in rows:
        t.add_row(*row)
    console = out_console()
    console.print(t)
    png = f" and {written['pareto_png']}" if written["pareto_png"] else ""
    console.print(styled("wrote", "green", f"{written['results_md']}{png}"))
    if written["note"]:
        console.print(styled("note:", "yellow", written["note"]))


def _depths(layers: str | None) -> list[int] | None:
    if layers is None:
        return None
    try:
        depths = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError:
        fail(f"--layers {layers!r}: give student depths separated by commas, e.g. 4,6,8")
    if not depths:
        fail("--layers needs at least one depth, e.g. 4,6,8")
    return depths


@handle_errors
def sweep(
    spec: Annotated[
        Path | None, typer.Argument(help="Sweep spec (YAML/JSON). Without it: sweep --layers, all else fixed.")
    ] = None,
    teacher: R("teacher.name", "--teacher") = None,
    data: R("data.source", "--data") = None,
    layers: Annotated[str | None, typer.Option(help="Student depths to sweep, e.g. 4,6,8.")] = None,
    strategy: R("strategy.name", "--strategy") = None,
    init: R("student.init.name", "--init") = None,
    max_steps: R("train.max_steps") = None,
    max_minutes: R("train.max_minutes") = None,
    batch_size: R("train.batch_size") = None,
    block_size: R("train.block_size") = None,
    temperature: TemperatureOpt = None,
    precision: R("train.precision") = None,
    samples: E("samples") = None,
    task: E("task") = None,
    draft_tokens: W("draft_tokens") = None,
    prompts: B("prompts") = None,
    new_tokens: B("new_tokens", also="also eval's longest completion") = None,
    context: E("context_tokens", "--context", also="in eval and bench") = None,
    threads: R("train.threads", also="in training, eval and bench") = None,
    out: W("out") = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip the points done in OUT/results.jsonl.")] = False,
    validate: Annotated[
        bool, typer.Option("--validate", help="Expand and check every point (plugin params too), load nothing.")
    ] = False,
) -> None:
    """Distil, evaluate and benchmark every point of a sweep (teacher first); results.jsonl, results.md, pareto.png."""
    from kdcode.study.report import read_records
    from kdcode.study.sweep import build_sweep, plan_sweep, run_sweep
    from kdcode.train.loop import Interrupted

    if spec is None and layers is None:
        fail("pass a sweep spec file, or --layers (e.g. 4,6,8) for the quick form")
    base = spec_flags(sweep, locals(), RunSpec) | overrides({"strategy.params.temperature": temperature})
    # --new-tokens, --context and --threads set the same figure in eval and bench
    ev = overrides({"samples": samples, "max_new_tokens": new_tokens, "context_tokens": context, "threads": threads})
    bn = overrides({"prompts": prompts, "new_tokens": new_tokens, "context_tokens": context, "threads": threads})
    where = str(spec) if spec else "flags"
    sweep_spec = build_sweep(read_spec_file(spec) if spec else {}, base, _depths(layers), ev, bn, out, where)
    if task not in (None, "line", "infill"):
        fail(f"--task {task!r}: use line or infill")
    if task == "infill":
        sweep_spec.infill = True
    if draft_tokens is not None:
        sweep_spec.draft_tokens = draft_tokens
    if validate:
        plan = plan_sweep(sweep_spec, where)
        cached = sum(len(c.points) for c in plan.caches)
        typer.echo(
            f"sweep is valid: {len(plan.points)} points ({', '.join(p.name for p in plan.points)}), "
            f"{len(plan.caches)} teacher cache(s) for {cached} frozen-teacher points, out {plan.out}"
        )
        return
    console = out_console()
    try:
        run_sweep(sweep_spec, resume=resume, where=where, log=console.print)
    except (KeyboardInterrupt, Interrupted) as exc:
        fail(f"{exc or 'interrupted'}; finished points are in {sweep_spec.out}/results.jsonl: rerun the sweep with "
             "--resume", code=130)
    from kdcode.study.report import latest, write_report

    records = read_records(Path(sweep_spec.out) / "results.jsonl")
    _print_report(write_report(records, Path(sweep_spec.out)), records)
    failed = [r["name"] for r in latest(records) if r.get("status") != "ok"]
    if failed:
        fail(f"{len(failed)} point(s) failed ({', '.join(failed)}); see results.md, fix, and rerun with --resume",
             code=1)


@handle_errors
def report(
    results: Annotated[Path, typer.Argument(help="A sweep's results.jsonl.")],
    out: Annotated[Path | None, typer.Option(help="Folder for results.md and pareto.png (default: beside it).")] = None,
) -> None:
    """Rebuild results.md and pareto.png from a sweep's results.jsonl alone."""
    from kdcode.study.report import read_records, write_report

    records = read_records(results)
    _print_report(write_report(records, out or results.parent), records)


def register(app: typer.Typer) -> None:
    app.command()(sweep)
    app.command()(report)
