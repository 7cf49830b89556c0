"""What every command shares: error handling (one line, or the traceback with ``--debug``), the option
declarations used by several commands, the one flag-to-spec override helper and JSON output. Consoles, tables
and styled lines (text, never Rich markup) are :mod:`kdcode.cli._console`'s."""

from __future__ import annotations

import functools
import inspect
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from kdcode.cli._console import err_console, styled
from kdcode.cli._signals import Terminated, sigterm_unwinds
from kdcode.errors import KdcodeDeprecation, KdcodeError

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One ``error:`` line on stderr, then exit with ``code``."""
    err_console().print(styled("error:", "bold red", message))
    raise typer.Exit(code=code)


def warn(message: str) -> None:
    err_console().print(styled("warning:", "yellow", message))


def refuse_with(flag: str, others: dict[str, bool], how: str) -> None:
    """Flags that ``flag`` would leave unused in silence (those of ``others`` set True): one line, exit 2."""
    given = [name for name, on in others.items() if on]
    if given:
        fail(f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not go with {flag}: {how}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "") if text else type(exc).__name__


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command: a KdcodeError is one line on stderr and its exit code; a failed write (disk full, read-only,
    permissions; also as the libraries wrap them) or any unexpected error is one line naming it; ``--debug`` (on
    the root command) shows the traceback instead. Ctrl-C and SIGTERM unwind the command (its temp files removed)
    to one line, exit 130 / 143. kdcode's deprecation notes are ``warning:`` lines."""
    signature = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def wrapper(*args: Any, _kdcode_ctx: typer.Context, **kwargs: Any) -> Any:
        debug = bool((_kdcode_ctx.find_root().obj or {}).get("debug"))
        name = _kdcode_ctx.info_name or fn.__name__
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught, sigterm_unwinds():
                warnings.simplefilter("always", KdcodeDeprecation)
                try:
                    return fn(*args, **kwargs)
                except typer.Exit:
                    raise
                except KdcodeError as exc:
                    if debug:
                        raise
                    fail(str(exc), code=exc.exit_code)
                except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): temp files are gone by now
                    how, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
                    fail(f"{how}; no output was left half-written", code=code)
                except Exception as exc:  # noqa: BLE001 - people get one line; --debug gives the traceback
                    if debug:
                        raise
                    if _is_write_error(exc):
                        fail(f"cannot write: {_one_line(exc)} (free space or permissions?; --debug shows the "
                             "traceback)")
                    fail(f"{name} failed: {type(exc).__name__}: {_one_line(exc)} (kdcode --debug {name} ... shows "
                         "the traceback)", code=1)
        finally:  # shown once recording has stopped (while recording, showing a warning records it again)
            shown: set[str] = set()  # a spec validated twice (a sweep's points, then each run) says each once
            for w in list(caught):
                if issubclass(w.category, KdcodeDeprecation):
                    if str(w.message) not in shown:
                        shown.add(str(w.message))
                        warn(str(w.message))
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    ctx_param = inspect.Parameter("_kdcode_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), ctx_param])  # type: ignore[attr-defined]
    return wrapper


def _is_write_error(exc: BaseException) -> bool:
    """An OSError, or a library error that wraps one (safetensors' SafetensorError says 'No space left')."""
    if isinstance(exc, OSError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "read-only file system", "permission denied", "disk quota"))


def overrides(pairs: dict[str, Any]) -> dict[str, Any]:
    """Flags as a nested spec mapping: ``{"train.lr": 1e-3, "out": None}`` -> ``{"train": {"lr": 1e-3}}``;
    None (a flag not given) is left out, so the spec file's or the default value stays."""
    nested: dict[str, Any] = {}
    for dotted, value in pairs.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def check_json_path(path: Path | None, model: str, compare: str | None = None) -> None:
    """Before any work: ``--json FILE`` may not be (or lie inside) a model folder it reads, and must be writable."""
    if path is None or str(path) == "-":
        return
    from kdcode.models.artifacts import check_output
    from kdcode.models.load import input_path

    inputs = {"MODEL": input_path(model), "--compare": input_path(compare) if compare else None}
    check_output(path, inputs=inputs, folder=False, flag="--json")


def write_json(path: Path | None, data: Any) -> None:
    """``--json FILE`` (``-``: stdout), written atomically; a failure to write is one line."""
    if path is None:
        return
    text = json.dumps(data, indent=2, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    from kdcode.models.artifacts import write_error, write_text_atomic

    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise write_error(exc, path) from exc


def record_metrics(model: str, name: str, metrics: dict[str, Any]) -> None:
    """--record: store ``metrics`` under manifest["metrics"][name] of a local model folder."""
    from kdcode.models.artifacts import update_metrics
    from kdcode.models.load import resolve_path

    path = resolve_path(model)
    if path is None:
        fail("--record needs a local model folder")
    update_metrics(path, name, metrics)


# ---- options several commands share that are no spec's field (the rest: kdcode.cli._options) -------------
MODEL_HELP = "Model folder, 'bundled', a HF id, FILE.gguf, ollama:NAME[:TAG] or smollm2."
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", help="Softmax temperature of the soft loss "
                                                      "(a param of the strategy: kdcode list NAME).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")]
NoVerifyOpt = Annotated[bool, typer.Option("--no-verify", help="Skip the weights' sha256 check.")]
JsonFileOpt = Annotated[Path | None, typer.Option("--json", help="Also write the figures as JSON ('-': stdout only).")]
RecordOpt = Annotated[bool, typer.Option("--record", help="Store the figures in the model's manifest.")]


DraftOpt = Annotated[
    str | None, typer.Option("--draft", help="A student of this model drafting for it (speculative decoding: the "
                             "model's own output, faster when the student guesses well), or lookup: prompt lookup, "
                             "tokens copied from the context, no draft model (a folder named lookup: ./lookup).")
]


def draft_arg(value: str | None) -> str | None:
    """--draft as given. The word ``lookup`` is prompt lookup even where a file or folder of that name is here: one
    warning line then says to write ./lookup for it."""
    from kdcode.inference.lookup import LOOKUP

    if value == LOOKUP and Path(LOOKUP).exists():
        warn(f"--draft {LOOKUP} drafts by prompt lookup (no draft model), not with ./{LOOKUP}; for that folder "
             f"give --draft ./{LOOKUP}")
    return value


def parse_draft_tokens(value: str) -> int | str:
    """--draft-tokens: a count of at least 1, or auto (calibrated on a few completions)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        fail(f"--draft-tokens {value!r}: give a number of tokens (1 or more) or auto")
    return int(value)


DraftTokensOpt = Annotated[str, typer.Option("--draft-tokens", help="Tokens the draft proposes per pass, or auto.")]
