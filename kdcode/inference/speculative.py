"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes ``k`` tokens, the
target scores them in one forward pass, and the longest prefix the target agrees with is kept, plus the
target's own next token. With greedy decoding the output is token for token the target's own greedy output;
with sampling, each draft token is accepted with probability ``min(1, p/q)`` and a rejected one is replaced by a
sample of ``norm(max(0, p - q))``, so the output follows the target's distribution.

Both KV caches are kept across passes and cut back (``DynamicCache.crop``) to the accepted prefix. Batch 1.
A server keeps both from one request to the next (:class:`PromptCache`, ``target_reuse`` / ``draft_reuse``), and
stops a request whose client left before its next pass (``cancel``), as greedy decoding does.
Token healing and stop strings work as in :mod:`kdcode.inference.decode` (the same masks at the same steps).

Acceptance, the most direct measure of how faithfully a student imitates its teacher: ``accepted / proposed``
draft tokens, and the mean tokens per target pass (accepted + the target's own one).

The draft may also be no model at all: prompt lookup (:mod:`kdcode.inference.lookup`, ``draft="lookup"``) copies
its proposal from the context, and the target verifies it by the same rule (a deterministic proposal is a one-hot
``q``); a pass where nothing in the context matches is a plain single-token target step. Only the target has a
cache then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kdcode.errors import KdcodeError
from kdcode.inference.decode import Cancel, DecodeOptions, Generation, Prompt, cancelled, encode_prompt, n_positions
from kdcode.inference.forward import Forward, PromptCache
from kdcode.inference.lookup import NgramIndex, PromptLookup, as_lookup
from kdcode.inference.vocab import VocabIndex
from kdcode.models.load import check_same_vocab


@dataclass
class Acceptance:
    """Draft tokens proposed and accepted, over target passes."""

    k: int
    passes: int = 0
    proposed: int = 0
    accepted: int = 0

    def add(self, other: Acceptance) -> None:
        self.passes += other.passes
        self.proposed += other.proposed
        self.accepted += other.accepted

    def summary(self) -> dict[str, Any]:
        return {
            "draft_tokens": self.k,
            "acceptance_rate": round(self.accepted / self.proposed, 4) if self.proposed else None,
            "accepted_per_pass": round(self.accepted / self.passes, 3) if self.passes else None,
            "tokens_per_pass": round((self.accepted + self.passes) / self.passes, 3) if self.passes else None,
            "target_passes": self.passes,
            "proposed": self.proposed,
            "accepted": self.accepted,
        }


@dataclass
class _Side:
    """One model's cached state: the cache holds every context token but the last (fed with the next pass)."""

    fwd: Forward
    cache: Any = None
    cached: int = 0  # tokens in the cache
    pending: list[int] = field(default_factory=list)  # tokens to feed before the next new ones

    def feed(self, tokens: list[int], keep: int) -> torch.Tensor:
        """Feed pending + ``tokens``; the logits at the last ``keep`` positions, (keep, vocab)."""
        ids = self.pending + tokens
        x = torch.tensor([ids], device=self.fwd.device)
        pos = torch.arange(self.cached, self.cached + len(ids), device=self.fwd.device)[None]
        mask = torch.ones((1, self.cached + len(ids)), dtype=torch.long, device=self.fwd.device)
        logits, self.cache = self.fwd(x, mask, pos, self.cache, keep=keep)
        self.cached += len(ids)
        self.pending = []
        return logits[0]

    def cut(self, remove: int) -> None:
        if remove > 0:
            self.cache.crop(-remove)
            self.cached -= remove


class _Masks:
    """The healing mask before each generated token, as greedy decoding applies it."""

    def __init__(self, index: VocabIndex, prompt: Prompt, opts: DecodeOptions) -> None:
        self.index, self.healed, self.space = index, prompt.healed, opts.heal_space

    def __call__(self, gen: list[int]) -> torch.Tensor | None:
        if not self.healed or (gen and not self.space):
            return None
        return self.index.heal_mask(gen, self.healed, self.space)

    def apply(self, logits: torch.Tensor, gen: list[int]) -> torch.Tensor:
        allowed = self(gen)
        if allowed is None:
            return logits
        out = logits.clone()
        out[: allowed.numel()] = out[: allowed.numel()].masked_fill(~allowed.to(out.device), float("-inf"))
        return out


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """A token (argmax, or a sample at ``temperature``) and the distribution it came from."""
    if temperature <= 0:
        return int(logits.argmax()), logits
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator)), probs


class _ModelDraft:
    """A draft model: ``kk`` tokens picked one pass at a time from its own cache (masked as the target's are)."""

    def __init__(self, side: _Side) -> None:
        self.side = side

    def propose(self, last: int, kk: int, gen: list[int], masks: _Masks, temp: float,
                generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor | None]]:
        d, proposals, q_dists = self.side, [], []
        if kk:
            logits = d.feed([last], keep=1)[-1]
            for i in range(kk):
                tok, q = _pick(masks.apply(logits, gen + proposals), temp, generator)
                proposals.append(tok)
                q_dists.append(q)
                if i < kk - 1:
                    logits = d.feed([tok], keep=1)[-1]
        return proposals, q_dists

    def settle(self, last: int, proposals: list[int], accepted: int, produced: list[int]) -> None:
        """Roll back to what the target kept: the draft keeps what it has of the accepted proposals."""
        d, kk = self.side, len(proposals)
        if not kk:  # the draft was not run this pass: it still owes the last context token
            d.pending = d.pending + [last]
        elif accepted == kk:
            d.pending = [proposals[-1]]  # the last proposal was never fed to the draft
        else:
            d.cut(kk - 1 - accepted)


class _LookupDraft:
    """Prompt lookup (:mod:`kdcode.inference.lookup`): proposals copied from the context, no model, no cache; each is
    deterministic (``q`` one-hot: None)."""

    def __init__(self, ids: list[int], lookup: PromptLookup) -> None:
        self.context = NgramIndex(ids, lookup.max_n)

    def propose(self, last: int, kk: int, gen: list[int], masks: _Masks, temp: float,
                generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor | None]]:
        proposals = self.context.propose(kk)
        return proposals, [None] * len(proposals)

    def settle(self, last: int, proposals: list[int], accepted: int, produced: list[int]) -> None:
        self.context.extend(produced)


def _judge(p_logits: torch.Tensor, tok: int, q: torch.Tensor | None, temp: float,
           generator: torch.Generator | None) -> tuple[bool, list[int]]:
    """Whether the target keeps the proposed ``tok``, and, when a sampled proposal is rejected, the token that
    replaces it. Greedy: kept when it is the target's argmax. Sampling: kept with probability ``min(1, p/q)``, else
    replaced by a sample of ``norm(max(0, p - q))``; ``q`` is the draft's distribution, None for a deterministic
    proposal (prompt lookup): one-hot at ``tok``, so it is kept with probability ``p(tok)``."""
    if temp <= 0:
        return int(p_logits.argmax()) == tok, []
    p = torch.softmax(p_logits.float() / temp, dim=-1).cpu()
    if q is None:
        q = torch.zeros_like(p)
        q[tok] = 1.0
    if torch.rand((), generator=generator) < torch.clamp(p[tok] / q[tok], max=1.0):
        return True, []
    residual = torch.clamp(p - q, min=0)
    total = residual.sum()
    fix = residual / total if total > 0 else p
    return False, [int(torch.multinomial(fix, 1, generator=generator))]


@torch.inference_mode()
def speculative_one(
    target: Any,
    draft: Any,
    index: VocabIndex,
    prompt: Prompt,
    opts: DecodeOptions,
    k: int,
    generator: torch.Generator | None = None,
    on_token: Any = None,
    cancel: Cancel | None = None,
    target_reuse: PromptCache | None = None,
    draft_reuse: PromptCache | None = None,
) -> tuple[list[int], Acceptance, list[float]]:
    """Decode one prompt: (generated ids, acceptance, seconds per target pass); ``on_token(0, id)`` sees every
    token as it is produced (several per pass). No pass starts once ``cancel`` is set. ``target_reuse`` and
    ``draft_reuse`` start each model from the cache it kept, cut back to what this prompt shares with it, and keep
    the grown caches for the next call. ``draft``: a draft model, or prompt lookup (``"lookup"`` or a
    :class:`PromptLookup`: no draft model, so ``draft_reuse`` is not used)."""
    lookup = as_lookup(draft)
    t = _Side(Forward.of(target, index))
    d = None if lookup is not None else _Side(Forward.of(draft, index))
    masks = _Masks(index, prompt, opts)
    ids = list(prompt.ids) or [index.pad_id]
    gen: list[int] = []
    stats, times = Acceptance(k), []
    if cancelled(cancel):
        return gen, stats, times
    sides = [(t, target_reuse)] + ([(d, draft_reuse)] if d is not None else [])
    reuse = [(side, kept) for side, kept in sides
             if kept is not None and side.fwd.step is None]  # another backend's cache: cold
    for side, kept in reuse:
        side.cache, side.cached = kept.take(ids, len(ids) - 1)
    for side, _ in sides:
        if side.cached < len(ids) - 1:  # every cache holds all but the last context token
            side.feed(ids[side.cached : -1], keep=1)
    drafter = _LookupDraft(ids, lookup) if lookup is not None else _ModelDraft(d)  # type: ignore[arg-type]
    _decode_passes(t, drafter, index, prompt, opts, k, generator, on_token, cancel, masks, ids[-1], gen, stats, times)
    for side, kept in reuse:
        kept.keep(side.cache, ids + gen)
    return gen, stats, times


def _decode_passes(
    t: _Side, drafter: _ModelDraft | _LookupDraft, index: VocabIndex, prompt: Prompt, opts: DecodeOptions, k: int,
    generator: torch.Generator | None, on_token: Any, cancel: Cancel | None, masks: _Masks, last: int,
    gen: list[int], stats: Acceptance, times: list[float],
) -> None:
    """Target passes until the completion ends or ``cancel`` is set: ``gen``, ``stats`` and ``times`` grow."""
    temp = opts.temperature
    while len(gen) < opts.max_new_tokens and not cancelled(cancel):
        t0 = time.perf_counter()
        kk = min(k, opts.max_new_tokens - len(gen) - 1)
        proposals, q_dists = drafter.propose(last, kk, gen, masks, temp, generator)
        n = len(proposals)  # kk from a draft model; up to kk (none when nothing matches) from prompt lookup
        scores = t.feed([last, *proposals], keep=n + 1)  # row i predicts the token after proposals[:i]
        accepted, new = 0, []
        for i, tok in enumerate(proposals):
            kept, new = _judge(masks.apply(scores[i], gen + proposals[:i]), tok, q_dists[i], temp, generator)
            if not kept:
                break
            accepted += 1
        if not new:  # every proposal up to the first disagreement was kept: the target's own next token
            new = [_pick(masks.apply(scores[accepted], gen + proposals[:accepted]), temp, generator)[0]]
        stats.passes += 1
        stats.proposed += n
        stats.accepted += accepted
        produced = proposals[:accepted] + new
        t.cut(n - accepted)  # the target keeps context + accepted proposals
        drafter.settle(last, proposals, accepted, produced)
        for tok in produced:
            gen.append(tok)
            if on_token is not None:
                on_token(0, tok)
            if len(gen) >= opts.max_new_tokens or (
                not opts.fixed_length and index.ended(gen, prompt.healed, opts.stop_strings)
            ):
                times.append(time.perf_counter() - t0)
                return
        last = produced[-1]
        times.append(time.perf_counter() - t0)


def check_pair(target_tok: Any, draft_tok: Any, target: str, draft: str) -> None:
    """A draft must share the target's tokenizer: one clear line when it does not."""
    check_same_vocab(target_tok, draft_tok, f"the draft {draft}", f"the target {target}",
                     "speculative decoding needs one vocabulary: draft with a student of this teacher")


def speculative(
    target: Any,
    draft: Any,
    index: VocabIndex,
    prompts: list[str | Prompt],
    opts: DecodeOptions,
    k: int = 4,
    on_token: Any = None,
    cancel: Cancel | None = None,
    reuse: tuple[PromptCache, PromptCache] | None = None,
) -> tuple[Generation, Acceptance]:
    """Speculative decoding of every prompt (batch 1); the result is shaped as greedy decoding's (``prefill_s``:
    each prompt's first pass; ``step_s``: every later pass, each making one or more tokens). ``draft``: a draft
    model, or prompt lookup (``"lookup"``, :class:`PromptLookup`); ``cancel`` and ``reuse`` (the target's and the
    draft's kept caches) as in :func:`speculative_one`."""
    if k < 1:
        raise KdcodeError(f"--draft-tokens must be at least 1, not {k}")
    positions = n_positions(target) if as_lookup(draft) else min(n_positions(target), n_positions(draft))
    context = opts.context_for(positions)
    generator = None
    if opts.temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(opts.seed) if opts.seed is not None else generator.seed()
    texts, token_ids, stopped, prefill_s, step_s = [], [], [], [], []
    total = Acceptance(k)
    for p in prompts:
        prompt = p if isinstance(p, Prompt) else encode_prompt(index, p, opts, context)
        row_token = None if on_token is None else (lambda _row, tok, i=len(texts): on_token(i, tok))
        gen, stats, times = speculative_one(target, draft, index, prompt, opts, k, generator, row_token, cancel,
                                            *(reuse or (None, None)))
        total.add(stats)
        texts.append(index.completion_text(gen, prompt.healed, opts.stop_strings))
        token_ids.append(gen)
        stopped.append(index.ended(gen, prompt.healed, opts.stop_strings))
        prefill_s.extend(times[:1])
        step_s.extend(times[1:])
    return Generation(texts, token_ids, stopped, prefill_s, step_s), total


def auto_k(target: Any, draft: Any, index: Any, prompts: list[str], opts: Any, choices=(1, 2, 3, 4, 6, 8)) -> int:
    """``--draft-tokens auto``: the k with the most target tokens per second on a few calibration prompts."""
    best, best_rate = choices[0], 0.0
    for k in choices:
        t0 = time.perf_counter()
        gen, _ = speculative(target, draft, index, prompts, opts, k=k)
        rate = sum(gen.token_counts) / (time.perf_counter() - t0)
        if rate > best_rate:
            best, best_rate = k, rate
    return best
