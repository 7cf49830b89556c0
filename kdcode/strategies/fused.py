"""Soft KL at temperature T and hard CE in one fused pass over the vocabulary, with hand-written gradients.

For a student's logits s, the two terms every logit-KD strategy pays for are

    hard = CE(softmax(s), y)                       d/ds_j = softmax(s)_j - [j = y]
    soft = T^2 KL(p || softmax(s/T))               d/ds_j = T (q_j - p_j),  q = softmax(s/T)

Autograd computes each with its own log-softmax, float copies and a backward chain. Here both softmaxes
come from a single ``exp(s - max)`` over the vocabulary (at T=2 the second is its square root, at T=1
the same tensor) and the backward writes one gradient. Two teacher forms:

- dense: the live teacher's logits, p = softmax(t/T) over the whole vocabulary;
- sparse: a teacher cache's top-k logits and ``lse = logsumexp(t/T)``, with the rest of the teacher's mass
  as one bucket (see :mod:`kdcode.cache`); its gradient is T (q_j - p_j) on the top k and
  T q_j (1 - p_rest / q_rest) elsewhere (the teacher's rest mass spread like the student's).

Both return (soft, hard) as means over counted positions (labels != -100), equal to
``soft_kl``/``sparse_kl`` and ``causal_ce`` (golden tests compare values and gradients with autograd).
"""

from __future__ import annotations

import torch

from kdcode.strategies.losses import IGNORE


def _student(s_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A float32 copy of the predicting logits, per-position weights (mean over counted), targets, s_y."""
    s = s_logits[:, :-1].to(torch.float32, copy=True)  # a copy: its exp is taken in place later
    y = labels[:, 1:]
    mask = y != IGNORE
    w = mask.float() / mask.sum().clamp(min=1)
    y = y.clamp(min=0)[..., None]
    return s, w, y, s.gather(-1, y)[..., 0]


def _softmaxes(s: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """exp(s - m) and exp((s - m) / T) with their sums, from one exp; overwrites ``s``."""
    m = s.amax(-1, keepdim=True)
    e1 = s.sub_(m).exp_()
    z1 = e1.sum(-1, keepdim=True)
    if t == 1.0:
        return m, e1, z1, e1, z1
    e_t = e1.sqrt() if t == 2.0 else e1.log().div_(t).exp_()
    return m, e1, z1, e_t, e_t.sum(-1, keepdim=True)


def _student_grad(
    ctx, g_soft: torch.Tensor, g_hard: torch.Tensor, soft_scale: torch.Tensor | float
) -> tuple[torch.Tensor, ...]:
    """c_hard * (softmax(s) - onehot(y)) + c_soft * soft_scale * softmax(s/T); the caller adds its teacher part."""
    e1, z1, e_t, z_t, w, y = ctx.saved_tensors[:6]
    c_hard = (g_hard * w)[..., None]
    c_soft = (g_soft * ctx.t * w)[..., None]
    grad = e1.mul(c_hard / z1)
    grad.addcmul_(e_t, c_soft * soft_scale / z_t)
    grad.scatter_add_(-1, y, -c_hard)
    return grad, c_soft


def _padded(ctx, grad: torch.Tensor) -> torch.Tensor:
    out = grad.new_zeros(ctx.shape, dtype=ctx.dtype)  # the last position predicts nothing
    out[:, :-1] = grad
    return out


class _DenseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_logits, t_logits, labels, t):  # type: ignore[override]
        s, w, y, s_y = _student(s_logits, labels)
        u = t_logits[:, :-1].float() / t
        u = u.sub_(u.amax(-1, keepdim=True))
        p = u.exp()
        z_p = p.sum(-1, keepdim=True)
        p = p.div_(z_p)  # softmax(t/T); log p = u - log z_p
        p_dot_s = torch.linalg.vecdot(p, s)  # sum_j p_j s_j, before s is overwritten
        m, e1, z1, e_t, z_t = _softmaxes(s, t)
        hard = ((m[..., 0] + z1[..., 0].log() - s_y) * w).sum()
        # sum_j p_j log q_j with log q_j = (s_j - m) / T - log z_T, and sum_j p_j = 1
        cross = (p_dot_s - m[..., 0]) / t - z_t[..., 0].log()
        kl = torch.linalg.vecdot(p, u) - z_p[..., 0].log() - cross
        soft = (kl * w).sum() * t**2
        ctx.save_for_backward(e1, z1, e_t, z_t, w, y, p)
        ctx.t, ctx.shape, ctx.dtype = t, s_logits.shape, s_logits.dtype
        return soft, hard

    @staticmethod
    def backward(ctx, g_soft, g_hard):  # type: ignore[override]
        p = ctx.saved_tensors[6]
        grad, c_soft = _student_grad(ctx, g_soft, g_hard, 1.0)
        grad.addcmul_(p, -c_soft)
        return _padded(ctx, grad), None, None, None


class _SparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_logits, topk_logits, topk_ids, lse, labels, t):  # type: ignore[override]
        s, w, y, s_y = _student(s_logits, labels)
        ids = topk_ids[:, :-1].long()
        s_k = s.gather(-1, ids)
        m, e1, z1, e_t, z_t = _softmaxes(s, t)
        hard = ((m[..., 0] + z1[..., 0].log() - s_y) * w).sum()
        log_p = topk_logits[:, :-1].float() / t - lse[:, :-1].float()[..., None]  # teacher log-probs on its top k
        p = log_p.exp()
        p_rest = (1 - p.sum(-1)).clamp(min=0)
        log_q = s_k / t - (m / t + z_t.log())  # student log-probs at T on the teacher's top k
        q_k = log_q.exp()
        q_rest = (1 - q_k.sum(-1)).clamp(min=1e-12)
        kl = (p * (log_p - log_q)).sum(-1)
        kl = kl + torch.where(p_rest > 0, p_rest * (torch.log(p_rest.clamp(min=1e-12)) - torch.log(q_rest)), 0.0)
        soft = (kl * w).sum() * t**2
        ratio = torch.where(p_rest > 0, p_rest / q_rest, 0.0)[..., None]
        ctx.save_for_backward(e1, z1, e_t, z_t, w, y, ids, p, q_k, ratio)
        ctx.t, ctx.shape, ctx.dtype = t, s_logits.shape, s_logits.dtype
        return soft, hard

    @staticmethod
    def backward(ctx, g_soft, g_hard):  # type: ignore[override]
        ids, p, q_k, ratio = ctx.saved_tensors[6:]
        grad, c_soft = _student_grad(ctx, g_soft, g_hard, 1 - ratio)  # off the top k: T q (1 - p_rest/q_rest)
        grad.scatter_add_(-1, ids, c_soft * (q_k * ratio - p))  # on the top k: T (q - p)
        return _padded(ctx, grad), None, None, None, None, None


def dense_kd_terms(
    s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T^2 KL(softmax(t/T) || softmax(s/T)), CE(s, y)); the teacher's logits get no gradient."""
    return _DenseKD.apply(s_logits, t_logits.detach(), labels, float(temperature))


def sparse_kd_terms(
    s_logits: torch.Tensor,
    topk_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse T^2 KL over the teacher's top k + a rest bucket, CE(s, y)) from cached soft targets."""
    return _SparseKD.apply(s_logits, topk_logits, topk_ids, lse, labels, float(temperature))
