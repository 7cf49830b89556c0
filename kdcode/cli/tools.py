"""`kdcode list`, `kdcode doctor`, `kdcode compress`: the methods, the machine, and smaller students."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kdcode.cli._common import NoVerifyOpt, OverwriteOpt, fail, handle_errors, write_json
from kdcode.cli._console import out_console, styled
from kdcode.cli._options import from_flags, spec_option
from kdcode.cli._quality import print_quality
from kdcode.spec_compress import CompressSpec

K = functools.partial(spec_option, CompressSpec)  # compress's options: fields of its spec


@handle_errors
def list_cmd(
    name: Annotated[str | None, typer.Argument(help="A strategy or init: print its params schema.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every KD strategy and student-init scheme, with its summary and params."""
    from kdcode.plugins import describe_plugins
    from kdcode.registry import did_you_mean

    entries = describe_plugins(name)
    if name and not entries:
        fail(f"no strategy or init named {name!r}.{did_you_mean(name, [e['name'] for e in describe_plugins()])}")
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


@handle_errors
def compress(
    model: Annotated[str, typer.Argument(help="Model folder (or 'bundled') to compress.")],
    out: Annotated[Path, typer.Option(help="Folder to write.")],
    dtype: K("dtype") = None,
    int8: K("int8") = None,
    int8_scheme: K("int8_scheme") = None,
    smooth_alpha: K("smooth_alpha") = None,
    prune_heads: K("prune_heads") = None,
    prune_ffn: K("prune_ffn") = None,
    data: K("data.source", "--data") = None,
    glob: K("data.glob") = None,
    calib_batches: K("calib_batches") = None,
    calib_batch_size: K("calib_batch_size") = None,
    calib_block_size: K("calib_block_size") = None,
    check_samples: K("check_samples") = None,
    check_blocks: K("check_blocks") = None,
    max_es_drop: K("max_es_drop") = None,
    max_ppl_rise: K("max_ppl_rise") = None,
    overwrite: OverwriteOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Prune (heads, MLP neurons), then store as fp16/bf16 or int8; measures ES and perplexity before and after on
    held-out code and warns beyond the thresholds; the manifest keeps the parent chain and the quality."""
    from kdcode.compression.compress import run_compress
    from kdcode.models.artifacts import weights_size

    spec = from_flags(CompressSpec, compress, locals())
    folder, manifest = run_compress(model, spec, out, overwrite=overwrite, verify=not no_verify)
    comp, m = manifest["compression"], manifest["model"]
    out_console().print(styled(
        "compressed model written to", "green", f"{folder}  ({', '.join(s['step'] for s in comp['steps'])}; "
        f"{m['params_m_before']}M -> {m['params_m']}M params, {weights_size(folder) / 1e6:.2f} MB on disk; "
        f"loads with {comp['loading']})"
    ))
    for step in comp["steps"]:
        if step["step"] == "int8":
            out_console().print(f"int8 scheme: {step['int8_scheme']}"
                                + (f" ({step['chosen_by']})" if step.get("chosen_by") else ""))
    print_quality(comp.get("quality"))
    out_console().print(f"next:\n  kdcode eval {folder}\n  kdcode bench {folder} --compare {model} --device cpu")


def register(app: typer.Typer) -> None:
    app.command("list")(list_cmd)
    app.command()(doctor)
    app.command()(compress)
