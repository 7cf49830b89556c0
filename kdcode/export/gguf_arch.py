"""How a Hugging Face causal LM maps onto llama.cpp's GGUF layout: the architecture name, its hyper-parameter
keys and its tensors, named through the ``gguf`` package's own tensor map.

GPT-2 (``gpt2``) and Llama (``llama``) are mapped; anything llama.cpp would run differently from transformers is
refused with its reason (an exact-erf GELU in a GPT-2, scaled RoPE, ...), since a GGUF that loads but computes
something else is worse than none. Layout facts (what llama.cpp's converter does, written here from scratch):

- GPT-2 stores its projections as ``Conv1D`` (in, out); GGUF wants (out, in), as ``nn.Linear`` stores them.
- llama.cpp's ``llama`` architecture rotates adjacent pairs (2i, 2i+1) of each head, transformers rotates
  (i, i + d/2): the rows of ``q_proj`` and ``k_proj`` are reordered so that both compute the same thing.
- A tied LM head is left out: llama.cpp reads the token embedding in its place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcode.errors import KdcodeError

SUPPORTED = "GPT-2 (model_type gpt2) and Llama (model_type llama)"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's GPT-2 uses the tanh approximation
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


@dataclass(frozen=True)
class GgufArch:
    """One architecture: llama.cpp's name for it, its hyper-parameters and its tensors in GGUF layout."""

    name: str
    check: Callable[[Any], None]  # raises KdcodeError when llama.cpp would compute something else
    hparams: Callable[[Any, Any], None]  # (gguf.GGUFWriter, config)
    layout: Callable[[str, np.ndarray, Any], np.ndarray]  # (HF name, float32 array, config) -> GGUF layout


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise KdcodeError(f"cannot export to GGUF: {why}")


# ---------------------------------------------------------------------------------------------- GPT-2
def _gpt2_check(config: Any) -> None:
    act = getattr(config, "activation_function", "gelu_new")
    _need(act in _TANH_GELUS, f"activation_function {act!r}; llama.cpp's GPT-2 uses the tanh GELU ({_TANH_GELUS[0]})")
    _need(getattr(config, "scale_attn_weights", True),
          "scale_attn_weights=False (llama.cpp always scales by 1/sqrt(d))")
    _need(not getattr(config, "scale_attn_by_inverse_layer_idx", False),
          "scale_attn_by_inverse_layer_idx=True has no llama.cpp equivalent")
    _need(not getattr(config, "add_cross_attention", False), "cross-attention layers have no GGUF form")


def _gpt2_hparams(w: Any, c: Any) -> None:
    w.add_context_length(int(c.n_positions))
    w.add_embedding_length(int(c.n_embd))
    w.add_feed_forward_length(int(c.n_inner or 4 * c.n_embd))
    w.add_block_count(int(c.n_layer))
    w.add_head_count(int(c.n_head))
    w.add_layer_norm_eps(float(c.layer_norm_epsilon))


def _gpt2_layout(name: str, data: np.ndarray, config: Any) -> np.ndarray:
    return np.ascontiguousarray(data.T) if name.endswith(_CONV1D) else data


# ---------------------------------------------------------------------------------------------- Llama
def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _llama_check(config: Any) -> None:
    act = getattr(config, "hidden_act", "silu")
    _need(act == "silu", f"hidden_act {act!r}; llama.cpp's Llama uses SiLU")
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    _need(kind == "default", f"rope scaling {kind!r} is not exported (only plain RoPE)")
    _need(_head_dim(config) % 2 == 0, "an odd head size cannot be rotated")


def _llama_hparams(w: Any, c: Any) -> None:
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_block_count(int(c.num_hidden_layers))
    w.add_head_count(int(c.num_attention_heads))
    w.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(c))
    w.add_rope_dimension_count(_head_dim(c))
    w.add_vocab_size(int(c.vocab_size))
    if _head_dim(c) * c.num_attention_heads != c.hidden_size:
        w.add_key_length(_head_dim(c))
        w.add_value_length(_head_dim(c))


def _pairs_adjacent(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection reordered from (i, i + d/2) rotation pairs to adjacent (2i, 2i + 1) ones."""
    rows = w.shape[0]
    half = rows // heads // 2
    return np.ascontiguousarray(w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _llama_layout(name: str, data: np.ndarray, config: Any) -> np.ndarray:
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return _pairs_adjacent(data, int(config.num_attention_heads))
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return _pairs_adjacent(data, int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    return data


ARCHS = {
    "gpt2": GgufArch("gpt2", _gpt2_check, _gpt2_hparams, _gpt2_layout),
    "llama": GgufArch("llama", _llama_check, _llama_hparams, _llama_layout),
}


def arch_of(config: Any) -> GgufArch:
    """The GGUF architecture of a transformers config; one clear error for the others and for what would differ."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise KdcodeError(f"cannot export a {kind!r} model to GGUF: kdcode exports {SUPPORTED}")
    ARCHS[kind].check(config)
    return ARCHS[kind]


def _tied(model: Any) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def gguf_tensors(model: Any, arch: GgufArch) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of ``model`` as (GGUF name, float32 array in GGUF layout); a tied LM head is left out.
    A tensor the map does not know is an error, not a silent drop."""
    import gguf
    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    names = gguf.get_tensor_name_map(arch_id, int(config.num_hidden_layers))
    tied = _tied(model)
    for name, tensor in model.state_dict().items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias") or "rotary_emb" in name:
            continue  # GPT-2's causal-mask buffers and RoPE tables: recomputed by llama.cpp
        if tied and name == "lm_head.weight":
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise KdcodeError(f"cannot export tensor {name} to GGUF: llama.cpp's {arch.name} has no place for it")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        yield mapped, arch.layout(name, data, config)
