"""`kdcode export`: a model folder as a GGUF file (llama.cpp, ollama) or an ONNX folder (ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdcode.cli._common import (
    DataOpt,
    GlobOpt,
    NoVerifyOpt,
    OverwriteOpt,
    handle_errors,
    overrides,
)
from kdcode.cli._console import out_console, styled
from kdcode.cli._quality import CheckBlocksOpt, CheckSamplesOpt, MaxEsDropOpt, MaxPplRiseOpt, check_flags, print_quality


@handle_errors
def export(
    model: Annotated[str, typer.Argument(help="Model folder (or 'bundled') to export.")],
    out: Annotated[Path, typer.Option(help="GGUF: the file F.gguf to write; ONNX: the folder to write.")],
    fmt: Annotated[str, typer.Option("--format", help="gguf (llama.cpp, ollama) or onnx (ONNX Runtime).")],
    quant: Annotated[
        str | None, typer.Option(help="GGUF weight type: f32 (default), f16, q8_0 or q4_0.")
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="ONNX: int8 weights (ONNX Runtime's dynamic quantizer).")
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    data: DataOpt = None,
    glob: GlobOpt = None,
    check_samples: CheckSamplesOpt = 32,
    check_blocks: CheckBlocksOpt = 16,
    max_es_drop: MaxEsDropOpt = 1.0,
    max_ppl_rise: MaxPplRiseOpt = 3.0,
    overwrite: OverwriteOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Export for another runtime, with the tokenizer, the source's sha256 and the settings recorded; a quantized
    export (--quant other than f32, --int8) is measured against its source on held-out code (--data's test
    split) where its runtime is installed."""
    from kdcode.export.run import modelfile_path, run_export, sidecar_path
    from kdcode.spec import build_spec
    from kdcode.spec_compress import ExportCheckSpec, ExportSpec

    spec = build_spec(ExportSpec, {"format": fmt, "quant": quant, "int8": int8, "opset": opset}, "flags")
    check = build_spec(ExportCheckSpec, {"data": overrides({"source": data, "glob": glob}),
                                         **check_flags(check_samples, check_blocks, max_es_drop, max_ppl_rise)},
                       "flags")
    path, manifest = run_export(model, spec, out, overwrite=overwrite, verify=not no_verify, check=check)
    console = out_console()
    size = f"{manifest['bytes'] / 1e6:.2f} MB"
    if spec.format == "gguf":
        console.print(styled("GGUF written to", "green", f"{path} ({manifest['gguf']['quant']}, {size}); provenance "
                             f"in its kdcode.manifest key and {sidecar_path(path).name}; ollama: "
                             f"{modelfile_path(path).name}"))
        print_quality(manifest.get("quality"))
        console.print(f"next:\n  kdcode bench {path} --compare {model} --device cpu\n"
                      f"  ollama create NAME -f {modelfile_path(path)}")
    else:
        console.print(styled("ONNX export written to", "green", f"{path} ({'int8' if spec.int8 else 'float32'}, "
                             f"{size})"))
        print_quality(manifest.get("quality"))
        console.print(f"next:\n  kdcode bench {path} --compare {model} --device cpu")


def register(app: typer.Typer) -> None:
    app.command()(export)
