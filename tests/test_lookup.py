"""Drafting by prompt lookup (no draft model): proposals are the tokens that followed the most recent earlier
occurrence of the context's final 3-, 2- or 1-gram; the target verifies them as it verifies a draft model's, so greedy
output is token for token the target's own (with token healing, editor prompts and stop strings) and sampling keeps
the target's distribution (a deterministic proposal is a one-hot q). Tiny random models; passes and tokens fed are
counted, never timed."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import make_gpt2
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcode.data.corpus import load_corpus
from kdcode.errors import KdcodeError
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.inference.decode import DecodeOptions, Prompt, VocabIndex, greedy
from kdcode.inference.forward import PromptCache
from kdcode.inference.lookup import NgramIndex, PromptLookup, as_lookup, lookup_proposal
from kdcode.inference.speculative import Acceptance, _judge, speculative, speculative_one
from kdcode.spec import DataSpec


def brute_force(context: list[int], k: int, max_n: int = 3) -> list[int]:
    """The definition, searched from the end: the longest n first, then the most recent occurrence."""
    for n in range(max_n, 0, -1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                return context[start + n : start + n + k]
    return []


# ---------------------------------------------------------------------------------------------- proposals
def test_the_longest_ngram_wins_then_the_most_recent_occurrence():
    ctx = [1, 2, 3, 9, 2, 3, 8, 3, 5, 2, 3]
    assert lookup_proposal(ctx, 2) == [8, 3]  # (5, 2, 3) never before; (2, 3) last at 4-5
    assert lookup_proposal(ctx, 2, max_n=1) == [5, 2]  # 3 last at 7
    assert lookup_proposal(ctx, 50) == [8, 3, 5, 2, 3]  # up to k: as many as follow it
    assert lookup_proposal([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], 3) == [4, 9, 2]  # (1, 2, 3) beats a later (2, 3)
    assert lookup_proposal([4, 5, 6], 4) == [] and lookup_proposal([], 4) == [] and lookup_proposal([4], 4) == []
    assert lookup_proposal([5, 5], 4) == [5]  # the occurrence may end where the final n-gram starts
    assert lookup_proposal([1, 2, 1], 0) == []


@settings(max_examples=100, deadline=None, database=None)
@given(ids=st.lists(st.integers(0, 4), max_size=40), cut=st.integers(0, 40), k=st.integers(1, 6),
       max_n=st.integers(1, 4))
def test_the_growing_index_proposes_what_a_search_of_the_whole_context_finds(ids, cut, k, max_n):
    index = NgramIndex(ids[:cut], max_n)
    assert index.propose(k) == brute_force(ids[:cut], k, max_n)
    for i in range(cut, len(ids)):  # grown a token at a time, as passes append what they produced
        index.extend(ids[i : i + 1])
        assert index.propose(k) == brute_force(ids[: i + 1], k, max_n)


def test_max_n_is_a_keyword_and_the_word_lookup_is_reserved(tmp_path):
    from pathlib import Path

    assert as_lookup("lookup") == PromptLookup() and as_lookup(PromptLookup(max_n=2)).max_n == 2
    assert as_lookup("./lookup") is None and as_lookup(Path("lookup")) is None and as_lookup(None) is None
    for bad in (0, -1):
        with pytest.raises(KdcodeError, match="at least 1 token"):
            PromptLookup(max_n=bad)
        with pytest.raises(KdcodeError, match="at least 1 token"):
            NgramIndex([1, 2], max_n=bad)


# ---------------------------------------------------------------------------------------------- greedy
@pytest.fixture(scope="module")
def prompts(corpus_dir) -> list[str]:
    docs = load_corpus(DataSpec(source=str(corpus_dir))).splits["test"]
    return [s.input for s in build_line_samples(docs, 30, seed=3)]


@pytest.fixture(scope="module")
def target(tokenizer):
    return make_gpt2(tokenizer, n_layer=4, seed=0)


def _greedy_ids(target, index, prompts, opts):
    return greedy(target, index, prompts, opts, batch_size=1).token_ids


@pytest.mark.slow
@pytest.mark.parametrize(("k", "max_n"), [(1, 3), (4, 3), (8, 3), (4, 1)])
def test_greedy_lookup_is_the_targets_own_greedy_output(target, tokenizer, prompts, k, max_n):
    """Healed prompts (the default), stopping at the end of the line."""
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=16)
    gen, acc = speculative(target, PromptLookup(max_n=max_n), index, prompts, opts, k=k)
    assert gen.token_ids == _greedy_ids(target, index, prompts, opts)
    s = acc.summary()
    assert s["draft_tokens"] == k and acc.accepted > 0 and s["tokens_per_pass"] > 1
    assert acc.accepted <= acc.proposed <= k * acc.passes
    assert sum(gen.token_counts) <= acc.passes + acc.accepted  # each pass: its accepted tokens and one of its own


@pytest.mark.slow
def test_fixed_length_lookup_counts_every_pass(target, tokenizer, prompts):
    """No early stop: every token is an accepted proposal or a pass's own, so tokens = passes + accepted exactly."""
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=24, fixed_length=True)
    gen, acc = speculative(target, "lookup", index, prompts[:12], opts, k=5)
    assert gen.token_ids == _greedy_ids(target, index, prompts[:12], opts)
    assert sum(gen.token_counts) == acc.passes + acc.accepted == 12 * 24


@pytest.mark.slow
@pytest.mark.parametrize("stops", [("\n",), ("\n", "(", "="), ("self",)])
def test_editor_prompts_heal_and_stop_as_the_target_does(target, tokenizer, prompts, stops):
    """Cursors inside indentation (healed back over the whitespace, several tokens), other stop strings."""
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=12, heal_space=True, stop_strings=stops)
    edited = [p + "    " for p in prompts[:15]] + [p.rstrip(" ") + " " for p in prompts[15:]]
    gen, _ = speculative(target, "lookup", index, edited, opts, k=4)
    want = greedy(target, index, edited, opts, batch_size=1)
    assert gen.token_ids == want.token_ids and gen.texts == want.texts and gen.stopped == want.stopped


class Fed:
    """The number of tokens of each forward pass of a model."""

    def __init__(self, model) -> None:
        self.tokens: list[int] = []
        self.handle = model.register_forward_pre_hook(lambda _m, args: self.tokens.append(int(args[0].shape[1])))


def test_each_pass_feeds_the_target_its_last_token_and_exactly_the_lookup_proposal(target, tokenizer):
    """No match: a plain one-token target step; a match: the last token and the proposal, in one pass."""
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=20, heal=False, fixed_length=True)
    fed = Fed(target)
    try:
        for ids in ([5, 6, 7, 8], [5, 6, 7, 5], [9, 10, 11, 9, 10, 12, 9, 10]):
            fed.tokens.clear()
            gen, acc, _ = speculative_one(target, "lookup", index, Prompt(tuple(ids)), opts, k=3)
            assert fed.tokens[0] == len(ids) - 1  # the prompt but its last token, once
            assert len(fed.tokens) - 1 == acc.passes
            done = 0  # replayed: each pass proposes what lookup finds in the context it has
            for n_fed in fed.tokens[1:]:
                proposal = lookup_proposal(ids + gen[:done], min(3, opts.max_new_tokens - done - 1))
                assert n_fed == 1 + len(proposal)
                kept = 0
                while kept < len(proposal) and proposal[kept] == gen[done + kept]:
                    kept += 1
                done += kept + 1
            assert done == len(gen) == opts.max_new_tokens
            assert gen == greedy(target, index, [Prompt(tuple(ids))], opts, batch_size=1).token_ids[0]
        assert fed.tokens  # the hook saw the passes
    finally:
        fed.handle.remove()
    first = speculative_one(target, "lookup", index, Prompt((5, 6, 7, 8)), DecodeOptions(max_new_tokens=1), k=3)
    assert first[1].proposed == 0 and first[1].passes == 1  # one token wanted: nothing to propose


# ---------------------------------------------------------------------------------------------- sampling
def test_a_one_hot_proposal_is_kept_with_probability_p_and_replaced_from_the_rest():
    """The acceptance rule with q one-hot at x: P(kept) = p(x); a replacement is never x and follows p elsewhere;
    together the emitted token follows p (4,000 seeded draws, within 5 standard errors per token)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    p = torch.softmax(logits, -1)
    generator = torch.Generator().manual_seed(0)
    n, x = 4_000, 1
    emitted: Counter[int] = Counter()
    kept = 0
    for _ in range(n):
        ok, new = _judge(logits, x, None, 1.0, generator)
        kept += ok
        assert ok != bool(new) and (ok or new[0] != x)
        emitted[x if ok else new[0]] += 1
    assert abs(kept / n - p[x].item()) < 5 * math.sqrt(p[x].item() * (1 - p[x].item()) / n)
    for tok, prob in enumerate(p.tolist()):
        assert abs(emitted[tok] / n - prob) < 5 * math.sqrt(prob * (1 - prob) / n), (tok, emitted, p)
    # the same rule as a draft model's, with its q written out one-hot
    one_hot = torch.nn.functional.one_hot(torch.tensor(x), len(p)).float()
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [_judge(logits, x, None, 1.0, a) for _ in range(200)] == [_judge(logits, x, one_hot, 1.0, b)
                                                                     for _ in range(200)]
    assert _judge(logits, 0, None, 0.0, None) == (True, []) and _judge(logits, 1, None, 0.0, None) == (False, [])


@pytest.mark.slow
def test_sampling_with_lookup_follows_the_targets_distribution(tokenizer):
    """The first sampled token after a prompt whose final 2-gram occurred before (so lookup proposes the token after
    it), over 2,000 seeded draws: chi-square against the target's softmax, and the proposal kept about p(x) of the
    time."""
    target = make_gpt2(tokenizer, n_layer=2, n_embd=32, seed=0)
    with torch.no_grad():  # sharpen the random model so that the distribution has a shape to test
        target.lm_head.weight.mul_(8)
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=2, temperature=1.0, heal=False)
    a, b = 40, 41
    for c in range(len(tokenizer)):  # a prompt a b c a b whose proposal c the target finds neither sure nor unlikely
        ids = (a, b, c, a, b)
        with torch.no_grad():
            p = torch.softmax(target(torch.tensor([list(ids)])).logits[0, -1], -1)
        if 0.2 < p[c].item() < 0.8:
            break
    else:
        pytest.fail("no proposal with a moderate probability under the target")
    prompt = Prompt(ids)
    generator = torch.Generator().manual_seed(0)
    n = 2000
    counts: Counter[int] = Counter()
    total = Acceptance(1)
    kept = PromptCache()  # the prompt prefilled once, its cache cut back to it on every draw
    for _ in range(n):
        out, acc, _ = speculative_one(target, "lookup", index, prompt, opts, k=1, generator=generator,
                                      target_reuse=kept)
        counts[out[0]] += 1
        total.add(acc)
    assert total.proposed == n and kept.reused == len(ids) - 1  # every first pass proposed c, from the kept cache
    assert abs(total.accepted / n - p[c].item()) < 5 * math.sqrt(p[c].item() * (1 - p[c].item()) / n)
    expected = p * n
    keep = expected >= 5
    chi2 = sum((counts[i] - expected[i].item()) ** 2 / expected[i].item() for i in torch.nonzero(keep)[:, 0].tolist())
    rest = expected[~keep].sum().item()
    chi2 += (sum(counts[i] for i in range(len(p)) if not keep[i]) - rest) ** 2 / max(rest, 1e-9)
    dof = int(keep.sum())
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)


def test_sampled_completions_with_lookup_are_seeded(target, tokenizer, prompts):
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=16, temperature=0.7, seed=3, heal_space=True)
    one, acc = speculative(target, "lookup", index, prompts[:4], opts, k=4)
    two, _ = speculative(target, "lookup", index, prompts[:4], opts, k=4)
    assert one.token_ids == two.token_ids and acc.passes > 0 and acc.proposed > 0
