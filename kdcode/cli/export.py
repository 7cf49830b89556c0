"""`kdcode export`: a model folder as a GGUF file (llama.cpp, ollama) or an ONNX folder (ONNX Runtime)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from kdcode.cli._common import NoVerifyOpt, OverwriteOpt, handle_errors
from kdcode.cli._console import out_console, styled
from kdcode.cli._options import from_flags, spec_option
from kdcode.cli._quality import print_quality
from kdcode.spec_compress import ExportCheckSpec, ExportSpec

X = functools.partial(spec_option, ExportSpec)  # export's options: fields of its spec and of its quality check
XC = functools.partial(spec_option, ExportCheckSpec)


@handle_errors
def export(
    model: Annotated[str, typer.Argument(help="Model folder (or 'bundled') to export.")],
    out: Annotated[Path, typer.Option(help="GGUF: the file F.gguf to write; ONNX: the folder to write.")],
    fmt: X("format") = None,
    quant: X("quant") = None,
    int8: X("int8") = None,
    opset: X("opset") = None,
    data: XC("data.source", "--data") = None,
    glob: XC("data.glob") = None,
    check_samples: XC("check_samples") = None,
    check_blocks: XC("check_blocks") = None,
    max_es_drop: XC("max_es_drop") = None,
    max_ppl_rise: XC("max_ppl_rise") = None,
    overwrite: OverwriteOpt = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Export for another runtime, with the tokenizer, the source's sha256 and the settings recorded; a quantized
    export (--quant other than f32, --int8) is measured against its source on held-out code (--data's test
    split) where its runtime is installed."""
    from kdcode.export.run import modelfile_path, run_export, sidecar_path

    spec = from_flags(ExportSpec, export, locals())
    check = from_flags(ExportCheckSpec, export, locals())
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
