"""Line completion with a KV cache: batched greedy decoding and beam search.

Prompts are cut to their last ``context_tokens`` tokens and left-padded into a batch. Generation stops
at the end of the line: a newline in the decoded text (raw code) or the ``<EOL>`` / end-of-sequence
token (py150 format).

Token healing (raw code): a prompt that ends at a line start ends with a token like ``"\\n"`` that the
model rarely saw alone, because byte-level BPE merges newlines with the indentation that follows. So
the prompt's last token is removed and the first generated token is constrained to start with its
text; the healed prefix is then cut from the completion.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Generation:
    texts: list[str]
    token_counts: list[int]
    prefill_s: list[float] = field(default_factory=list)  # per batch
    step_s: list[float] = field(default_factory=list)  # per decode step (one token for every live row)
    stopped: list[bool] = field(default_factory=list)  # per text: ended at a stop (False: ran out of tokens)


def _forward_kwargs(model: Any) -> tuple[str, bool]:
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


_WHITESPACE = re.compile(r"\s")
_SLACK_TOKENS = 32


class Completer:
    """Complete lines of code with one model; reuses vocabulary tables across calls."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int = 48,
        context_tokens: int | None = None,
        heal: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.device = torch.device(device) if device else next(model.parameters()).device
        n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
        if max_new_tokens >= n_pos:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for context in {n_pos} positions")
        self.max_new_tokens = max_new_tokens
        self.context_tokens = min(context_tokens or n_pos - max_new_tokens, n_pos - max_new_tokens)
        self.heal = heal
        self.cache_kw, self.has_keep = _forward_kwargs(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eol = tokenizer.convert_tokens_to_ids("<EOL>")
        self.stop_ids = {i for i in (eol, tokenizer.eos_token_id) if i is not None and i != tokenizer.unk_token_id}
        self.special_ids = set(tokenizer.all_special_ids)
        self._texts: list[str] | None = None
        self._allowed: dict[str, torch.Tensor] = {}
        # Per-call settings (kdcode.complete sets them on a copy): the strings that end a completion, the
        # sampling temperature (0 = greedy) and its generator, a hook called with (row, token id) for every
        # generated token (streaming), and healing back over the prompt's trailing whitespace (editor prompts
        # end inside indentation), whose text may then take several tokens to produce.
        self.stop_strings: tuple[str, ...] = ("\n",)
        self.temperature = 0.0
        self.generator: torch.Generator | None = None
        self.on_token: Callable[[int, int], None] | None = None
        self.heal_space = False
        self._partial: dict[str, torch.Tensor] = {}

    # -- vocabulary tables ------------------------------------------------------------------------
    def token_texts(self) -> list[str]:
        if self._texts is None:
            self._texts = [self.tok.decode([i]) for i in range(len(self.tok))]
        return self._texts

    def allowed_after(self, prefix: str) -> torch.Tensor:
        """Vocabulary mask of tokens whose text starts with ``prefix`` (token healing)."""
        if prefix not in self._allowed:
            vocab = self.model.config.vocab_size
            mask = torch.zeros(vocab, dtype=torch.bool)
            for i, text in enumerate(self.token_texts()[:vocab]):
                if text.startswith(prefix) and i not in self.special_ids:
                    mask[i] = True
            self._allowed[prefix] = mask
        return self._allowed[prefix]

    def _heal_mask(self, gen_ids: list[int], prefix: str) -> torch.Tensor | None:
        """Tokens that may come next while the healed ``prefix`` is not produced yet (None once it is)."""
        done = self.tok.decode(gen_ids) if gen_ids else ""
        if len(done) >= len(prefix):
            return None
        rest = prefix[len(done) :]
        if not self.heal_space:
            return self.allowed_after(rest)
        if rest not in self._partial:
            mask = self.allowed_after(rest).clone()
            for i, text in enumerate(self.token_texts()[: mask.numel()]):
                if text and rest.startswith(text) and i not in self.special_ids:
                    mask[i] = True
            self._partial[rest] = mask
        return self._partial[rest]

    # -- prompts ----------------------------------------------------------------------------------
    def tail_ids(self, prompt: str) -> list[int]:
        """The prompt's last ``context_tokens + 1`` token ids (all of them for a shorter prompt), as tokenizing the
        whole prompt gives them; a long prompt is tokenized from a whitespace near its end, with slack tokens
        to spare, since a cut only changes the first token or two after it."""
        keep = self.context_tokens + 1
        window = 16 * (keep + _SLACK_TOKENS)
        while window < len(prompt):
            cut = _WHITESPACE.search(prompt, len(prompt) - window)
            if cut is None:
                break
            ids = self.tok(prompt[cut.start() :], add_special_tokens=False)["input_ids"]
            if len(ids) >= keep + _SLACK_TOKENS:
                return ids[-keep:]
            window *= 4
        return self.tok(prompt, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: str) -> tuple[list[int], str]:
        """Prompt ids cut to the context window, and the healed prefix ('' when not healed)."""
        body = prompt.rstrip()
        if self.heal and self.heal_space and body and len(body) < len(prompt):
            # Pre-tokenizers split trailing whitespace from the code after it ("\n    return" is "\n   " +
            # " return"), so the prompt stops before it and the model produces it, in as many tokens as it likes.
            return self.tail_ids(body)[-self.context_tokens :], prompt[len(body) :]
        ids = self.tail_ids(prompt)
        prefix = ""
        if self.heal and len(ids) > 1 and ids[-1] not in self.special_ids:
            prefix = self.tok.decode(ids[-1:])
            ids = ids[:-1]
        return ids[-self.context_tokens :], prefix

    def finish(self, gen_ids: list[int], prefix: str) -> str:
        text = self.tok.decode([i for i in gen_ids if i not in self.stop_ids], skip_special_tokens=False)
        text = text[len(prefix) :]
        return text[: min((i for s in self.stop_strings if (i := text.find(s)) >= 0), default=len(text))]

    def _ended(self, gen_ids: list[int], prefix: str) -> bool:
        if gen_ids and gen_ids[-1] in self.stop_ids:
            return True
        text = self.tok.decode(gen_ids)[len(prefix) :]
        return any(s in text for s in self.stop_strings)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0].to(logits.device)

    def _step(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": pos, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if self.has_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids, **kwargs)
        return out.logits[:, -1].float(), _out_cache(out)

    # -- greedy -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def greedy(
        self,
        prompts: list[str],
        batch_size: int = 8,
        fixed_length: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> Generation:
        """Greedy completions; ``fixed_length`` ignores stops (for speed measurements)."""
        result = Generation(texts=[], token_counts=[])
        for start in range(0, len(prompts), batch_size):
            chunk = [self.encode(p) for p in prompts[start : start + batch_size]]
            gens = self._greedy_batch(chunk, fixed_length, result)
            for (_, prefix), gen in zip(chunk, gens):
                result.texts.append(self.finish(gen, prefix))
                result.token_counts.append(len(gen))
                result.stopped.append(self._ended(gen, prefix))
            if on_batch:
                on_batch(len(chunk))
        return result

    def _greedy_batch(
        self, chunk: list[tuple[list[int], str]], fixed_length: bool, result: Generation
    ) -> list[list[int]]:
        n = len(chunk)
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            if ids:
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        t0 = time.perf_counter()
        logits, cache = self._step(input_ids, mask, pos, None)
        gens: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        last_pos = pos[:, -1:]
        healing = [bool(prefix) for _, prefix in chunk]
        for step in range(self.max_new_tokens):
            for row, (_, prefix) in enumerate(chunk):
                if healing[row] and not done[row] and (step == 0 or self.heal_space):
                    allowed = self._heal_mask(gens[row], prefix)
                    healing[row] = allowed is not None
                    if allowed is not None:
                        allowed = allowed.to(self.device)
                        logits[row, : allowed.numel()] = logits[row, : allowed.numel()].masked_fill(
                            ~allowed, float("-inf")
                        )
            next_ids = self._pick(logits)
            for row in range(n):
                if not done[row]:
                    gens[row].append(int(next_ids[row]))
                    if self.on_token:
                        self.on_token(row, gens[row][-1])
                    if not fixed_length and self._ended(gens[row], chunk[row][1]):
                        done[row] = True
            now = time.perf_counter()
            (result.prefill_s if step == 0 else result.step_s).append(now - t0)
            t0 = now
            if all(done) or step == self.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=self.device)], dim=1)
            last_pos = last_pos + 1
            logits, cache = self._step(next_ids[:, None], mask, last_pos, cache)
        return gens

    # -- beam search ------------------------------------------------------------------------------
    @torch.inference_mode()
    def beam(self, prompts: list[str], beams: int = 5, on_batch: Callable[[int], None] | None = None) -> Generation:
        """Beam search per prompt; finished hypotheses ranked by summed log-probability."""
        result = Generation(texts=[], token_counts=[])
        for prompt in prompts:
            ids, prefix = self.encode(prompt)
            best = self._beam_one(ids, prefix, beams)
            result.texts.append(self.finish(best, prefix))
            result.token_counts.append(len(best))
            if on_batch:
                on_batch(1)
        return result

    @torch.inference_mode()
    def beam_n(self, prompt: str, beams: int, n: int) -> list[tuple[str, int, bool]]:
        """The ``n`` best distinct completions of one prompt by beam search with ``max(beams, n)`` beams, as
        (text, generated tokens, ended at a stop), finished hypotheses first, best first."""
        ids, prefix = self.encode(prompt)
        out: list[tuple[str, int, bool]] = []
        for _, hyp, stopped in self._beam_hyps(ids, prefix, max(beams, n)):
            text = self.finish(hyp, prefix)
            if all(text != t for t, _, _ in out):
                out.append((text, len(hyp), stopped))
            if len(out) == n:
                break
        return out

    def _beam_one(self, ids: list[int], prefix: str, beams: int) -> list[int]:
        return self._beam_hyps(ids, prefix, beams)[0][1]

    def _beam_hyps(self, ids: list[int], prefix: str, beams: int) -> list[tuple[float, list[int], bool]]:
        """Every hypothesis kept, as (summed log-probability, ids, finished): finished ones first, best first."""
        x = torch.tensor([ids or [self.pad_id]], device=self.device)
        mask = torch.ones_like(x)
        pos = torch.arange(x.size(1), device=self.device)[None]
        logits, cache = self._step(x, mask, pos, None)
        hyps: list[list[int]] = [[]]
        scores = torch.zeros(1, device=self.device)
        finished: list[tuple[float, list[int]]] = []
        last_pos = pos[:, -1:]
        for step in range(self.max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            if prefix and (step == 0 or self.heal_space):
                for b, hyp in enumerate(hyps):
                    allowed = self._heal_mask(hyp, prefix)
                    if allowed is not None:
                        allowed = allowed.to(self.device)
                        logp[b, : allowed.numel()] = logp[b, : allowed.numel()].masked_fill(~allowed, float("-inf"))
            vocab = logp.size(-1)
            cand = (scores[:, None] + logp).view(-1)
            top = cand.topk(min(2 * beams, cand.numel()))
            new_hyps, new_scores, src = [], [], []
            for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                if score == float("-inf"):
                    break
                b, tok = divmod(flat, vocab)
                hyp = hyps[b] + [tok]
                if self._ended(hyp, prefix):
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
            hyps, scores = new_hyps, torch.tensor(new_scores, device=self.device)
            index = torch.tensor(src, device=self.device)
            if cache is not None:
                cache.reorder_cache(index) if step else cache.batch_repeat_interleave(len(src))
            last_pos = last_pos[:1].expand(len(src), 1) + 1
            mask = torch.ones((len(src), mask.size(1) + 1), dtype=mask.dtype, device=self.device)
            next_ids = torch.tensor([h[-1] for h in hyps], device=self.device)[:, None]
            logits, cache = self._step(next_ids, mask, last_pos, cache)
        ranked = [(s, h, True) for s, h in sorted(finished, key=lambda t: -t[0])]
        alive = sorted(zip(scores.tolist(), hyps), key=lambda t: -t[0])
        return ranked + [(float(s), h, False) for s, h in alive]
