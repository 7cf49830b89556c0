"""SmoothQuant-style outlier migration (Xiao et al. 2023): move the scale of outlier activation channels into the
weights that read them, so that one activation scale per tensor fits every channel better.

For a group of Linears that read the same input ``x`` (in, per input channel ``j``), with ``a_j`` the largest
``|x_j|`` seen on calibration blocks and ``w_j`` the largest ``|W[:, j]|`` over the group:
``s_j = a_j ** alpha / w_j ** (1 - alpha)``; the producer of ``x`` is divided by ``s`` and every reader's column
``j`` multiplied by it, which leaves the float model's output unchanged:

- a norm before attention / MLP (``weight`` and ``bias`` divided by ``s``): GPT-2's ``ln_1 -> c_attn``,
  ``ln_2 -> c_fc``; Llama-style ``input_layernorm -> q/k/v_proj``, ``post_attention_layernorm -> gate/up_proj``;
- in a gated MLP, ``up_proj``'s rows (``down_proj`` reads ``act(gate) * up``, linear in ``up``): ``up -> down``.

Other Linears (attention output, GPT-2's MLP output, the LM head) keep their inputs as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kdcode.device import cpu_has_int8_dot
from kdcode.errors import KdcodeError
from kdcode.inits.base import block_path

_WHO = "--int8-scheme smoothquant and smooth-per-token"  # the schemes that run the migration
Group = tuple[nn.Module, str, list[nn.Module]]  # producer, how it is scaled ("norm" or "rows"), readers


def _weight_in_out(m: nn.Module) -> torch.Tensor:
    """A reader's weight as (out, in) (a GPT-2 Conv1D stores (in, out)); a view, so that scaling it scales m."""
    return m.weight.data.t() if isinstance(m, Conv1D) else m.weight.data


def smoothing_groups(model: nn.Module) -> list[Group]:
    """Every (producer, kind, readers) of a GPT-2 or Llama-style model (see the module doc)."""
    kind = getattr(model.config, "model_type", "?")
    blocks = getattr(getattr(model, "transformer", None), "h", None) if kind == "gpt2" else None
    if blocks is not None:
        return [g for b in blocks for g in ((b.ln_1, "norm", [b.attn.c_attn]), (b.ln_2, "norm", [b.mlp.c_fc]))]
    try:
        blocks = list(model.get_submodule(block_path(model)))
    except KdcodeError:
        blocks = []
    groups: list[Group] = []
    for b in blocks:
        attn, mlp = getattr(b, "self_attn", None), getattr(b, "mlp", None)
        norms = (getattr(b, "input_layernorm", None), getattr(b, "post_attention_layernorm", None))
        names = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")
        if not all(norms) or attn is None or mlp is None or not all(
            isinstance(getattr(part, n, None), nn.Linear) for part, ns in zip((attn, mlp), names) for n in ns
        ) or "gemma" in type(norms[0]).__name__.lower():  # Gemma's norms scale by (1 + weight)
            raise KdcodeError(f"{_WHO} support GPT-2 and Llama-style blocks (input_layernorm, self_attn.q/k/v_proj, "
                              f"post_attention_layernorm, mlp.gate/up/down_proj); this {kind} model is not; use "
                              "--int8-scheme per-token or weight-only")
        groups += [(norms[0], "norm", [attn.q_proj, attn.k_proj, attn.v_proj]),
                   (norms[1], "norm", [mlp.gate_proj, mlp.up_proj]), (mlp.up_proj, "rows", [mlp.down_proj])]
    if not groups:
        raise KdcodeError(f"{_WHO} support GPT-2 and Llama-style blocks; this {kind} model has none")
    return groups


@torch.no_grad()
def input_maxima(model: nn.Module, readers: list[nn.Module], blocks: torch.Tensor, batch_size: int) -> list[Any]:
    """The largest ``|x_j|`` of each reader's input, per input channel, over the calibration blocks."""
    maxima: list[Any] = [None] * len(readers)

    def hook(i: int) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().abs().float().reshape(-1, args[0].size(-1)).amax(0)
            maxima[i] = a if maxima[i] is None else torch.maximum(maxima[i], a)

        return record

    hooks = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(readers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(blocks), batch_size):
            model(blocks[start : start + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return maxima


@torch.no_grad()
def smooth_model(model: nn.Module, blocks: torch.Tensor, batch_size: int, alpha: float) -> dict[str, Any]:
    """Migrate activation outliers into the weights (in place; the float model computes the same); returns
    what the manifest records."""
    groups = smoothing_groups(model)
    maxima = input_maxima(model, [g[2][0] for g in groups], blocks, batch_size)
    largest = []
    for (producer, kind, readers), a in zip(groups, maxima):
        w = torch.stack([_weight_in_out(r).abs().amax(0) for r in readers]).amax(0)
        s = (a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)).clamp(1e-5, 1e5)
        s = torch.where(a > 0, s, torch.ones_like(s))
        largest.append(float(a.max()))
        for r in readers:
            _weight_in_out(r).mul_(s.to(r.weight.dtype))
        target = producer.weight.data if kind == "norm" else _weight_in_out(producer)
        if kind == "norm":
            target.div_(s.to(target.dtype))
        else:
            target.div_(s.to(target.dtype)[:, None])
        if getattr(producer, "bias", None) is not None:
            producer.bias.data.div_(s.to(producer.bias.dtype))
    return {"alpha": alpha, "groups": len(groups), "max_abs_input": round(max(largest), 3)}


def largest_channels(model: nn.Module, module: nn.Module, blocks: torch.Tensor, batch_size: int, k: int) -> list[int]:
    """The ``k`` input channels of ``module`` with the largest ``|x_j|`` on the calibration blocks (ascending); all
    of them when it has no more than ``k``. For LLM.int8()-style float channels: what one token's scale must cover."""
    maxima = input_maxima(model, [module], blocks, batch_size)[0]
    k = min(k, maxima.numel())
    return sorted(int(j) for j in maxima.topk(k).indices)


def int8_scheme_for(model: nn.Module, requested: str) -> tuple[str, str | None]:
    """The int8 scheme ``requested`` names, and for ``auto`` the one that pays and keeps the model here, with why:
    smooth-per-token on a CPU with int8 dot products (VNNI / AMX-INT8) for GPT-2 and Llama-style blocks (the only
    scheme measured within 1 ES and 3% perplexity on a real model, 1.7x fp32 there), else weight-only (any model,
    any CPU, no calibration; activations stay float, so it saves memory, not time)."""
    if requested != "auto":
        return requested, None
    if not cpu_has_int8_dot():
        return "weight-only", "auto: this CPU has no int8 dot products (VNNI / AMX-INT8), so int8 activations " \
                              "would not pay; weights stored int8, activations float"
    try:
        smoothing_groups(model)
    except KdcodeError:
        kind = getattr(model.config, "model_type", "?")
        return "weight-only", f"auto: the {kind} blocks are not GPT-2 or Llama-style, which the outlier migration " \
                              "needs; weights stored int8, activations float"
    return "smooth-per-token", "auto: this CPU has int8 dot products and the blocks are GPT-2 or Llama-style"
