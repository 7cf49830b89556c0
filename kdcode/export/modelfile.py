"""The ``ollama`` Modelfile written beside a GGUF export: raw completion (the prompt is the code before the
cursor, no chat template), greedy, the model's context, and the stops kdcode's line completion uses.

Ollama's Modelfile has no escapes: a value is a word, ``"..."`` or ``\"\"\"...\"\"\"``, and a newline is kept
only inside triple quotes, which is how the end-of-line stop is written.
"""

from __future__ import annotations

from typing import Any

MAX_TOKENS = 48  # as `kdcode complete`


def _quote(value: str) -> str:
    if "\n" in value or '"' in value:
        if '"""' in value:
            raise ValueError(f"a Modelfile value cannot hold {value!r}")
        return f'"""{value}"""'
    return f'"{value}"'


def stop_strings(tokenizer: Any) -> list[str]:
    """kdcode's line-completion stops as text: the end of the line, ``<EOL>`` (py150 models) and end-of-text."""
    stops = ["\n"]
    eol = tokenizer.convert_tokens_to_ids("<EOL>")
    if eol is not None and eol != tokenizer.unk_token_id:
        stops.append("<EOL>")
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    return stops


def template(fim: Any = None, order: str = "psm") -> str:
    """Raw completion (``{{ .Prompt }}``); for a model with FIM tokens (a
    :class:`kdcode.models.fim_tokens.FimTokens`), the infilling prompt kdcode builds in ``order`` when a request has a
    ``suffix`` (Ollama's ``.Suffix``)."""
    if fim is None:
        return "{{ .Prompt }}"
    f = fim.format
    prompt, suffix = "{{ .Prompt }}", "{{ .Suffix }}"
    infill = f"{f.prefix}{f.suffix}{suffix}{f.middle}{prompt}" if order == "spm" else f.template(prompt, suffix)
    return f"{{{{ if .Suffix }}}}{infill}{{{{ else }}}}{prompt}{{{{ end }}}}"


def modelfile(gguf_name: str, tokenizer: Any, n_ctx: int, source: str, fim: Any = None, order: str = "psm") -> str:
    """The Modelfile's text; ``gguf_name`` is the GGUF's file name (the Modelfile lies beside it); ``fim``, ``order``:
    the model's FIM tokens and infilling order (:func:`template`)."""
    lines = [
        f"# ollama Modelfile for {gguf_name}, written by kdcode export from {source}",
        f"# ollama create NAME -f {gguf_name.removesuffix('.gguf')}.Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
        "# raw completion: the prompt is the code before the cursor (no chat template)"
        + (f"; with a suffix, {fim.name} fill-in-the-middle in {order.upper()} order" if fim is not None else ""),
        f"TEMPLATE {_quote(template(fim, order))}",
        "PARAMETER temperature 0",
        f"PARAMETER num_ctx {n_ctx}",
        f"PARAMETER num_predict {MAX_TOKENS}",
        "# one line per completion, as `kdcode complete`: delete the first stop for multi-line completions",
    ]
    lines += [f"PARAMETER stop {_quote(s)}" for s in stop_strings(tokenizer)]
    return "\n".join(lines) + "\n"
