"""The fused forms of the forward and reverse KL (:mod:`kdcode.strategies.divergences`): the soft term at
temperature T and the hard CE in one pass over the vocabulary, with hand-written gradients, chunked along the
sequence so that memory does not grow with the vocabulary beyond the logits themselves.

For a student's logits s, the two terms every KL strategy pays for are

    hard = CE(softmax(s), y)                       d/ds_j = softmax(s)_j - [j = y]
    soft = T^2 KL(p || softmax(s/T))               d/ds_j = T (q_j - p_j),  q = softmax(s/T)

Autograd computes each with its own log-softmax, float copies and a backward chain. Here both softmaxes
come from a single ``exp(s - max)`` over the vocabulary (at T=2 the second is its square root, at T=1
the same tensor) and the backward writes one gradient. Two teacher forms:

- dense: the live teacher's logits, p = softmax(t/T) over the whole vocabulary;
- sparse: a teacher cache's top-k logits and ``lse = logsumexp(t/T)``, with the rest of the teacher's mass
  as one bucket (:mod:`kdcode.strategies.sparse`, built by :mod:`kdcode.train.teacher_cache`); its gradient is
  T (q_j - p_j) on the top k and T q_j (1 - p_rest / q_rest) elsewhere (the teacher's rest mass spread like the
  student's).

Memory: the float32 work (a copy of the student's logits, their two softmaxes, the teacher's softmax) is done
``chunk`` sequence positions at a time. With one chunk (short sequences, small vocabularies: the default sizes a
chunk to about 32 MB of float32) the softmaxes are kept for the backward, as before chunking existed; with
several, only per-position sums are kept and the backward recomputes each chunk's softmaxes from the logits,
then writes the chunk's gradient over those logits when they are a model's output (not a leaf; as
Liger-Kernel's losses do): the only vocabulary-sized tensors are then the student's logits (which become their
gradient) and the teacher's. Values and gradients are the same either way. ``vocab`` keeps the first ``vocab``
columns of both (the tokenizer's tokens): LM-head padding rows take part in no softmax and get no gradient.

Both return (soft, hard) as means over counted positions (labels != -100), equal to the reference
``divergences.forward_kl`` (dense) or the forward KL over the cache's buckets (sparse), and ``losses.causal_ce``:
tests/test_divergences.py compares values and gradients with the autograd references.

``reverse=True`` swaps the soft term for the reverse KL (MiniLLM's mode-seeking divergence, kdcode's default):

    soft = T^2 KL(q || p)                          d/ds_j = T q_j (d_j - sum_i q_i d_i),  d = log q - log p

(from a cache: over the top-k buckets and the rest, d_j the log-ratio of j's bucket), equal to
``divergences.reverse_kl``. Strategies reach both through ``divergences.kd_terms``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdcode.errors import KdcodeError
from kdcode.strategies.losses import IGNORE

# Float32 elements of one chunk of the student's logits (32 MB): small next to the logits of a real vocabulary,
# large enough that a few Python steps per chunk cost nothing.
CHUNK_ELEMENTS = 2**23


def chunk_positions(batch: int, positions: int, vocab: int, chunk: int | None) -> int:
    """Sequence positions per chunk: ``chunk`` as given (0: all in one), or sized to :data:`CHUNK_ELEMENTS`."""
    if chunk is None:
        return max(1, CHUNK_ELEMENTS // max(1, batch * vocab))
    return chunk if chunk > 0 else max(positions, 1)


def _targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicting position: weights (mean over counted positions) and targets (ignored ones clamped to 0)."""
    y = labels[:, 1:]
    mask = y != IGNORE
    w = mask.float() / mask.sum().clamp(min=1)
    return w, y.clamp(min=0)[..., None]


def _softmaxes(s: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """exp(s - m) and exp((s - m) / T) with their sums, from one exp; overwrites ``s``."""
    m = s.amax(-1, keepdim=True)
    e1 = s.sub_(m).exp_()
    z1 = e1.sum(-1, keepdim=True)
    if t == 1.0:
        return m, e1, z1, e1, z1
    e_t = e1.sqrt() if t == 2.0 else e1.log().div_(t).exp_()
    return m, e1, z1, e_t, e_t.sum(-1, keepdim=True)


def _dense_chunk(s_c: torch.Tensor, t_c: torch.Tensor, y: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """One chunk against the teacher's logits: (kl, hard) per position and what its gradient needs."""
    s = s_c.to(torch.float32, copy=True)  # a copy: its exp is taken in place
    s_y = s.gather(-1, y)[..., 0]
    u = t_c.float() / t
    u = u.sub_(u.amax(-1, keepdim=True))
    p = u.exp()
    z_p = p.sum(-1, keepdim=True)
    p = p.div_(z_p)  # softmax(t/T); log p = u - log z_p
    p_dot_s = torch.linalg.vecdot(p, s)  # sum_j p_j s_j, before s is overwritten
    m, e1, z1, e_t, z_t = _softmaxes(s, t)
    hard = m[..., 0] + z1[..., 0].log() - s_y
    # sum_j p_j log q_j with log q_j = (s_j - m) / T - log z_T, and sum_j p_j = 1
    cross = (p_dot_s - m[..., 0]) / t - z_t[..., 0].log()
    kl = torch.linalg.vecdot(p, u) - z_p[..., 0].log() - cross
    return kl, hard, (e1, z1, e_t, z_t, p)


def _dense_grad(saved: tuple[torch.Tensor, ...], y: torch.Tensor, c_hard: torch.Tensor, c_soft: torch.Tensor):
    e1, z1, e_t, z_t, p = saved
    grad = _student_grad(e1, z1, e_t, z_t, y, c_hard, c_soft)
    return grad.addcmul_(p, -c_soft)


def _sparse_common(
    s_c: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, t: float
) -> tuple[torch.Tensor, ...]:
    """What both sparse chunks start from: the student's softmaxes, the hard CE, and the teacher's and the student's
    log-probs at T on the teacher's top k."""
    s = s_c.to(torch.float32, copy=True)
    s_y = s.gather(-1, y)[..., 0]
    ids = topk_ids.long()
    s_k = s.gather(-1, ids)
    m, e1, z1, e_t, z_t = _softmaxes(s, t)
    hard = m[..., 0] + z1[..., 0].log() - s_y
    log_p = topk_logits.float() / t - lse.float()[..., None]
    log_q = s_k / t - (m / t + z_t.log())
    return e1, z1, e_t, z_t, ids, hard, log_p, log_q


def _sparse_chunk(
    s_c: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, t: float
) -> tuple[torch.Tensor, ...]:
    """One chunk against cached top-k targets: (kl, hard) per position and what its gradient needs."""
    e1, z1, e_t, z_t, ids, hard, log_p, log_q = _sparse_common(s_c, topk_logits, topk_ids, lse, y, t)
    p = log_p.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_k = log_q.exp()
    q_rest = (1 - q_k.sum(-1)).clamp(min=1e-12)
    kl = (p * (log_p - log_q)).sum(-1)
    kl = kl + torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp(min=1e-12)) - torch.log(q_rest)), 0.0)
    ratio = torch.where(p_rest > 0, p_rest / q_rest, 0.0)[..., None]
    return kl, hard, (e1, z1, e_t, z_t, ids, p, q_k, ratio)


def _sparse_grad(saved: tuple[torch.Tensor, ...], y: torch.Tensor, c_hard: torch.Tensor, c_soft: torch.Tensor):
    e1, z1, e_t, z_t, ids, p, q_k, ratio = saved
    grad = _student_grad(e1, z1, e_t, z_t, y, c_hard, c_soft * (1 - ratio))  # off the top k: T q (1 - p_rest/q_rest)
    return grad.scatter_add_(-1, ids, c_soft * (q_k * ratio - p))  # on the top k: T (q - p)


def _dense_reverse_chunk(s_c: torch.Tensor, t_c: torch.Tensor, y: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """One chunk, reverse KL(q || p) against the teacher's logits: (kl, hard) per position and what its gradient
    needs. ``d = s/T - t/T`` is log q - log p up to a per-position constant, which the gradient does not see."""
    s = s_c.to(torch.float32, copy=True)
    s_y = s.gather(-1, y)[..., 0]
    u = t_c.float() / t
    u = u.sub_(u.amax(-1, keepdim=True))
    log_zp = torch.logsumexp(u, -1)  # log p = u - log_zp
    d = torch.div(s, t).sub_(u)
    m, e1, z1, e_t, z_t = _softmaxes(s, t)
    hard = m[..., 0] + z1[..., 0].log() - s_y
    q_d = torch.linalg.vecdot(e_t, d) / z_t[..., 0]  # sum_j q_j d_j
    # log q_j - log p_j = d_j - m / T - log z_T + log z_p, and sum_j q_j = 1
    kl = q_d - m[..., 0] / t - z_t[..., 0].log() + log_zp
    return kl, hard, (e1, z1, e_t, z_t, d, q_d)


def _dense_reverse_grad(saved: tuple[torch.Tensor, ...], y: torch.Tensor, c_hard: torch.Tensor, c_soft: torch.Tensor):
    e1, z1, e_t, z_t, d, q_d = saved
    grad = _student_grad(e1, z1, e_t, z_t, y, c_hard, -c_soft * q_d[..., None])  # T q_j (d_j - sum_i q_i d_i)
    return grad.addcmul_(e_t.mul(c_soft / z_t), d)


def _sparse_reverse_chunk(
    s_c: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, t: float
) -> tuple[torch.Tensor, ...]:
    """One chunk, reverse KL over the teacher's top k tokens and one bucket for the rest of the vocabulary (a lower
    bound of the full reverse KL, exact when k is the vocabulary): (kl, hard) and what its gradient needs."""
    e1, z1, e_t, z_t, ids, hard, log_p, log_q = _sparse_common(s_c, topk_logits, topk_ids, lse, y, t)
    p_rest = (1 - log_p.exp().sum(-1)).clamp(min=1e-12)
    q_k = log_q.exp()
    q_rest = (1 - q_k.sum(-1)).clamp(min=1e-12)
    d_k = log_q - log_p  # log q - log p per bucket: the top k, then the rest
    d_rest = q_rest.log() - p_rest.log()
    kl = (q_k * d_k).sum(-1) + q_rest * d_rest
    return kl, hard, (e1, z1, e_t, z_t, ids, q_k, d_k, d_rest, kl)


def _sparse_reverse_grad(saved: tuple[torch.Tensor, ...], y: torch.Tensor, c_hard: torch.Tensor, c_soft: torch.Tensor):
    e1, z1, e_t, z_t, ids, q_k, d_k, d_rest, kl = saved
    # T q_j (d_b(j) - kl), d_b(j) the log-ratio of j's bucket: the rest's off the top k, then the top k's own
    grad = _student_grad(e1, z1, e_t, z_t, y, c_hard, c_soft * (d_rest - kl)[..., None])
    return grad.scatter_add_(-1, ids, c_soft * q_k * (d_k - d_rest[..., None]))


def _student_grad(e1, z1, e_t, z_t, y, c_hard, c_soft_scaled) -> torch.Tensor:
    """c_hard * (softmax(s) - onehot(y)) + c_soft_scaled * softmax(s/T); the caller adds its teacher part."""
    grad = e1.mul(c_hard / z1)
    grad.addcmul_(e_t, c_soft_scaled / z_t)
    return grad.scatter_add_(-1, y, -c_hard)


class _ChunkedKD(torch.autograd.Function):
    """(soft, hard) from per-chunk ``chunk_fn(s_chunk, *teacher_chunks, y, T)``; ``grad_fn`` writes each chunk's
    gradient. ``teacher`` tensors are sliced along positions like the student's logits (their last dim is not)."""

    @staticmethod
    def forward(ctx, s_logits, labels, t, vocab, chunk, chunk_fn, grad_fn, *teacher):  # type: ignore[override]
        w, y = _targets(labels)
        n = y.size(1)
        step = chunk_positions(y.size(0), n, vocab, chunk)
        spans = [(a, min(a + step, n)) for a in range(0, n, step)]
        kls, hards = [], []
        for a, b in spans:
            kl, hard, parts = chunk_fn(s_logits[:, a:b, :vocab], *(x[:, a:b] for x in teacher), y[:, a:b], t)
            kls.append(kl)
            hards.append(hard)
        kl, hard = (torch.cat(v, dim=1) if len(v) > 1 else v[0] for v in (kls, hards))
        ctx.recompute = len(spans) > 1
        # A model's logits (not a leaf) are needed by nothing but this loss once it has run: their gradient is
        # written over them, chunk by chunk, as each chunk's softmaxes are recomputed from them.
        ctx.in_place = ctx.recompute and s_logits.grad_fn is not None
        if ctx.recompute:  # the logits stay; each chunk's softmaxes are computed again in the backward
            ctx.save_for_backward(w, y, s_logits, *teacher)
        else:  # one chunk: keep its softmaxes (the logits themselves can go), as before chunking
            ctx.save_for_backward(w, y, *parts)
        ctx.t, ctx.vocab, ctx.spans, ctx.shape, ctx.dtype = t, vocab, spans, s_logits.shape, s_logits.dtype
        ctx.chunk_fn, ctx.grad_fn, ctx.n_inputs = chunk_fn, grad_fn, 7 + len(teacher)
        return (kl * w).sum() * t**2, (hard * w).sum()

    @staticmethod
    def backward(ctx, g_soft, g_hard):  # type: ignore[override]
        w, y, *rest = ctx.saved_tensors
        c_hard = (g_hard * w)[..., None]
        c_soft = (g_soft * ctx.t * w)[..., None]
        s_logits, *teacher = rest if ctx.recompute else (None,)
        if ctx.in_place:  # padding columns and the last position (it predicts nothing) get no gradient
            out = s_logits
            out[:, y.size(1) :].zero_()
            out[..., ctx.vocab :].zero_()
        else:
            out = w.new_zeros(ctx.shape, dtype=ctx.dtype)
        for a, b in ctx.spans:
            if ctx.recompute:  # a float copy of the chunk is taken before its logits are overwritten
                parts = ctx.chunk_fn(s_logits[:, a:b, : ctx.vocab], *(x[:, a:b] for x in teacher), y[:, a:b], ctx.t)[2]
            else:
                parts = rest
            out[:, a:b, : ctx.vocab] = ctx.grad_fn(parts, y[:, a:b], c_hard[:, a:b], c_soft[:, a:b])
        return out, None, None, None, None, None, None, *(None for _ in range(ctx.n_inputs - 7))


def _vocab(s_logits: torch.Tensor, t_width: int | None, vocab: int | None) -> int:
    """The shared vocabulary: ``vocab`` (the tokenizer's length), or the logits' width when both have the same."""
    widths = [s_logits.size(-1)] + ([t_width] if t_width is not None else [])
    if vocab is None and len(set(widths)) > 1:
        raise KdcodeError(f"student and teacher logits are {widths[0]} and {widths[1]} wide; give the tokenizer's "
                          "length (vocab) to compare them over its tokens")
    vocab = widths[0] if vocab is None else vocab
    if min(widths) < vocab:
        raise KdcodeError(
            f"the logits are {' and '.join(map(str, widths))} wide (student, teacher), fewer than the tokenizer's "
            f"{vocab} tokens; student and teacher must share one tokenizer"
        )
    return vocab


def _apply(s_logits, labels, temperature, vocab, chunk, chunk_fn: Callable, grad_fn: Callable, *teacher):
    return _ChunkedKD.apply(s_logits, labels, float(temperature), vocab, chunk, chunk_fn, grad_fn, *teacher)


def dense_kd_terms(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    vocab: int | None = None,
    chunk: int | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T^2 KL(softmax(t/T) || softmax(s/T)), CE(s, y)) over the first ``vocab`` tokens; the teacher gets no
    gradient. ``chunk``: positions per chunk (None: automatic, 0: one pass). ``reverse``: T^2 KL(q || p) instead."""
    vocab = _vocab(s_logits, t_logits.size(-1), vocab)
    t = t_logits.detach()[:, :-1, :vocab]
    fns = (_dense_reverse_chunk, _dense_reverse_grad) if reverse else (_dense_chunk, _dense_grad)
    return _apply(s_logits, labels, temperature, vocab, chunk, *fns, t)


def sparse_kd_terms(
    s_logits: torch.Tensor,
    topk_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    vocab: int | None = None,
    chunk: int | None = None,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse T^2 KL over the teacher's top k + a rest bucket, CE(s, y)) from cached soft targets (``reverse``:
    the buckets' reverse KL)."""
    vocab = _vocab(s_logits, None, vocab)
    teacher = (topk_logits[:, :-1], topk_ids[:, :-1], lse[:, :-1])
    fns = (_sparse_reverse_chunk, _sparse_reverse_grad) if reverse else (_sparse_chunk, _sparse_grad)
    return _apply(s_logits, labels, temperature, vocab, chunk, *fns, *teacher)
