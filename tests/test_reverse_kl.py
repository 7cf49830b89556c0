"""Reverse KL, the default strategy (issue 20): golden values, a cache read as a live teacher, and that a run with no
strategy flags uses it. Its fused and cached forms against the reference: tests/test_divergences.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdcode.plugins import make_strategy
from kdcode.spec import RunSpec
from kdcode.strategies.divergences import generalised_jsd
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


def test_golden_value_and_weights():
    assert REV == pytest.approx(0.1438410, abs=1e-6)
    terms = make_strategy("reverse-kl", {}).loss(SimpleNamespace(logits=S), SimpleNamespace(logits=T), LABELS)
    assert terms["reverse_kl"].item() == pytest.approx(REV, abs=1e-6)
    assert terms["hard"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(REV + 0.5 * math.log(2), abs=1e-6)  # alpha_soft 1, alpha_hard 0.5, T 1
    heavy = make_strategy("reverse-kl", {"alpha_soft": 2.0, "alpha_hard": 0.0, "temperature": 2.0})
    t2 = heavy.loss(SimpleNamespace(logits=S), SimpleNamespace(logits=T), LABELS)
    assert t2["loss"].item() == pytest.approx(2 * generalised_jsd(S, T, LABELS, 1.0, 2.0).item(), abs=1e-6)


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
    assert (params.temperature, params.alpha_soft, params.alpha_hard) == (1.0, 1.0, 0.5)
