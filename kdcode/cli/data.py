"""`kdcode data`: prepare evaluation data in CodeXGLUE's layouts (a Typer sub-app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kdcode.cli._common import fail, handle_errors
from kdcode.cli._console import out_console, styled

data_app = typer.Typer(
    name="data",
    help="Prepare data in CodeXGLUE's layouts: py150 split files and line-completion sets.",
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
)


SOURCE_HELP = "A folder of source files, 'stdlib', a .jsonl file, a HF dataset id, or a prepared py150 folder."


def _data_spec(src: str, glob: str, fmt: str, valid_fraction: float | None, test_fraction: float | None) -> Any:
    from kdcode.spec import DataSpec, build_spec

    data: dict[str, Any] = {"source": src, "glob": glob, "format": fmt}
    for key, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if value is not None:
            data[key] = value
    return build_spec(DataSpec, data, "flags")


@data_app.command("prepare")
@handle_errors
def prepare_cmd(
    src: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    out: Annotated[Path, typer.Option(help="Folder to write train.txt, dev.txt and test.txt to.")],
    data_format: Annotated[str, typer.Option("--format", help="Output format: py150 (the only one).")] = "py150",
    glob: Annotated[str, typer.Option(help="File pattern inside a source folder.")] = "**/*.py",
    valid_fraction: Annotated[float | None, typer.Option(help="Share of files in dev.txt (hash split).")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Share of files in test.txt (hash split).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing split files in --out.")] = False,
) -> None:
    """Normalise source files as CodeXGLUE's py150 and write them one per line, split by the usual hash split."""
    from kdcode.data.corpus import prepare_py150 as prepare

    if data_format != "py150":
        fail(f"--format {data_format!r}: only py150 can be written one file per line; pass --format py150")
    result = prepare(_data_spec(src, glob, "py150", valid_fraction, test_fraction), out, overwrite=overwrite)
    written = ", ".join(f"{name} {n}" for name, n in result["written"].items())
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(result["skipped"].items())) or "none"
    out_console().print(styled("wrote", "green", f"{out}: {written} files; skipped: {skipped}"))


@data_app.command("lines")
@handle_errors
def lines_cmd(
    src: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    out: Annotated[Path, typer.Option(help="The {id, input, gt} .jsonl file to write.")],
    samples: Annotated[int, typer.Option(help="Completions to draw.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the draw (and of py150's cut points).")] = 0,
    data_format: Annotated[
        str, typer.Option("--format", help="raw (cut at line starts) or py150 (normalised, random cut in a line).")
    ] = "raw",
    split: Annotated[str, typer.Option(help="test, valid, train, or all.")] = "test",
    glob: Annotated[str, typer.Option(help="File pattern inside a source folder.")] = "**/*.py",
    valid_fraction: Annotated[float | None, typer.Option(help="Share of files in the valid split.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Share of files in the test split.")] = None,
) -> None:
    """Write a line-completion set in CodeXGLUE's line-level layout, for `kdcode eval --lines`."""
    from kdcode.evaluation.completion_sets import write_completion_set
    from kdcode.spec import EvalSpec, build_spec

    data = _data_spec(src, glob, data_format, valid_fraction, test_fraction)
    spec = build_spec(
        EvalSpec, {"data": data.model_dump(), "split": split, "samples": samples, "seed": seed}, "flags"
    )
    result = write_completion_set(spec, out)
    out_console().print(styled(
        "wrote", "green", f"{out}: {result['samples']} samples from {result['files']} files "
        f"({spec.split} split, {spec.data.format})"
    ))
