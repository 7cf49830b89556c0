"""Speculative decoding (issue 22): greedy output token for token the target's own, with fp32, int8 and
head-pruned drafts; sampling that follows the target's distribution; acceptance counted honestly."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import make_gpt2

from kdcode.data.corpus import load_corpus
from kdcode.evaluation.completion_sets import build_line_samples
from kdcode.inference.decode import DecodeOptions, VocabIndex, encode_prompt, greedy
from kdcode.inference.speculative import Acceptance, speculative, speculative_one
from kdcode.spec import DataSpec


@pytest.fixture(scope="module")
def prompts(corpus_dir) -> list[str]:
    docs = load_corpus(DataSpec(source=str(corpus_dir))).splits["test"]
    return [s.input for s in build_line_samples(docs, 50, seed=3)]


@pytest.fixture(scope="module")
def pair(tokenizer):
    target = make_gpt2(tokenizer, n_layer=4, seed=0)
    # a draft that agrees often: the target's first two blocks (as a layer-copy student starts)
    draft = make_gpt2(tokenizer, n_layer=2, seed=0)
    state = {k: v for k, v in target.state_dict().items() if not k.startswith("transformer.h.") or
             int(k.split(".")[2]) < 2}
    draft.load_state_dict(state)
    return target, draft


def _greedy_ids(target, index, prompts, opts):
    return greedy(target, index, prompts, opts, batch_size=1).token_ids


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculation_is_the_targets_own_greedy_output(pair, tokenizer, prompts, k):
    target, draft = pair
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=16)
    gen, acc = speculative(target, draft, index, prompts, opts, k=k)
    assert gen.token_ids == _greedy_ids(target, index, prompts, opts)
    s = acc.summary()
    assert s["draft_tokens"] == k and 0 < s["acceptance_rate"] <= 1 and s["tokens_per_pass"] > 1
    assert acc.accepted <= acc.proposed <= k * acc.passes


@pytest.mark.slow
def test_editor_prompts_heal_over_whitespace_identically(pair, tokenizer, prompts):
    target, draft = pair
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=12, heal_space=True, stop_strings=("\n",))
    edited = [p + "    " for p in prompts[:20]]  # cursors inside indentation
    gen, _ = speculative(target, draft, index, edited, opts, k=4)
    assert gen.token_ids == _greedy_ids(target, index, edited, opts)


@pytest.mark.slow
def test_int8_and_head_pruned_drafts_keep_the_output(pair, tokenizer, prompts, tmp_path):
    from kdcode.compression.int8 import quantize_model
    from kdcode.compression.prune import prune_heads

    target, draft = pair
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=10)
    want = _greedy_ids(target, index, prompts[:25], opts)
    int8 = make_gpt2(tokenizer, n_layer=2, seed=0)
    int8.load_state_dict(draft.state_dict())
    quantize_model(int8)
    pruned = make_gpt2(tokenizer, n_layer=2, seed=0)
    pruned.load_state_dict(draft.state_dict())
    prune_heads(pruned, [[0], [1]])
    for d in (int8, pruned):
        gen, acc = speculative(target, d, index, prompts[:25], opts, k=4)
        assert gen.token_ids == want and acc.passes > 0


def test_a_draft_of_another_tokenizer_is_one_line(tokenizer, corpus_dir):
    from kdcode.data.bpe import train_bpe
    from kdcode.errors import KdcodeError
    from kdcode.inference.speculative import check_pair

    other = train_bpe([p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:3]], vocab_size=300)
    with pytest.raises(KdcodeError, match="use different tokenizers"):
        check_pair(tokenizer, other, "teacher", "student")


@pytest.mark.slow
def test_speculative_sampling_follows_the_targets_distribution(tokenizer):
    """The first sampled token's distribution, over 3,000 draws with a fixed seed, matches the target's softmax
    (chi-square over the tokens with an expected count of 5 or more), with a draft that disagrees often."""
    target = make_gpt2(tokenizer, n_layer=2, n_embd=32, seed=0)
    draft = make_gpt2(tokenizer, n_layer=1, n_embd=32, seed=7)
    with torch.no_grad():  # sharpen the random models so that the distribution has a shape to test
        target.lm_head.weight.mul_(8)
        draft.lm_head.weight.mul_(8)
    index = VocabIndex.for_model(target, tokenizer)
    opts = DecodeOptions(max_new_tokens=2, temperature=1.0, heal=False)
    prompt = encode_prompt(index, "def main():\n    return", opts, 100)
    with torch.no_grad():
        p = torch.softmax(target(torch.tensor([list(prompt.ids)])).logits[0, -1], -1)
    gen = torch.Generator().manual_seed(0)
    n = 3000
    counts: Counter[int] = Counter()
    total = Acceptance(1)
    for _ in range(n):
        ids, acc, _ = speculative_one(target, draft, index, prompt, opts, k=1, generator=gen)
        counts[ids[0]] += 1
        total.add(acc)
    expected = p * n
    keep = expected >= 5
    chi2 = sum((counts[i] - expected[i].item()) ** 2 / expected[i].item() for i in torch.nonzero(keep)[:, 0].tolist())
    chi2 += (sum(counts[i] for i in range(len(p)) if not keep[i]) - expected[~keep].sum().item()) ** 2 / max(
        expected[~keep].sum().item(), 1e-9)
    dof = int(keep.sum())  # bins - 1, with the pooled rest as one more bin
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)  # ~ p > 0.001
    assert 0.05 < total.accepted / total.proposed < 0.95  # the draft is neither always right nor always wrong
