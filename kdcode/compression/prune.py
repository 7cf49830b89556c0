"""Structured pruning of GPT-2 blocks: attention heads and MLP neurons, scored on calibration batches (Llama-style
blocks: :mod:`kdcode.compression.prune_llama`, scored the same way by :func:`mask_scores`).

In every layer the fraction F of units that matter least by a first-order Taylor score is removed. A mask
``xi = 1`` is put on each unit's output (each head's slice of the attention output before ``c_proj``, each
MLP neuron's activation before ``mlp.c_proj``) and the score of a unit is ``sum over batches |dL/dxi|``, L
the next-token cross-entropy of the batch. For a head h this is ``|sum_tokens h . dL/dh|`` (Michel, Levy &
Neubig 2019, "Are Sixteen Heads Really Better than One?"; per batch, absolute value, summed), for a neuron
j it is ``|sum_tokens a_j * dL/da_j|`` (Molchanov et al. 2017). Heads and neurons are scored in the same
pass, on the unpruned model. A pruned unit is cut out of the weights (``c_attn`` columns and ``c_proj``
rows of a head, ``c_fc`` columns and ``mlp.c_proj`` rows of a neuron), which computes exactly what the
original model computes with that unit's output zeroed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kdcode.errors import KdcodeError

HEAD_SCORE = "|sum over tokens of h . dL/dh| per head (Michel et al. 2019, via a head mask), per batch, summed"
FFN_SCORE = "|sum over tokens of a * dL/da| per MLP neuron (first-order Taylor, via a neuron mask), per batch, summed"

def gpt2_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if getattr(model.config, "model_type", None) != "gpt2" or blocks is None:
        raise KdcodeError(
            f"--prune-heads/--prune-ffn support GPT-2 models; this one is {getattr(model.config, 'model_type', '?')}"
        )
    if getattr(model.config, "add_cross_attention", False):
        raise KdcodeError("--prune-heads/--prune-ffn do not support GPT-2 with cross-attention")
    return list(blocks)


def unit_importance(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, heads: bool = True, ffn: bool = True
) -> dict[str, list[torch.Tensor]]:
    """Per layer, the score of every head and MLP neuron: sum over batches of |dL/d mask| (see module doc)."""
    layers = gpt2_blocks(model)
    head_sites = [(b.attn.c_proj, b.attn.num_heads, b.attn.head_dim) for b in layers] if heads else []
    ffn_sites = [(b.mlp.c_proj, b.mlp.c_fc.nf, 1) for b in layers] if ffn else []
    scores = mask_scores(model, head_sites + ffn_sites, blocks, batch_size)
    return {"heads": scores[: len(head_sites)], "ffn": scores[len(head_sites) :]}


def mask_scores(
    model: nn.Module, sites: list[tuple[nn.Module, int, int]], blocks: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """For each site ``(module, units, width)``, a mask ``xi = 1`` of ``units`` entries on the module's input (unit
    u is input features u*width..(u+1)*width) and the score ``sum over batches |dL/dxi|`` of every unit, L the
    next-token cross-entropy. The model runs as it will run (eval mode); it gets no gradient."""
    masks = [torch.ones(units, requires_grad=True) for _, units, _ in sites]
    hooks = [
        module.register_forward_pre_hook(
            lambda m, a, k=mask, w=width: (a[0] * k.repeat_interleave(w).to(a[0].dtype), *a[1:])
        )
        for (module, _, width), mask in zip(sites, masks)
    ]
    scores = [torch.zeros_like(m) for m in masks]
    was_training = model.training
    model.eval()  # no dropout: the score of the model as it will run
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for start in range(0, len(blocks), batch_size):
                x = blocks[start : start + batch_size].to(device)
                loss = model(x, labels=x).loss
                for s, g in zip(scores, torch.autograd.grad(loss, masks)):
                    s += g.detach().abs().float()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return scores


def keep_top(scores: torch.Tensor, fraction: float, what: str) -> list[int]:
    """Indices (ascending) of the units kept when the ``fraction`` with the lowest scores is removed."""
    n = scores.numel()
    drop = min(int(fraction * n + 1e-9), n - 1)
    if drop == 0:
        raise KdcodeError(f"pruning {fraction} of {n} {what} per layer removes none; use at least {1 / n:.3g}")
    keep = torch.argsort(scores, descending=True, stable=True)[: n - drop]
    return sorted(int(i) for i in keep)


def _conv1d(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    m = Conv1D(weight.size(1), weight.size(0))
    m.weight = nn.Parameter(weight.detach().clone().contiguous())
    m.bias = nn.Parameter(bias.detach().clone().contiguous())
    return m


def prune_heads(model: nn.Module, keep: list[list[int]]) -> None:
    """Cut every layer's attention down to the heads in ``keep[layer]`` (in place)."""
    for b, heads in zip(gpt2_blocks(model), keep):
        attn = b.attn
        hd, width = attn.head_dim, attn.split_size
        idx = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        cols = torch.cat([idx, width + idx, 2 * width + idx])  # q, k, v columns of c_attn
        attn.c_attn = _conv1d(attn.c_attn.weight[:, cols], attn.c_attn.bias[cols])
        attn.c_proj = _conv1d(attn.c_proj.weight[idx], attn.c_proj.bias)
        attn.num_heads, attn.split_size = len(heads), len(heads) * hd


def prune_ffn(model: nn.Module, keep: list[list[int]]) -> None:
    """Keep the MLP neurons in ``keep[layer]`` (same count in every layer, so ``n_inner`` holds it)."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1:
        raise KdcodeError("MLP pruning must keep the same number of neurons in every layer")
    for b, idx_list in zip(gpt2_blocks(model), keep):
        idx = torch.tensor(idx_list)
        b.mlp.c_fc = _conv1d(b.mlp.c_fc.weight[:, idx], b.mlp.c_fc.bias[idx])
        b.mlp.c_proj = _conv1d(b.mlp.c_proj.weight[idx], b.mlp.c_proj.bias)
    model.config.n_inner = sizes.pop()


def resize_heads(model: nn.Module, heads_per_layer: list[int]) -> None:
    """Give a freshly built GPT-2 the attention shapes of a head-pruned one (weights are loaded next)."""
    for b, k in zip(gpt2_blocks(model), heads_per_layer):
        attn = b.attn
        embed, hd = attn.c_attn.weight.shape[0], attn.head_dim
        attn.c_attn, attn.c_proj = Conv1D(3 * k * hd, embed), Conv1D(embed, k * hd)
        attn.num_heads, attn.split_size = k, k * hd


def heads_per_layer(model: nn.Module) -> list[int] | None:
    """Heads of every GPT-2 layer, or None when they all have the config's ``n_head`` (or not GPT-2)."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if getattr(model.config, "model_type", None) != "gpt2" or blocks is None:
        return None
    counts = [int(b.attn.num_heads) for b in blocks]
    return counts if any(c != model.config.n_head for c in counts) else None


class GPT2Pruner:
    """The GPT-2 side of `kdcode compress --prune-heads/--prune-ffn` (as :class:`~kdcode.compression.prune_llama.
    LlamaPruner` is the Llama-style side): score, select, cut in place."""

    head_score, ffn_score = HEAD_SCORE, FFN_SCORE

    def __init__(self, model: nn.Module, heads: bool, ffn: bool) -> None:
        self.model = model
        self.first = gpt2_blocks(model)[0]

    def units(self) -> dict[str, int]:
        return {"heads": int(self.first.attn.num_heads), "ffn": int(self.first.mlp.c_fc.nf)}

    def importance(self, blocks: torch.Tensor, batch_size: int, heads: bool, ffn: bool) -> dict[str, list]:
        return unit_importance(self.model, blocks, batch_size, heads=heads, ffn=ffn)

    def keep_heads(self, scores: torch.Tensor, fraction: float) -> list[int]:
        return keep_top(scores, fraction, "heads")

    def keep_ffn(self, scores: torch.Tensor, fraction: float) -> list[int]:
        return keep_top(scores, fraction, "MLP neurons")

    def apply(self, heads: list[list[int]] | None, ffn: list[list[int]] | None) -> nn.Module:
        if heads:
            prune_heads(self.model, heads)
        if ffn:
            prune_ffn(self.model, ffn)
        return self.model
