"""Line completion with a KV cache, as functions: batched greedy decoding, sampling and beam search.

Every call takes a frozen :class:`DecodeOptions` and returns a named result (:class:`Generation`); the
tables that depend only on the tokenizer (token texts, special and stop ids, healing masks) live in a
:class:`VocabIndex` built once per tokenizer and shared by every call.

Prompts are cut to their last ``context_tokens`` tokens and left-padded into a batch. Generation stops
at the end of the line: a newline in the decoded text (raw code) or the ``<EOL>`` / end-of-sequence
token (py150 format); ``stop_strings`` replaces the newline.

Token healing (raw code): a prompt that ends at a line start ends with a token like ``"\\n"`` that the
model rarely saw alone, because byte-level BPE merges newlines with the indentation that follows. So
the prompt's last token is removed and the first generated token is constrained to start with its
text; the healed prefix is then cut from the completion. ``heal_space`` heals back over a prompt's
trailing whitespace instead (editor prompts end inside indentation), whose text may then take several
tokens to produce.

The model is only ever called through :class:`Forward` (new tokens in, last logits and the grown cache
out), so that a draft model's proposals can later be scored in one pass and the cache cut back.

Stopping from outside: the decoding functions an engine calls take ``cancel``, an event any thread may set (a
server sets it when the client leaves); each loop looks at it before every model pass and ends there, returning
what it has. Greedy decoding of one prompt also takes ``reuse``, a :class:`PromptCache` that starts it from the
previous call's cache.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdcode.inference.forward import (  # noqa: F401 - _forward_kwargs, _out_cache: kept importable here
    Forward,
    PromptCache,
    _forward_kwargs,
    _grow,
    _left_pad,
    _out_cache,
    _select_rows,
)
from kdcode.inference.vocab import VocabIndex
from kdcode.models.load import context_length

OnToken = Callable[[int, int], None]  # (prompt index, generated token id), for every generated token
OnBatch = Callable[[int], None]  # (prompts finished), after every batch
Cancel = threading.Event  # set from any thread: decoding stops before its next model pass

_WHITESPACE = re.compile(r"\s")
_SLACK_TOKENS = 32


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. Nothing mutates it: one object serves every call that decodes the same way."""

    max_new_tokens: int = 48
    # prompt tokens the model sees (None: min(its positions, DEFAULT_WINDOW) - max_new_tokens)
    context_tokens: int | None = None
    heal: bool = True  # token healing of the prompt's last token
    heal_space: bool = False  # heal back over trailing whitespace (editor prompts), several tokens if need be
    stop_strings: tuple[str, ...] = ("\n",)  # the completion ends before the first of them
    temperature: float = 0.0  # 0: greedy; > 0: sampling (greedy() only)
    seed: int | None = None  # of the sampling (None: fresh entropy, a different sample each call)
    fixed_length: bool = False  # no early stop: every completion is max_new_tokens long (speed measurements)
    # (the texts are still cut at the first stop string)

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, str):
            raise TypeError("stop_strings is a tuple of strings, not one string")
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ValueError(f"context_tokens must be at least 1 (or None), not {self.context_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("a stop string cannot be empty")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), not {self.temperature}")

    def context_for(self, n_positions: int) -> int:
        """Prompt tokens kept for a model with ``n_positions`` positions: ``context_tokens`` when given, else what
        the new tokens leave of min(positions, DEFAULT_WINDOW) (CodeGPT's 1,024 - 100 = 924 as CodeXGLUE; a model
        of 8k positions is not given 8k-token prompts unless asked), never more than the positions leave."""
        room = n_positions - self.max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for context in {n_positions} positions"
            )
        default = min(n_positions, DEFAULT_WINDOW) - self.max_new_tokens
        return min(self.context_tokens or max(default, 1), room)


def n_positions(model: Any) -> int:
    """The positions a model attends over (1024 when its config does not say)."""
    return context_length(model.config, 1024)  # type: ignore[return-value]


DEFAULT_WINDOW = 1024  # prompt + new tokens when no context length is asked for


@dataclass(frozen=True)
class Prompt:
    """A prompt as the model sees it: its last tokens, and the text healed off its end ('' when not healed),
    which the completion must produce first and which is then cut from it."""

    ids: tuple[int, ...]
    healed: str = ""


def _tail_ids(index: VocabIndex, text: str, keep: int) -> list[int]:
    """The text's last ``keep`` token ids (all of them for a shorter text), as tokenizing the whole text gives
    them; a long text is tokenized from a whitespace near its end, with slack tokens to spare, since a cut
    only changes the first token or two after it."""
    tok = index.tokenizer
    window = 16 * (keep + _SLACK_TOKENS)
    while window < len(text):
        cut = _WHITESPACE.search(text, len(text) - window)
        if cut is None:
            break
        ids = tok(text[cut.start() :], add_special_tokens=False)["input_ids"]
        if len(ids) >= keep + _SLACK_TOKENS:
            return ids[-keep:]
        window *= 4
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_prompt(index: VocabIndex, text: str, opts: DecodeOptions, context: int) -> Prompt:
    """``text`` cut to its last ``context`` tokens (see :meth:`DecodeOptions.context_for`), healed as
    ``opts`` says."""
    body = text.rstrip()
    if opts.heal and opts.heal_space and body and len(body) < len(text):
        # Pre-tokenizers split trailing whitespace from the code after it ("\n    return" is "\n   " +
        # " return"), so the prompt stops before it and the model produces it, in as many tokens as it likes.
        return Prompt(tuple(_tail_ids(index, body, context + 1)[-context:]), text[len(body) :])
    ids = _tail_ids(index, text, context + 1)
    healed = ""
    if opts.heal and len(ids) > 1 and ids[-1] not in index.special_ids:
        healed = index.decode(ids[-1:])
        ids = ids[:-1]
    return Prompt(tuple(ids[-context:]), healed)


def _as_prompt(index: VocabIndex, prompt: str | Prompt, opts: DecodeOptions, context: int) -> Prompt:
    if isinstance(prompt, Prompt):
        return prompt if len(prompt.ids) <= context else Prompt(prompt.ids[-context:], prompt.healed)
    return encode_prompt(index, prompt, opts, context)


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Generation:
    """Completions, one per prompt (or per alternative), in order."""

    texts: list[str]
    token_ids: list[list[int]]  # generated ids: the healed text and the stop included
    stopped: list[bool]  # ended at a stop (False: ran out of tokens)
    prefill_s: list[float]  # per batch (greedy only)
    step_s: list[float]  # per decode step, one token for every live row (greedy only)

    @property
    def token_counts(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]


@dataclass(frozen=True)
class Hypothesis:
    """One beam: its generated ids, summed log-probability, and whether it ended at a stop."""

    token_ids: tuple[int, ...]
    logprob: float
    finished: bool


def cancelled(cancel: Cancel | None) -> bool:
    return cancel is not None and cancel.is_set()


def _restrict(scores: torch.Tensor, row: int, allowed: torch.Tensor) -> None:
    allowed = allowed.to(scores.device)
    scores[row, : allowed.numel()] = scores[row, : allowed.numel()].masked_fill(~allowed, float("-inf"))


def _picker(opts: DecodeOptions) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next ids from last logits: argmax, or a sample at ``opts.temperature`` from a generator of its own."""
    if opts.temperature <= 0:
        return lambda logits: logits.argmax(-1)
    generator = torch.Generator()
    if opts.seed is None:
        generator.seed()
    else:
        generator.manual_seed(opts.seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / opts.temperature, dim=-1).cpu()
        bad = ~torch.isfinite(probs).all(-1)
        if bad.any():  # a temperature so small that logits / T overflow: sample from its limit, the argmax
            top = logits[bad].argmax(-1).cpu()
            probs[bad] = torch.nn.functional.one_hot(top, probs.size(-1)).to(probs.dtype)
        return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)

    return sample


# ---------------------------------------------------------------------------------------------- greedy
@torch.inference_mode()
def greedy(
    model: Any,
    index: VocabIndex,
    prompts: Sequence[str | Prompt],
    opts: DecodeOptions,
    batch_size: int = 8,
    on_token: OnToken | None = None,
    on_batch: OnBatch | None = None,
    cancel: Cancel | None = None,
    reuse: PromptCache | None = None,
) -> Generation:
    """Greedy completions (samples when ``opts.temperature`` > 0), ``batch_size`` prompts at a time,
    left-padded, with a KV cache. ``on_token(i, id)`` sees every token generated for prompt ``i``;
    ``on_batch(k)`` is called after each batch of ``k`` prompts. Once ``cancel`` is set no model pass starts:
    the completions end where they are (prompts not begun get none). ``reuse`` (batch 1, torch models) starts
    each prompt from the cache the previous one left, cut back to the tokens they share."""
    fwd = Forward.of(model, index)
    context = opts.context_for(n_positions(model))
    pick = _picker(opts)
    texts: list[str] = []
    token_ids: list[list[int]] = []
    stopped: list[bool] = []
    prefill_s: list[float] = []
    step_s: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [_as_prompt(index, p, opts, context) for p in prompts[start : start + batch_size]]
        row_token = None if on_token is None else (lambda row, tok, start=start: on_token(start + row, tok))
        gens = _greedy_batch(fwd, index, chunk, opts, pick, row_token, prefill_s, step_s, cancel, reuse)
        for prompt, gen in zip(chunk, gens):
            texts.append(index.completion_text(gen, prompt.healed, opts.stop_strings))
            token_ids.append(gen)
            stopped.append(index.ended(gen, prompt.healed, opts.stop_strings))
        if on_batch:
            on_batch(len(chunk))
    return Generation(texts, token_ids, stopped, prefill_s, step_s)


def _greedy_batch(
    fwd: Forward,
    index: VocabIndex,
    chunk: list[Prompt],
    opts: DecodeOptions,
    pick: Callable[[torch.Tensor], torch.Tensor],
    on_token: OnToken | None,
    prefill_s: list[float],
    step_s: list[float],
    cancel: Cancel | None = None,
    reuse: PromptCache | None = None,
) -> list[list[int]]:
    n = len(chunk)
    gens: list[list[int]] = [[] for _ in range(n)]
    if cancelled(cancel):
        return gens
    if n > 1 or fwd.step is not None:  # a batch, or another backend's cache: cold
        reuse = None
    cache, reused = reuse.take(chunk[0].ids, len(chunk[0].ids) - 1) if reuse is not None else (None, 0)
    input_ids, mask = _left_pad([p.ids for p in chunk], index.pad_id, fwd.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    logits, cache = fwd.last(input_ids[:, reused:], mask, pos[:, reused:], cache)
    done = [False] * n
    last_pos = pos[:, -1:]
    healing = [bool(p.healed) for p in chunk]
    for step in range(opts.max_new_tokens):
        for row, prompt in enumerate(chunk):
            if healing[row] and not done[row] and (step == 0 or opts.heal_space):
                allowed = index.heal_mask(gens[row], prompt.healed, opts.heal_space)
                healing[row] = allowed is not None
                if allowed is not None:
                    _restrict(logits, row, allowed)
        next_ids = pick(logits)
        for row in range(n):
            if not done[row]:
                gens[row].append(int(next_ids[row]))
                if on_token:
                    on_token(row, gens[row][-1])
                if not opts.fixed_length and index.ended(gens[row], chunk[row].healed, opts.stop_strings):
                    done[row] = True
        now = time.perf_counter()
        (prefill_s if step == 0 else step_s).append(now - t0)
        t0 = now
        if all(done) or step == opts.max_new_tokens - 1 or cancelled(cancel):
            break
        mask = _grow(mask)
        last_pos = last_pos + 1
        logits, cache = fwd.last(next_ids[:, None], mask, last_pos, cache)
    if reuse is not None:
        reuse.keep(cache, chunk[0].ids + tuple(gens[0]))
    return gens


# ---------------------------------------------------------------------------------------------- beam search
@torch.inference_mode()
def beam_hypotheses(
    model: Any, index: VocabIndex, prompt: str | Prompt, opts: DecodeOptions, beams: int
) -> list[Hypothesis]:
    """Beam search over one prompt; every hypothesis kept, finished ones first, best (summed log-probability)
    first. ``opts.temperature`` does not apply; with ``opts.fixed_length`` no hypothesis ends early."""
    fwd = Forward.of(model, index)
    return _beam(fwd, index, _as_prompt(index, prompt, opts, opts.context_for(n_positions(model))), opts, beams)


@torch.inference_mode()
def beam_search(
    model: Any,
    index: VocabIndex,
    prompts: Sequence[str | Prompt],
    opts: DecodeOptions,
    beams: int = 5,
    on_batch: OnBatch | None = None,
) -> Generation:
    """The best hypothesis of a beam search per prompt (``on_batch(1)`` after each)."""
    fwd = Forward.of(model, index)
    context = opts.context_for(n_positions(model))
    texts: list[str] = []
    token_ids: list[list[int]] = []
    stopped: list[bool] = []
    for p in prompts:
        prompt = _as_prompt(index, p, opts, context)
        best = _beam(fwd, index, prompt, opts, beams)[0]
        texts.append(index.completion_text(best.token_ids, prompt.healed, opts.stop_strings))
        token_ids.append(list(best.token_ids))
        stopped.append(index.ended(best.token_ids, prompt.healed, opts.stop_strings))  # as greedy's
        if on_batch:
            on_batch(1)
    return Generation(texts, token_ids, stopped, [], [])


@torch.inference_mode()
def beam_alternatives(
    model: Any, index: VocabIndex, prompt: str | Prompt, opts: DecodeOptions, beams: int, n: int,
    cancel: Cancel | None = None,
) -> Generation:
    """The ``n`` best distinct completions of one prompt by beam search with ``max(beams, n)`` beams, finished
    hypotheses first, best first (fewer when the beams agree); none started after ``cancel`` is set."""
    fwd = Forward.of(model, index)
    encoded = _as_prompt(index, prompt, opts, opts.context_for(n_positions(model)))
    texts: list[str] = []
    token_ids: list[list[int]] = []
    stopped: list[bool] = []
    for hyp in _beam(fwd, index, encoded, opts, max(beams, n), cancel):
        text = index.completion_text(hyp.token_ids, encoded.healed, opts.stop_strings)
        if text not in texts:
            texts.append(text)
            token_ids.append(list(hyp.token_ids))
            stopped.append(index.ended(hyp.token_ids, encoded.healed, opts.stop_strings))
        if len(texts) == n:
            break
    return Generation(texts, token_ids, stopped, [], [])


def _beam(
    fwd: Forward, index: VocabIndex, prompt: Prompt, opts: DecodeOptions, beams: int, cancel: Cancel | None = None
) -> list[Hypothesis]:
    if cancelled(cancel):
        return []
    x = torch.tensor([list(prompt.ids) or [index.pad_id]], device=fwd.device)
    mask = torch.ones_like(x)
    pos = torch.arange(x.size(1), device=fwd.device)[None]
    logits, cache = fwd.last(x, mask, pos, None)
    hyps: list[list[int]] = [[]]
    scores = torch.zeros(1, device=fwd.device)
    finished: list[tuple[float, list[int]]] = []
    last_pos = pos[:, -1:]
    healed, stops = prompt.healed, opts.stop_strings
    for step in range(opts.max_new_tokens):
        logp = torch.log_softmax(logits, dim=-1)
        if healed and (step == 0 or opts.heal_space):
            for b, hyp in enumerate(hyps):
                allowed = index.heal_mask(hyp, healed, opts.heal_space)
                if allowed is not None:
                    _restrict(logp, b, allowed)
        vocab = logp.size(-1)
        cand = (scores[:, None] + logp).view(-1)
        top = cand.topk(min(2 * beams, cand.numel()))
        new_hyps, new_scores, src = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            if score == float("-inf"):
                break
            b, tok = divmod(flat, vocab)
            hyp = hyps[b] + [tok]
            if not opts.fixed_length and index.ended(hyp, healed, stops):
                finished.append((score, hyp))
            else:
                new_hyps.append(hyp)
                new_scores.append(score)
                src.append(b)
            if len(new_hyps) == beams:
                break
        # Stop once `beams` hypotheses are finished and none alive can beat the best of them:
        # scores only fall as tokens are added.
        if not new_hyps or (len(finished) >= beams and max(new_scores) <= max(s for s, _ in finished)):
            if finished:  # the live ones are prefixes of hypotheses already scored: no alternatives
                hyps = []
            break
        hyps, scores = new_hyps, torch.tensor(new_scores, device=fwd.device)
        if cancelled(cancel):
            break
        _select_rows(cache, torch.tensor(src, device=fwd.device), first=step == 0)
        last_pos = last_pos[:1].expand(len(src), 1) + 1
        mask = _grow(mask, rows=len(src))
        next_ids = torch.tensor([h[-1] for h in hyps], device=fwd.device)[:, None]
        logits, cache = fwd.last(next_ids, mask, last_pos, cache)
    ranked = [Hypothesis(tuple(h), s, True) for s, h in sorted(finished, key=lambda t: -t[0])]
    alive = sorted(zip(scores.tolist(), hyps), key=lambda t: -t[0])
    return ranked + [Hypothesis(tuple(h), float(s), False) for s, h in alive]
