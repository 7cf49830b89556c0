"""Structured pruning of Llama-style blocks (Llama, Mistral, Qwen2/3, Gemma 1-3, Granite, SmolLM3, ...): attention
heads and gated-MLP channels, scored as GPT-2's are (:func:`kdcode.compression.prune.mask_scores`), cut so that
the result is a plain transformers model of a smaller config.

A Llama-style block has ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` (``nn.Linear``).

- Heads: the score of a query head is that of a mask on its slice of ``o_proj``'s input. Under grouped-query
  attention (``n_kv`` key-value heads, each shared by ``g = n_heads / n_kv`` query heads) query heads are pruned
  within their key-value group: every group keeps its ``g - int(F g)`` best query heads and all key-value heads
  stay, so that ``num_attention_heads / num_key_value_heads`` still holds. With one query head per group
  (multi-head attention) the ``int(F n_heads)`` lowest-scoring heads go with their key and value heads.
- MLP: the score of a channel is that of a mask on ``down_proj``'s input (``act(gate) * up``); a pruned channel's
  ``gate_proj`` and ``up_proj`` rows and ``down_proj`` column go together.

Every layer keeps the same counts, so ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and
``intermediate_size`` describe the pruned model: it is rebuilt from that config and computes exactly what the
original computes with the pruned units' outputs zeroed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from kdcode.compression.prune import keep_top, mask_scores
from kdcode.errors import KdcodeError
from kdcode.inits.base import block_path

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
HEAD_SCORE = ("|sum over tokens of h . dL/dh| per query head (Michel et al. 2019, via a head mask), per batch, "
              "summed; under GQA the best of each key-value group are kept")
FFN_SCORE = ("|sum over tokens of a * dL/da| per gated-MLP channel (first-order Taylor, via a mask on down_proj's "
             "input), per batch, summed")


class LlamaPruner:
    """Scores, selects and cuts the heads and MLP channels of a model with Llama-style blocks."""

    head_score, ffn_score = HEAD_SCORE, FFN_SCORE

    def __init__(self, model: nn.Module, heads: bool, ffn: bool) -> None:
        kind = getattr(model.config, "model_type", "?")
        try:
            self.path = block_path(model)
        except KdcodeError:
            self.path = ""
        self.blocks = list(model.get_submodule(self.path)) if self.path else []
        wanted = [("self_attn", ATTENTION)] * heads + [("mlp", GATED_MLP)] * ffn
        for part, names in wanted:
            if not self.blocks or not all(_linears(b, part, names) for b in self.blocks):
                raise KdcodeError(
                    f"--prune-heads/--prune-ffn support GPT-2 and Llama-style blocks (self_attn.q/k/v/o_proj, "
                    f"mlp.gate/up/down_proj); the {part} of this {kind} model is not {part}.{'/'.join(names)}"
                )
        self.model = model
        cfg = model.config
        first = self.blocks[0]
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        if heads:
            self.head_dim = first.self_attn.q_proj.out_features // self.n_heads
            norm = getattr(first.self_attn, "q_norm", None)
            if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.numel() != self.head_dim:
                raise KdcodeError(f"--prune-heads: this {kind} model normalises its queries over all heads at once "
                                  "(q_norm), so a pruned head changes the others; prune its MLP only (--prune-ffn)")
        if ffn:
            self.channels = first.mlp.down_proj.in_features

    def units(self) -> dict[str, int]:
        """Query heads and MLP channels per layer."""
        return {"heads": self.n_heads, "ffn": getattr(self, "channels", 0)}

    def importance(self, blocks: torch.Tensor, batch_size: int, heads: bool, ffn: bool) -> dict[str, list[Any]]:
        head_sites = [(b.self_attn.o_proj, self.n_heads, self.head_dim) for b in self.blocks] if heads else []
        ffn_sites = [(b.mlp.down_proj, self.channels, 1) for b in self.blocks] if ffn else []
        scores = mask_scores(self.model, head_sites + ffn_sites, blocks, batch_size)
        return {"heads": scores[: len(head_sites)], "ffn": scores[len(head_sites) :]}

    def keep_heads(self, scores: torch.Tensor, fraction: float) -> list[int]:
        """The query heads kept in one layer: the best of each key-value group (or of all, without GQA)."""
        g = self.n_heads // self.n_kv
        if g == 1:
            return keep_top(scores, fraction, "heads")
        return [grp * g + i for grp in range(self.n_kv)
                for i in keep_top(scores[grp * g : (grp + 1) * g], fraction, "query heads of a key-value group")]

    def keep_ffn(self, scores: torch.Tensor, fraction: float) -> list[int]:
        return keep_top(scores, fraction, "MLP channels")

    def apply(self, heads: list[list[int]] | None, ffn: list[list[int]] | None) -> nn.Module:
        """The model rebuilt from the smaller config with the kept units' weights (the original is left as is)."""
        config = copy.deepcopy(self.model.config)
        state = dict(self.model.state_dict())
        g = self.n_heads // self.n_kv
        for i in range(len(self.blocks)):
            pre = f"{self.path}.{i}."
            if heads:
                q = heads[i]
                kv = sorted({h // g for h in q})
                _cut(state, pre + "self_attn.q_proj", _rows(q, self.head_dim), out=True)
                for name in ("k_proj", "v_proj"):
                    _cut(state, pre + f"self_attn.{name}", _rows(kv, self.head_dim), out=True)
                _cut(state, pre + "self_attn.o_proj", _rows(q, self.head_dim), out=False)
                config.num_attention_heads, config.num_key_value_heads = len(q), len(kv)
                config.head_dim = self.head_dim
            if ffn:
                idx = torch.tensor(ffn[i])
                for name in ("gate_proj", "up_proj"):
                    _cut(state, pre + f"mlp.{name}", idx, out=True)
                _cut(state, pre + "mlp.down_proj", idx, out=False)
                config.intermediate_size = len(ffn[i])
        dtype = next(self.model.parameters()).dtype
        try:
            pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
            pruned.load_state_dict(state)
        except (RuntimeError, ValueError) as exc:  # a family that sizes its heads another way than config.head_dim
            first = " ".join(str(exc).split())[:160]
            raise KdcodeError(f"the pruned {config.model_type} model cannot be rebuilt from its config ({first}); "
                              "prune its MLP only (--prune-ffn)") from exc
        if getattr(config, "tie_word_embeddings", False):
            pruned.tie_weights()
        return pruned.train(self.model.training)


def _linears(block: nn.Module, part: str, names: tuple[str, ...]) -> bool:
    module = getattr(block, part, None)
    return module is not None and all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _rows(units: list[int], width: int) -> torch.Tensor:
    """The feature indices of ``units``, each ``width`` wide."""
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


def _cut(state: dict[str, torch.Tensor], module: str, idx: torch.Tensor, out: bool) -> None:
    """Keep the output features ``idx`` of a Linear (its weight's rows and its bias), or its input features."""
    w = state[f"{module}.weight"]
    state[f"{module}.weight"] = (w[idx] if out else w[:, idx]).clone()
    if out and f"{module}.bias" in state:
        state[f"{module}.bias"] = state[f"{module}.bias"][idx].clone()
