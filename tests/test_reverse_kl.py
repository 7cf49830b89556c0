"""Reverse KL, the default strategy (issue 20): golden values, the fused pass against autograd (live teacher and
teacher cache, chunked and whole), and that a run with no strategy flags uses it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdcode.plugins import make_strategy
from kdcode.spec import RunSpec
from kdcode.strategies.fused import dense_kd_terms, sparse_kd_terms
from kdcode.strategies.jsd import generalised_jsd
from kdcode.strategies.losses import causal_ce, masked_mean, shift
from kdcode.strategies.sparse import SparseTargets

LN3 = math.log(3.0)
LABELS = torch.tensor([[1, 0]])
S = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # student uniform at the one counted position
T = torch.tensor([[[LN3, 0.0], [-5.0, 5.0]]])  # teacher [3/4, 1/4]
REV = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(Q || P) = 0.1438410...
B, L, V = 3, 17, 50


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(B, L, V, generator=g)
    t = 3 * torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :5] = -100
    return s, t, labels


def _run(fn, s0: torch.Tensor, model_output: bool = False):
    leaf = s0.clone().requires_grad_(True)
    s = leaf.clone() if model_output else leaf
    soft, hard = fn(s)
    (0.7 * soft + 0.3 * hard).backward()
    return soft.detach(), hard.detach(), leaf.grad


def _bucket_reverse_kl(s, topk_logits, topk_ids, lse, labels, temp):
    """Autograd reference: the reverse KL between bucket distributions (the teacher's top k, then the rest)."""
    s, _, mask = shift(s, labels)
    q = torch.softmax(s.float() / temp, -1)
    q_k = q.gather(-1, topk_ids[:, :-1].long())
    p_k = torch.exp(topk_logits[:, :-1].float() / temp - lse[:, :-1, None])
    q_b = torch.cat([q_k, (1 - q_k.sum(-1, keepdim=True))], -1)
    p_b = torch.cat([p_k, (1 - p_k.sum(-1, keepdim=True))], -1)
    return masked_mean((q_b * (q_b.log() - p_b.log())).sum(-1), mask) * temp**2


def test_golden_value_and_weights():
    assert REV == pytest.approx(0.1438410, abs=1e-6)
    terms = make_strategy("reverse-kl", {}).loss(SimpleNamespace(logits=S), SimpleNamespace(logits=T), LABELS)
    assert terms["reverse_kl"].item() == pytest.approx(REV, abs=1e-6)
    assert terms["hard"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(REV + 0.5 * math.log(2), abs=1e-6)  # a_kd 1, a_clm 0.5, T 1
    heavy = make_strategy("reverse-kl", {"alpha_kd": 2.0, "alpha_clm": 0.0, "temperature": 2.0})
    t2 = heavy.loss(SimpleNamespace(logits=S), SimpleNamespace(logits=T), LABELS)
    assert t2["loss"].item() == pytest.approx(2 * generalised_jsd(S, T, LABELS, 1.0, 2.0).item(), abs=1e-6)


@pytest.mark.parametrize("temp", [1.0, 2.0, 1.5])
@pytest.mark.parametrize(("chunk", "model_output"), [(4, True), (7, False), (None, True)])
def test_fused_reverse_kl_is_jsd_beta_1_and_chunks_change_nothing(temp, chunk, model_output):
    s0, t, labels = _inputs()
    whole = _run(lambda s: dense_kd_terms(s, t, labels, temp, chunk=0, reverse=True), s0)
    chunked = _run(lambda s: dense_kd_terms(s, t, labels, temp, chunk=chunk, reverse=True), s0, model_output)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    ref = _run(lambda s: (generalised_jsd(s, t, labels, 1.0, temp), causal_ce(s, labels)), s0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, ref))
    forward = _run(lambda s: dense_kd_terms(s, t, labels, temp, chunk=0), s0)
    assert not torch.allclose(forward[0], whole[0])  # the flag does change the divergence


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 6, V])
def test_reverse_kl_from_a_cache_is_the_bucket_divergence(temp, k):
    s0, t, labels = _inputs(1)
    top = t.topk(k, dim=-1)
    cached = (top.values.half(), top.indices.to(torch.int16), torch.logsumexp(t / temp, -1))
    got = _run(lambda s: sparse_kd_terms(s, *cached, labels, temp, chunk=0, reverse=True), s0)
    chunked = _run(lambda s: sparse_kd_terms(s, *cached, labels, temp, chunk=5, reverse=True), s0, True)
    assert all(torch.equal(a, b) for a, b in zip(got, chunked))
    if k < V:  # autograd through the k + 1 buckets
        ref = _run(lambda s: (_bucket_reverse_kl(s, *cached, labels, temp), causal_ce(s, labels)), s0)
    else:  # every token its own bucket (no rest): the full reverse KL, up to the cache's half-precision logits
        ref = _run(lambda s: (generalised_jsd(s, t, labels, 1.0, temp), causal_ce(s, labels)), s0)
    assert all(torch.allclose(a, b, atol=1e-5 if k < V else 2e-4) for a, b in zip(got, ref))


def test_strategy_reads_a_cache_as_it_reads_a_live_teacher():
    s0, t, labels = _inputs(2)
    top = t.topk(V, dim=-1)
    targets = SparseTargets(top.values, top.indices, torch.logsumexp(t, -1), 1.0)
    strategy = make_strategy("reverse-kl", {})
    live = strategy.loss(SimpleNamespace(logits=s0), SimpleNamespace(logits=t), labels)
    cached = strategy.loss(SimpleNamespace(logits=s0), targets, labels)
    assert cached["loss"].item() == pytest.approx(live["loss"].item(), abs=1e-5)
    assert strategy.supports_cache


def test_no_strategy_flags_mean_reverse_kl():
    run = RunSpec()
    assert run.strategy.name == "reverse-kl"
    params = make_strategy(run.strategy.name, run.strategy.params).params
    assert (params.temperature, params.alpha_kd, params.alpha_clm) == (1.0, 1.0, 0.5)
