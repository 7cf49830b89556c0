"""`kdcode complete` and `kdcode serve`: a model where an editor can use it."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kdcode.cli._common import (
    MODEL_HELP,
    DraftOpt,
    DraftTokensOpt,
    NoVerifyOpt,
    draft_arg,
    fail,
    handle_errors,
    parse_draft_tokens,
    warn,
)
from kdcode.cli._console import err_console
from kdcode.cli._options import from_flags, runtime_of, spec_option
from kdcode.spec import RuntimeSpec
from kdcode.spec_serve import CompleteSpec, EngineSpec, ServeSpec

C = functools.partial(spec_option, CompleteSpec)  # complete's options: fields of its spec
S = functools.partial(spec_option, ServeSpec)
RT = functools.partial(spec_option, RuntimeSpec)


def engine_args(spec: EngineSpec) -> dict[str, Any]:
    """What :func:`kdcode.inference.engine.load_engine` takes from a complete / serve spec."""
    return {k: getattr(spec, k) for k in EngineSpec.model_fields}


@handle_errors
def complete(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    file: Annotated[Path | None, typer.Option("--file", help="Source file (default: the text on stdin).")] = None,
    line: C("line") = None,
    col: C("column", "--col") = None,
    beams: C("beams") = None,
    n: C("n") = None,
    max_tokens: C("max_tokens") = None,
    temperature: C("temperature") = None,
    seed: C("seed") = None,
    device: C("device") = None,
    dtype: C("dtype") = None,
    threads: C("threads") = None,
    no_suffix: Annotated[
        bool, typer.Option("--no-suffix", help="Complete from the text before the cursor alone, even if the model "
                           "infills.")
    ] = False,
    fim_format: C("fim_format") = None,
    fim_order: C("fim_order") = None,
    backend: RT("backend") = None,
    kv_cache: RT("kv_cache") = None,
    compile_step: RT("compile") = None,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = "4",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON: completions, finish reasons, token counts, timings.")
    ] = False,
    no_verify: NoVerifyOpt = False,
) -> None:
    """Complete the line at a cursor (--file/--line/--col, or the prefix on stdin) up to its end or --max-tokens.

    When the model infills (it has FIM tokens), the text after the cursor in --file is its suffix."""
    from kdcode.inference.engine import load_engine, prefix_at, suffix_at

    spec = from_flags(CompleteSpec, complete, locals())
    runtime = runtime_of(complete, locals())
    if file is not None:
        text = file.read_text(encoding="utf-8")
    elif sys.stdin is None or sys.stdin.isatty():
        fail("give --file FILE, or pipe the text before the cursor on stdin")
    else:
        text = sys.stdin.read()
    line, col = spec.line, spec.column
    prefix = prefix_at(text, line, col) if line is not None else text
    engine = load_engine(model, **engine_args(spec), verify=not no_verify, warm_up=False, runtime=runtime,
                         draft=draft_arg(draft), draft_tokens=parse_draft_tokens(draft_tokens))
    suffix = suffix_at(text, line, col) if line is not None and engine.fim is not None and not no_suffix else None
    result = engine.complete(prefix, spec.max_tokens, n=spec.n, beams=spec.beams, temperature=spec.temperature,
                             seed=spec.seed, suffix=suffix)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "model": model,
                    "runtime": engine.runtime,
                    "infill": None if suffix is None else {"format": engine.fim.name,  # type: ignore[union-attr]
                                                           "suffix_chars": len(suffix), "cut": result.truncated},
                    "prompt_tokens": result.prompt_tokens,
                    "completions": [vars(c) for c in result.choices],
                    "first_token_ms": None if result.first_token_s is None else round(1000 * result.first_token_s, 1),
                    "total_ms": round(1000 * result.total_s, 1),
                },
                indent=2,
            )
        )
        return
    for choice in result.choices:
        typer.echo(choice.text)


@handle_errors
def serve(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    host: S("host") = None,
    port: S("port") = None,
    max_prompt_tokens: S("max_prompt_tokens") = None,
    max_tokens_limit: S("max_tokens_limit") = None,
    body_timeout: S("body_timeout") = None,
    max_context_chars: S("max_context_chars") = None,
    max_queue: S("max_queue") = None,
    fim_format: S("fim_format") = None,
    fim_order: S("fim_order") = None,
    device: S("device") = None,
    dtype: S("dtype") = None,
    threads: S("threads") = None,
    backend: RT("backend") = None,
    kv_cache: RT("kv_cache") = None,
    compile_step: RT("compile") = None,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = "4",
    no_verify: NoVerifyOpt = False,
) -> None:
    """A completion server for editors: OpenAI (POST /v1/completions, with suffix), llama.cpp (POST /infill,
    POST /completion) and Ollama (POST /api/generate) shapes; GET /v1/models, GET /api/tags, GET /health."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        fail("kdcode serve needs FastAPI and uvicorn: pip install 'kdcode[serve]'")
    from kdcode.inference.engine import load_engine
    from kdcode.inference.server import create_app

    spec = from_flags(ServeSpec, serve, locals())
    engine = load_engine(model, **engine_args(spec), verify=not no_verify, runtime=runtime_of(serve, locals()),
                         draft=draft_arg(draft), draft_tokens=parse_draft_tokens(draft_tokens))
    app_ = create_app(model, engine=engine, serve=spec)
    host, port = spec.host, spec.port
    if host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"listening on {host}: anyone who can reach it can use the model (no auth)")
    rt = app_.state.engine.runtime
    fim = app_.state.engine.fim
    infill = f"infills ({fim.name} FIM tokens)" if fim is not None else "does not infill (no FIM tokens)"
    err_console().print(f"serving {model} on http://{host}:{port} (/v1/completions, /infill, /completion, "
                        f"/api/generate) on {rt['device']}, {rt['dtype']}, {rt['threads']} threads, "
                        f"{rt.get('backend', 'torch')}; it {infill}; Ctrl-C stops")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command()(complete)
    app.command()(serve)
