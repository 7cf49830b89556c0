"""`kdcode data`: prepare evaluation data in CodeXGLUE's layouts (a Typer sub-app)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from kdcode.cli._common import fail, handle_errors
from kdcode.cli._console import out_console, styled
from kdcode.cli._options import spec_flags, spec_option
from kdcode.spec import DataSpec, EvalSpec, build_spec

D = functools.partial(spec_option, DataSpec)  # the options of `data prepare` and `data lines`: fields of their specs
E = functools.partial(spec_option, EvalSpec)

data_app = typer.Typer(
    name="data",
    help="Prepare data in CodeXGLUE's layouts: py150 split files and line-completion sets.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
)


SOURCE_HELP = "A folder of source files, 'stdlib', a .jsonl file, a HF dataset id, or a prepared py150 folder."


@data_app.command("prepare")
@handle_errors
def prepare_cmd(
    src: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    out: Annotated[Path, typer.Option(help="Folder to write train.txt, dev.txt and test.txt to.")],
    data_format: Annotated[str, typer.Option("--format", help="Output format: py150 (the only one).")] = "py150",
    glob: D("glob") = None,
    valid_fraction: D("valid_fraction") = None,
    test_fraction: D("test_fraction") = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing split files in --out.")] = False,
) -> None:
    """Normalise source files as CodeXGLUE's py150 and write them one per line, split by the usual hash split."""
    from kdcode.data.corpus import prepare_py150 as prepare

    if data_format != "py150":
        fail(f"--format {data_format!r}: only py150 can be written one file per line; pass --format py150")
    data = build_spec(DataSpec, {**spec_flags(prepare_cmd, locals(), DataSpec), "source": src, "format": "py150"},
                      "flags")
    result = prepare(data, out, overwrite=overwrite)
    written = ", ".join(f"{name} {n}" for name, n in result["written"].items())
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(result["skipped"].items())) or "none"
    out_console().print(styled("wrote", "green", f"{out}: {written} files; skipped: {skipped}"))


@data_app.command("lines")
@handle_errors
def lines_cmd(
    src: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    out: Annotated[Path, typer.Option(help="The {id, input, gt} .jsonl file to write.")],
    samples: E("samples") = None,
    seed: E("seed") = None,
    data_format: E("data.format", "--format") = None,
    split: E("split") = None,
    glob: E("data.glob") = None,
    valid_fraction: E("data.valid_fraction") = None,
    test_fraction: E("data.test_fraction") = None,
) -> None:
    """Write a line-completion set in CodeXGLUE's line-level layout, for `kdcode eval --lines`."""
    from kdcode.evaluation.completion_sets import write_completion_set

    flags = spec_flags(lines_cmd, locals(), EvalSpec)
    spec = build_spec(EvalSpec, {**flags, "data": {**flags.get("data", {}), "source": src}}, "flags")
    result = write_completion_set(spec, out)
    out_console().print(styled(
        "wrote", "green", f"{out}: {result['samples']} samples from {result['files']} files "
        f"({spec.split} split, {spec.data.format})"
    ))
