"""`kdcode complete` and `kdcode serve`: a model where an editor can use it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kdcode.cli._common import (
    MODEL_HELP,
    BackendOpt,
    CompileOpt,
    DeviceOpt,
    DraftOpt,
    DraftTokensOpt,
    DtypeOpt,
    FimFormatOpt,
    FimOrderOpt,
    KvCacheOpt,
    NoVerifyOpt,
    ThreadsOpt,
    draft_arg,
    fail,
    handle_errors,
    parse_draft_tokens,
    runtime_flags,
    warn,
)
from kdcode.cli._console import err_console


@handle_errors
def complete(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    file: Annotated[Path | None, typer.Option("--file", help="Source file (default: the text on stdin).")] = None,
    line: Annotated[
        int | None, typer.Option(help="Cursor line, 1-based (default: the end of the text: it is all prefix).")
    ] = None,
    col: Annotated[
        int | None, typer.Option(help="Cursor column, 1-based characters (default: after the line's indentation).")
    ] = None,
    beams: Annotated[int, typer.Option(help="1 = greedy; >1 = beam search.")] = 1,
    n: Annotated[int, typer.Option("--n", help="Alternatives: the n best distinct beams (fewer if beams agree).")] = 1,
    max_tokens: Annotated[int, typer.Option(help="Longest completion in tokens.")] = 48,
    temperature: Annotated[float, typer.Option(help="0 = greedy / beams; >0 samples.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    no_suffix: Annotated[
        bool, typer.Option("--no-suffix", help="Complete from the text before the cursor alone, even if the model "
                           "infills.")
    ] = False,
    fim_format: FimFormatOpt = None,
    fim_order: FimOrderOpt = "auto",
    backend: BackendOpt = "auto",
    kv_cache: KvCacheOpt = "dynamic",
    compile_step: CompileOpt = False,
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

    if file is not None:
        text = file.read_text(encoding="utf-8")
    elif sys.stdin is None or sys.stdin.isatty():
        fail("give --file FILE, or pipe the text before the cursor on stdin")
    else:
        text = sys.stdin.read()
    prefix = prefix_at(text, line, col) if line is not None else text
    runtime = runtime_flags(backend, kv_cache, compile_step)
    engine = load_engine(model, device=device, dtype=dtype, threads=threads, verify=not no_verify, warm_up=False,
                         fim_format=fim_format, fim_order=fim_order, runtime=runtime, draft=draft_arg(draft),
                         draft_tokens=parse_draft_tokens(draft_tokens))
    suffix = suffix_at(text, line, col) if line is not None and engine.fim is not None and not no_suffix else None
    result = engine.complete(prefix, max_tokens, n=n, beams=beams, temperature=temperature, seed=seed, suffix=suffix)
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
    host: Annotated[str, typer.Option(help="Address to listen on (loopback: only this machine).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Longest prompt accepted, in tokens (default: the model's context).")
    ] = None,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 128,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a client has to send a request's body (then 408 and the connection closed).")
    ] = 10.0,
    max_context_chars: Annotated[
        int, typer.Option(help="Longest prefix and suffix (each, in characters) an infill request may send; the "
                          "model sees a window of them around the cursor.")
    ] = 65_536,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for the model behind the one it is working on; one more is "
                          "answered 503 with Retry-After.")
    ] = 16,
    fim_format: FimFormatOpt = None,
    fim_order: FimOrderOpt = "auto",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    backend: BackendOpt = "auto",
    kv_cache: KvCacheOpt = "dynamic",
    compile_step: CompileOpt = False,
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

    if not body_timeout > 0:
        fail(f"--body-timeout must be more than 0 seconds, not {body_timeout}")
    engine = load_engine(model, device=device, dtype=dtype, threads=threads, verify=not no_verify,
                         fim_format=fim_format, fim_order=fim_order,
                         runtime=runtime_flags(backend, kv_cache, compile_step), draft=draft_arg(draft),
                         draft_tokens=parse_draft_tokens(draft_tokens))
    app_ = create_app(model, engine=engine, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                      body_timeout_s=body_timeout, max_context_chars=max_context_chars, max_queue=max_queue,
                      fim_format=fim_format)
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
