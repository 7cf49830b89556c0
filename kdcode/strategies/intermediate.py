"""Intermediate-layer KD (TinyBERT, Jiao et al., 2020; MiniLM-style attention transfer, Wang et al., 2020).

For each student block i mapped to teacher block m(i) (default: the init's layer map; a random init
gets the evenly spaced map), with h the block outputs and W_i a learned linear projection when the
student is narrower than the teacher (identity otherwise):

    L = a_soft * T^2 * KL(softmax(t/T) || softmax(s/T)) + a_hard * CE(s, y)
        + a_hid * mean_i MSE(W_i h_s_i, h_t_m(i)) + a_attn * mean_i MSE(A_s_i, A_t_m(i))

The attention term compares attention probabilities and needs equal head counts (and eager attention,
set on both models when a_attn > 0). Frozen teacher.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from kdcode.errors import KdcodeError
from kdcode.inits.base import evenly_spaced
from kdcode.strategies.base import Strategy, WeightParams, weighted
from kdcode.strategies.divergences import kd_terms
from kdcode.strategies.losses import IGNORE, masked_mean


class IntermediateParams(WeightParams):
    renamed: ClassVar[dict[str, str]] = {"alpha_ce": "alpha_soft", "alpha_clm": "alpha_hard"}

    alpha_soft: float = Field(0.5, ge=0, description="weight of the soft loss: T^2 KL(teacher || student)")
    alpha_hard: float = Field(0.5, ge=0, description="weight of the hard causal-LM loss")
    alpha_hid: float = Field(1.0, ge=0, description="weight of the hidden-state MSE")
    alpha_attn: float = Field(0.0, ge=0, description="weight of the attention-map MSE")
    layer_map: list[int] | None = Field(None, description="teacher block for each student block (default: init's)")


class IntermediateKD(Strategy):
    summary = "hidden-state (and attention-map) MSE on a layer map, projected when widths differ, + logit KD"
    Params = IntermediateParams
    params: IntermediateParams

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.layer_map: list[int] = []
        self.projections: torch.nn.ModuleList | None = None

    @property
    def needs_hidden_states(self) -> bool:
        return self.params.alpha_hid > 0

    @property
    def needs_attentions(self) -> bool:
        return self.params.alpha_attn > 0

    def setup(self, student: Any, teacher: Any | None, layer_map: list[int | None] | None) -> list[torch.nn.Module]:
        assert teacher is not None
        n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        chosen = self.params.layer_map or (list(layer_map) if layer_map and None not in layer_map else None)
        if chosen is None:
            chosen = evenly_spaced(n_t, n_s)
        if len(chosen) != n_s or not all(0 <= j < n_t for j in chosen):
            raise KdcodeError(
                f"intermediate layer_map {chosen} must name one teacher block (0..{n_t - 1}) per student block ({n_s})"
            )
        self.layer_map = [int(j) for j in chosen]
        d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
        if self.needs_attentions:
            if student.config.num_attention_heads != teacher.config.num_attention_heads:
                raise KdcodeError("alpha_attn needs equal head counts in student and teacher; set alpha_attn 0")
            for m in (student, teacher):
                m.set_attn_implementation("eager")
        if d_s != d_t:
            self.projections = torch.nn.ModuleList(torch.nn.Linear(d_s, d_t, bias=False) for _ in range(n_s))
            return [self.projections.to(next(student.parameters()).device)]
        return []

    def loss(self, student: Any, teacher: Any | None, labels: torch.Tensor, progress: float = 0.0):
        p = self.params
        assert teacher is not None, "intermediate KD needs teacher outputs"
        soft, hard = kd_terms(student.logits, teacher, labels, p.temperature_at(progress), self.vocab, self.chunk)
        terms = {"soft": soft, "hard": hard}
        weights = {"soft": p.alpha_soft, "hard": p.alpha_hard}
        counted = labels != IGNORE  # every position's hidden state, as it is (no shift)
        if p.alpha_hid > 0:
            mses = []
            for i, j in enumerate(self.layer_map):
                h_s = student.hidden_states[i + 1].float()  # [0] is the embedding output
                h_t = teacher.hidden_states[j + 1].detach().float()
                if self.projections is not None:
                    h_s = self.projections[i](h_s)
                mses.append(masked_mean(((h_s - h_t) ** 2).mean(-1), counted))
            terms["hid"] = torch.stack(mses).mean()
            weights["hid"] = p.alpha_hid
        if p.alpha_attn > 0:
            errs = [
                F.mse_loss(student.attentions[i].float(), teacher.attentions[j].detach().float())
                for i, j in enumerate(self.layer_map)
            ]
            terms["attn"] = torch.stack(errs).mean()
            weights["attn"] = p.alpha_attn
        return weighted(terms, weights)
