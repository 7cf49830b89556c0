"""`kdcode list`, `kdcode doctor`, `kdcode compress`: the methods, the machine, and smaller students."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kdcode.cli._common import (
    DataOpt,
    GlobOpt,
    NoVerifyOpt,
    OverwriteOpt,
    fail,
    handle_errors,
    overrides,
    write_json,
)
from kdcode.cli._console import out_console, styled
from kdcode.cli._quality import CheckBlocksOpt, CheckSamplesOpt, MaxEsDropOpt, MaxPplRiseOpt, check_flags, print_quality


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
    dtype: Annotated[str | None, typer.Option(help="Store the weights as fp16, bf16 (or fp32).")] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="int8 weights of every Linear/Conv1D, for CPU inference.")
    ] = False,
    int8_scheme: Annotated[
        str, typer.Option(help="int8 activations: weight-only (float32, the default), per-token (int8 per token), "
                          "smoothquant (outliers moved into the weights, then per tensor) or per-tensor (the old "
                          "scheme; loses much on Llama-style models). See docs/compression.md.")
    ] = "weight-only",
    smooth_alpha: Annotated[float, typer.Option(help="smoothquant: migration strength alpha.")] = 0.5,
    prune_heads: Annotated[
        float, typer.Option(help="Fraction of attention heads removed per layer (GPT-2, Llama-style; GQA: per group).")
    ] = 0.0,
    prune_ffn: Annotated[float, typer.Option(help="Fraction of MLP neurons / gated channels removed per layer.")] = 0.0,
    data: DataOpt = None,
    glob: GlobOpt = None,
    calib_batches: Annotated[int, typer.Option(help="Calibration batches that score heads/neurons.")] = 8,
    calib_batch_size: Annotated[int, typer.Option(help="Blocks per calibration batch.")] = 8,
    calib_block_size: Annotated[int | None, typer.Option(help="Tokens per calibration block (default 256).")] = None,
    check_samples: CheckSamplesOpt = 32,
    check_blocks: CheckBlocksOpt = 16,
    max_es_drop: MaxEsDropOpt = 1.0,
    max_ppl_rise: MaxPplRiseOpt = 3.0,
    overwrite: OverwriteOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Prune (heads, MLP neurons), then store as fp16/bf16 or int8; measures ES and perplexity before and after on
    held-out code and warns beyond the thresholds; the manifest keeps the parent chain and the quality."""
    from kdcode.compression.compress import run_compress
    from kdcode.models.artifacts import weights_size
    from kdcode.spec import build_spec
    from kdcode.spec_compress import CompressSpec

    spec = build_spec(
        CompressSpec,
        {
            "dtype": dtype, "int8": int8, "int8_scheme": int8_scheme, "smooth_alpha": smooth_alpha,
            "prune_heads": prune_heads, "prune_ffn": prune_ffn,
            **check_flags(check_samples, check_blocks, max_es_drop, max_ppl_rise),
            "data": overrides({"source": data, "glob": glob}), "calib_batches": calib_batches,
            "calib_batch_size": calib_batch_size, "calib_block_size": calib_block_size,
        },
        "flags",
    )
    folder, manifest = run_compress(model, spec, out, overwrite=overwrite, verify=not no_verify)
    comp, m = manifest["compression"], manifest["model"]
    out_console().print(styled(
        "compressed model written to", "green", f"{folder}  ({', '.join(s['step'] for s in comp['steps'])}; "
        f"{m['params_m_before']}M -> {m['params_m']}M params, {weights_size(folder) / 1e6:.2f} MB on disk; "
        f"loads with {comp['loading']})"
    ))
    print_quality(comp.get("quality"))
    out_console().print(f"next:\n  kdcode eval {folder}\n  kdcode bench {folder} --compare {model} --device cpu")


def register(app: typer.Typer) -> None:
    app.command("list")(list_cmd)
    app.command()(doctor)
    app.command()(compress)
