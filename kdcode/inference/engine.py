"""Completions for local use: one model loaded once, the prefix an editor sends (the text up to the cursor),
and the suffix (the text after it) when the model infills.

``prefix_at`` cuts a file's text at a cursor (1-based line and column). ``Engine`` completes a prefix with
greedy decoding, beam search (the n best distinct alternatives) or sampling, with a KV cache, stopping at the
end of the line (or at the given stop strings) or after ``max_tokens``; ``on_text`` receives the text as it
is generated (streaming). A prompt that ends inside indentation or after a space is healed back over that
whitespace (``DecodeOptions.heal_space``), so the model sees the prompt tokenized as in training. With a
``suffix`` the model fills the middle from its FIM prompt (:mod:`kdcode.inference.infill`: prefix and suffix
each tokenized on its own, as in FIM training, so nothing is healed).

The engine keeps its model's KV cache (and its draft's) from one call to the next (:class:`PromptCache`): a prompt
that starts as the previous one did is prefilled only from where they differ, as an editor's next request is
(torch models, greedy or sampled one at a time and speculative; beam search and other backends start cold).
``cancel``, an event another thread sets, stops a completion before its next model pass.

A draft makes the completion the model's own output in fewer model passes (speculative decoding,
:mod:`kdcode.inference.speculative`): a student of the model, or ``"lookup"`` (prompt lookup: proposals copied from
the context, no draft model; :mod:`kdcode.inference.lookup`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kdcode.device import model_device
from kdcode.errors import KdcodeError
from kdcode.inference.decode import DecodeOptions, VocabIndex, beam_alternatives, encode_prompt, greedy, n_positions
from kdcode.inference.forward import PromptCache
from kdcode.inference.infill import encode_infill
from kdcode.inference.loader import dtype_name, load_for_inference
from kdcode.inference.lookup import as_lookup
from kdcode.inference.speculative import auto_k, check_pair, speculative
from kdcode.models import fim_tokens
from kdcode.models.fim_tokens import require
from kdcode.models.load import context_length

DEFAULT_STOP: tuple[str, ...] = ("\n",)
OnText = Callable[[int, str], None]  # (choice index, text delta)


def prefix_at(text: str, line: int, col: int | None = None) -> str:
    """The text before a cursor at ``line`` (1-based) and ``col`` (1-based, in characters: 1 is the line's
    start, the line's length + 1 its end). Without ``col`` the cursor stands after the line's indentation,
    which stays in the prefix, as an editor sends it."""
    lines = text.split("\n")  # a text ending in a newline has an empty last line, as editors show it
    if not 1 <= line <= len(lines):
        raise KdcodeError(f"--line {line} is outside the text, which has {len(lines)} lines (the first is 1)")
    current = lines[line - 1].removesuffix("\r")
    if col is None:
        col = len(current) - len(current.lstrip(" \t")) + 1
    elif not 1 <= col <= len(current) + 1:
        raise KdcodeError(
            f"--col {col} is outside line {line}, which has {len(current)} characters (columns 1 to {len(current) + 1})"
        )
    offset = sum(len(s) + 1 for s in lines[: line - 1])
    return text[: offset + col - 1]


def suffix_at(text: str, line: int, col: int | None = None) -> str:
    """The text after the cursor :func:`prefix_at` places (the suffix an infilling model is given)."""
    return text[len(prefix_at(text, line, col)) :]


@dataclass
class Choice:
    text: str
    tokens: int  # generated tokens, the healed whitespace and the stop included
    finish_reason: str  # "stop": a stop string, the end of the line or of the text; "length": max_tokens


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int  # tokens in the prompt as given; the model sees at most its context minus max_tokens
    first_token_s: float | None  # from the call to the first generated token (None for beam search)
    total_s: float
    truncated: bool = False  # infilling: code before or after the cursor was left out of the model's window
    cached_tokens: int = 0  # prompt tokens taken from the previous call's KV cache (not fed again)
    cancelled: bool = False  # stopped by ``cancel`` before it ended: the choices hold what was made until then


def _settled(text: str, stops: Sequence[str]) -> str:
    """The part of a partial completion that later tokens cannot take back: not a partial UTF-8 character at its
    end, nor a tail that may be the start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


class _Stream:
    """Turns generated tokens into text deltas per choice; ``flush`` sends what the final text adds."""

    def __init__(self, index: Any, opts: Any, healed: str, on_text: OnText | None, t0: float) -> None:
        self.index, self.opts, self.healed, self.on_text, self.t0 = index, opts, healed, on_text, t0
        self.gens: dict[int, list[int]] = {}
        self.sent: dict[int, str] = {}
        self.first_token_s: float | None = None

    def on_token(self, row: int, token: int) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.t0
        if self.on_text is None:
            return
        gen = self.gens.setdefault(row, [])
        gen.append(token)
        stops = self.opts.stop_strings
        self._send(row, _settled(self.index.completion_text(gen, self.healed, stops), stops))

    def flush(self, row: int, final: str) -> None:
        if self.on_text is not None:
            self._send(row, final)

    def _send(self, row: int, text: str) -> None:
        sent = self.sent.get(row, "")
        if len(text) > len(sent) and text.startswith(sent):
            self.sent[row] = text
            self.on_text(row, text[len(sent) :])  # type: ignore[misc]


class Engine:
    """One model and tokenizer, ready to complete prefixes; not thread-safe (callers queue their calls)."""

    def __init__(
        self, loaded: Any, fim_format: str | None = None, draft: Any = None, draft_tokens: int = 4,
        fim_order: str = "auto",
    ) -> None:
        self.loaded = loaded
        self.name = loaded.name
        self.model = loaded.model.eval()
        self.n_positions = context_length(self.model.config, 1024)
        self.dtype = dtype_name(self.model)
        self.device = str(model_device(self.model))
        self.runtime = loaded.runtime or {"device": self.device, "dtype": self.dtype, "threads": None}
        self.index = VocabIndex.for_model(self.model, loaded.tokenizer)
        # a student drafting for it, or prompt lookup (PromptLookup, "lookup"): speculative decoding
        self.draft, self.draft_tokens = as_lookup(draft) or draft, draft_tokens
        self.prompt_cache, self.draft_cache = PromptCache(), PromptCache()  # each model's, from its last call
        lookup = as_lookup(self.draft)
        if lookup is not None:
            self.runtime = {**self.runtime, "draft": lookup.name, "lookup_max_n": lookup.max_n}
        elif self.draft is not None:
            check_pair(loaded.tokenizer, self.draft.tokenizer, loaded.name, self.draft.name)
            self.runtime = {**self.runtime, "draft": self.draft.name}
        _ = self.index.token_texts  # built once here (healing needs it): every call shares it
        # how it infills: the FIM tokens of its tokenizer (the named family's when given), None when it does not
        self.fim = (fim_tokens.require(self.tokenizer, fim_format, self.name) if fim_format
                    else fim_tokens.detect(self.tokenizer))
        self.fim_order = fim_tokens.infill_order(fim_order, loaded.manifest)  # psm | spm

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def draft_model(self) -> Any:
        """What speculative decoding drafts with: the draft's model, the :class:`PromptLookup`, or None."""
        if self.draft is None or as_lookup(self.draft) is not None:
            return self.draft
        return self.draft.model

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def clear_prompt_cache(self) -> None:
        """Forget the kept KV caches: the next completion starts cold."""
        self.prompt_cache.clear()
        self.draft_cache.clear()

    def calibrate_draft(self) -> int:
        """``--draft-tokens auto``: the k with the most tokens per second on a few short completions."""
        opts = DecodeOptions(max_new_tokens=16, heal_space=True)
        texts = ["import os\n\n\ndef main():\n    ", "class Config:\n    def __init__(self, path):\n        "]
        self.draft_tokens = auto_k(self.model, self.draft_model, self.index, texts, opts)
        self.runtime = {**self.runtime, "draft_tokens": self.draft_tokens}
        return self.draft_tokens

    def warm_up(self) -> None:
        """One short completion, so that the first real one does not pay for lazy initialisation."""
        self.complete("import os\n\n\ndef main():\n    ", max_tokens=4)

    def complete(
        self,
        prompt: str,
        max_tokens: int = 16,
        *,
        n: int = 1,
        beams: int = 1,
        temperature: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = DEFAULT_STOP,
        on_text: OnText | None = None,
        prompt_tokens: int | None = None,
        suffix: str | None = None,
        cancel: Any = None,
    ) -> Completion:
        """Complete ``prompt``: greedy (``beams=1, n=1``), the ``n`` best distinct beams of beam search
        (``temperature=0``, ``max(beams, n)`` beams), or ``n`` samples at ``temperature`` (seeded by ``seed``).
        ``prompt_tokens``, when the caller has counted them, saves tokenizing a long prompt twice. With a
        ``suffix`` (even an empty one: the end of the file) the model fills in the middle between ``prompt``
        and it; ``prompt_tokens`` is then the window's length. Once ``cancel`` (a ``threading.Event``) is set, no
        model pass starts: the completion ends where it is, marked ``cancelled``."""
        if not 1 <= max_tokens < self.n_positions:
            raise KdcodeError(
                f"max_tokens must be 1 to {self.n_positions - 1} (the model has {self.n_positions} positions)"
            )
        if n < 1 or beams < 1:
            raise KdcodeError("n and beams must be at least 1")
        if not temperature >= 0:  # NaN too
            raise KdcodeError("temperature must be >= 0 (0 = greedy)")
        if temperature > 0 and beams > 1:
            raise KdcodeError("beam search is deterministic: use temperature 0 with beams, or beams 1 to sample")
        if any(not s for s in stop):
            raise KdcodeError("a stop string cannot be empty")
        if seed is not None and not -(2**63) <= seed < 2**64:
            raise KdcodeError(f"seed {seed} does not fit in 64 bits")
        if suffix is not None and self.fim is None:
            require(self.tokenizer, None, self.name)  # raises: one line saying it does not infill
        t0 = time.perf_counter()
        if prompt_tokens is None and suffix is None:
            prompt_tokens = self.count_tokens(prompt)
        if not prompt.strip() and suffix is None:  # nothing to condition on but the start of a file
            if self.tokenizer.bos_token is None:
                raise KdcodeError("the prompt is empty and the tokenizer has no start-of-text token to stand for it")
            prompt = self.tokenizer.bos_token + prompt
        opts = DecodeOptions(
            max_new_tokens=max_tokens,
            context_tokens=self.n_positions - max_tokens,
            # py150 text is whitespace-separated tokens: not healed, as in eval; an infill prompt heals its prefix
            heal="<EOL>" not in prompt and suffix is None,
            heal_space=True,
            stop_strings=tuple(stop),
            temperature=temperature,
            seed=seed,
        )
        context = opts.context_for(n_positions(self.model))
        truncated = False
        if suffix is not None:
            encoded, window = encode_infill(self.index, self.fim, prompt, suffix, context,  # type: ignore[arg-type]
                                            heal="<EOL>" not in prompt, order=self.fim_order)
            prompt_tokens, truncated = len(encoded.ids), window.cut
        else:
            encoded = encode_prompt(self.index, prompt, opts, context)
        stream = _Stream(self.index, opts, encoded.healed, on_text, t0)
        self.prompt_cache.reused = self.draft_cache.reused = 0
        if temperature == 0 and (beams > 1 or n > 1):  # beams reorder the cache: cold, the kept one left as it is
            gen = beam_alternatives(self.model, self.index, encoded, opts, beams, n, cancel=cancel)
        elif self.draft is not None and n == 1:  # the model's own output, drafted by the student or by lookup
            gen, _ = speculative(self.model, self.draft_model, self.index, [encoded], opts, self.draft_tokens,
                                 on_token=stream.on_token, cancel=cancel, reuse=(self.prompt_cache, self.draft_cache))
        else:
            rows = n if temperature > 0 else 1
            gen = greedy(self.model, self.index, [encoded] * rows, opts, batch_size=rows, on_token=stream.on_token,
                         cancel=cancel, reuse=self.prompt_cache if rows == 1 else None)
        choices = [
            Choice(t, k, "stop" if s else "length") for t, k, s in zip(gen.texts, gen.token_counts, gen.stopped)
        ]
        for i, choice in enumerate(choices):
            stream.flush(i, choice.text)
        return Completion(choices, prompt_tokens or 0, stream.first_token_s, time.perf_counter() - t0, truncated,
                          self.prompt_cache.reused, cancel is not None and cancel.is_set())


def load_engine(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    verify: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    warm_up: bool = True,
    fim_format: str | None = None,
    fim_order: str = "auto",
    runtime: Any = None,
    draft: Any = None,
    draft_tokens: int | str = 4,
) -> Engine:
    """Load a model folder / ``bundled`` / hub id through :func:`kdcode.inference.loader.load_for_inference`
    (``device`` auto: CUDA when there is one; ``dtype`` auto: as its config names; ``runtime``: the backend, a
    :class:`kdcode.spec.RuntimeSpec` or its dict) and warm it up. ``fim_format`` names its FIM token family
    when detection would pick another. ``draft``: a student of this model drafting for it (a folder, hub id), or
    prompt lookup: the word ``"lookup"`` or a :class:`kdcode.inference.lookup.PromptLookup` (``max_n``); a folder
    named lookup is ``"./lookup"`` or ``Path("lookup")``. ``draft_tokens``: k, or ``"auto"`` (calibrated)."""
    lm = load_for_inference(name, device, dtype, threads, verify=verify, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code, runtime=runtime)
    helper = as_lookup(draft)  # prompt lookup: no model to load
    if draft is not None and helper is None:
        helper = load_for_inference(str(draft), device, dtype, threads, verify=verify)
    engine = Engine(lm, fim_format, helper, 4 if draft_tokens == "auto" else int(draft_tokens), fim_order)
    if helper is not None and draft_tokens == "auto":
        engine.calibrate_draft()
    if warm_up:
        engine.warm_up()
    return engine
