"""The fast forms of each divergence held to its reference formula (kdcode.strategies.divergences), values and
gradients: the fused pass (forward and reverse KL with the hard CE, against a live teacher, whole and chunked) and
the sparse teacher-cache forms (the same formula over the teacher's top k tokens and one rest bucket).

Tolerances (float32, a 50-token vocabulary, logits ~ 3 N(0, 1)): the fused pass reorders the float sums of the
reference (one exp for both softmaxes, sums of p * s instead of sums of p * log q), so values agree within 1e-5
and gradients within 1e-6 absolute; chunked and whole fused passes are equal bit for bit. The sparse forms are
checked against the bucket formula within 1e-5 (the rest bucket is 1 - a sum of k probabilities), from what a
cache stores (float16 logits); with k = the vocabulary (float32 logits) they are the full reference, within 1e-5.
(With k = the vocabulary the rest bucket is rounding noise, ~5e-7: the forward KL's gradient there carries
p_rest / q_rest, noise over noise, and differs from the full reference's by up to 4e-4; only values are compared
there. A real cache keeps k << vocabulary, where the rest bucket holds real mass.)
"""

from __future__ import annotations

import math

import pytest
import torch

from kdcode.errors import KdcodeError
from kdcode.strategies.divergences import (
    buckets,
    forward_kl,
    generalised_jsd,
    jsd,
    kd_terms,
    kl,
    reverse_kl,
    sparse_tvd,
    tv,
    tvd,
)
from kdcode.strategies.fused import dense_kd_terms, sparse_kd_terms
from kdcode.strategies.losses import causal_ce, masked_mean, shift
from kdcode.strategies.sparse import SparseTargets

B, L, V = 3, 17, 50
VALUE_TOL, GRAD_TOL, BUCKET_TOL = 1e-5, 1e-6, 1e-5
REFERENCE = {"forward": forward_kl, "reverse": reverse_kl}


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(B, L, V, generator=g)
    t = 3 * torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :5] = -100  # ignored positions count in no term
    return s, t, labels


def _run(fn, s0: torch.Tensor, model_output: bool = False, weight: float = 0.7):
    """(soft, hard, d(weight soft + (1 - weight) hard)/ds) of ``fn(s)``; a model's logits are not a leaf."""
    leaf = s0.clone().requires_grad_(True)
    s = leaf.clone() if model_output else leaf
    soft, hard = fn(s)
    (weight * soft + (1 - weight) * hard).backward()
    assert torch.equal(leaf.detach(), s0)  # the student's logits are not touched
    return soft.detach(), hard.detach(), leaf.grad


def _close(got, ref, value_tol: float = VALUE_TOL, grad_tol: float = GRAD_TOL) -> None:
    for a, b in zip(got[:2], ref[:2]):
        assert a.item() == pytest.approx(b.item(), abs=value_tol)
    assert torch.allclose(got[2], ref[2], atol=grad_tol, rtol=0)


def _cache(t: torch.Tensor, temp: float, k: int):
    """What a teacher cache stores: float16 top-k logits (float32 when k is the vocabulary: see above), int16 ids,
    float32 logsumexp(t/T)."""
    top = t.topk(k, dim=-1)
    values = top.values if k == t.size(-1) else top.values.half()
    return SparseTargets(values, top.indices.to(torch.int16), torch.logsumexp(t / temp, -1), temp)


def _bucket_reference(name: str, s: torch.Tensor, targets: SparseTargets, labels: torch.Tensor, temp: float):
    """The reference formula of ``name`` (kl, reverse kl, tv) over the k + 1 buckets, with autograd."""
    p, q = buckets(s, targets, temp)
    log_p, log_q = (x.clamp(min=1e-12).log() for x in (p, q))
    per_position = {"forward": lambda: kl(log_p, log_q), "reverse": lambda: kl(log_q, log_p), "tvd": lambda: tv(p, q)}
    scale = 1.0 if name == "tvd" else temp**2
    return masked_mean(per_position[name](), shift(s, labels)[2]) * scale


# ----------------------------------------------------------------------------------- the references themselves


def test_jsd_endpoints_are_the_two_kls_and_its_middle_is_between():
    s, t, labels = _inputs(5)
    assert torch.equal(generalised_jsd(s, t, labels, 0.0, 2.0), forward_kl(s, t, labels, 2.0))
    assert torch.equal(generalised_jsd(s, t, labels, 1.0, 2.0), reverse_kl(s, t, labels, 2.0))
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    half = jsd(log_p, log_q, 0.5)
    assert (half >= 0).all() and (half <= math.log(2) + 1e-6).all()  # JS divergence is bounded by ln 2
    assert torch.allclose(half, jsd(log_q, log_p, 0.5), atol=1e-6)  # and symmetric at beta 1/2


def test_tvd_reference_is_bounded_and_zero_on_equal_distributions():
    s, t, labels = _inputs(6)
    assert 0 < tvd(s, t, labels, 1.0).item() < 1
    assert tvd(s, s + 7.0, labels, 1.0).item() == pytest.approx(0.0, abs=1e-7)  # softmax ignores a shift


# ----------------------------------------------------------------------------------- fused (live teacher)


@pytest.mark.parametrize("temp", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_fused_dense_is_the_reference_and_chunks_change_nothing(divergence, temp):
    s0, t, labels = _inputs()
    reverse = divergence == "reverse"
    whole = _run(lambda s: dense_kd_terms(s, t, labels, temp, chunk=0, reverse=reverse), s0)
    ref = _run(lambda s: (REFERENCE[divergence](s, t, labels, temp), causal_ce(s, labels)), s0)
    _close(whole, ref)
    assert whole[0].item() > 0.1 and whole[1].item() > 1.0  # not a trivial agreement
    assert whole[2][:, -1].abs().sum() == 0 and whole[2][0, :4].abs().sum() == 0  # unscored positions get none
    for chunk, model_output in ((4, True), (7, False), (None, True)):
        fused = lambda s, c=chunk: dense_kd_terms(s, t, labels, temp, chunk=c, reverse=reverse)  # noqa: E731
        chunked = _run(fused, s0, model_output)
        assert all(torch.equal(a, b) for a, b in zip(whole, chunked)), chunk
    other = _run(lambda s: dense_kd_terms(s, t, labels, temp, chunk=0, reverse=not reverse), s0)
    assert not torch.allclose(other[0], whole[0])  # the flag does change the divergence


# ----------------------------------------------------------------------------------- sparse (teacher cache)


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 6, V])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_fused_sparse_is_the_reference_over_buckets(divergence, k, temp):
    s0, t, labels = _inputs(1)
    targets = _cache(t, temp, k)
    reverse = divergence == "reverse"
    cached = (targets.topk_logits, targets.topk_ids, targets.lse)
    got = _run(lambda s: sparse_kd_terms(s, *cached, labels, temp, chunk=0, reverse=reverse), s0)
    chunked = _run(lambda s: sparse_kd_terms(s, *cached, labels, temp, chunk=5, reverse=reverse), s0, True)
    assert all(torch.equal(a, b) for a, b in zip(got, chunked))
    if k < V:  # autograd through the k + 1 buckets
        ref = _run(lambda s: (_bucket_reference(divergence, s, targets, labels, temp), causal_ce(s, labels)), s0)
        _close(got, ref, BUCKET_TOL, BUCKET_TOL)
    else:  # every token its own bucket (the rest is rounding noise): the full divergence's values
        ref = _run(lambda s: (REFERENCE[divergence](s, t, labels, temp), causal_ce(s, labels)), s0)
        _close(got, ref, BUCKET_TOL, grad_tol=math.inf)
    assert kd_terms(s0, targets, labels, temp, reverse=reverse)[0].item() == got[0].item()  # what strategies call


@pytest.mark.parametrize("k", [1, 6, V])
def test_sparse_tvd_is_the_reference_over_buckets(k):
    s0, t, labels = _inputs(2)
    targets = _cache(t, 1.0, k)
    got = _run(lambda s: (sparse_tvd(s, targets, labels, 1.0), causal_ce(s, labels)), s0)
    ref = _run(lambda s: (_bucket_reference("tvd", s, targets, labels, 1.0), causal_ce(s, labels)), s0)
    _close(got, ref, BUCKET_TOL, BUCKET_TOL)
    if k == V:  # every token its own bucket: the full TVD
        full = _run(lambda s: (tvd(s, t, labels, 1.0), causal_ce(s, labels)), s0)
        _close(got, full, BUCKET_TOL, BUCKET_TOL)


def test_a_cache_at_another_temperature_is_refused():
    s0, t, labels = _inputs(3)
    with pytest.raises(KdcodeError, match="T=1.0, the strategy asks for T=2.0"):
        kd_terms(s0, _cache(t, 1.0, 4), labels, 2.0)
