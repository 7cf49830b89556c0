"""Int8 weights for CPU inference: post-training dynamic quantization of every Linear / GPT-2 Conv1D.

Every ``nn.Linear`` and GPT-2 ``Conv1D`` weight is stored as int8 with one float32 scale per output channel
(symmetric: ``scale = max|w| / 127``, ``q = round(w / scale)``), so ``|w - q * scale| <= scale / 2``;
the activations are treated as the scheme says (:mod:`kdcode.compression.int8_kernels`): quantized per tensor
(``per-tensor``, torch's fbgemm/x86 ``linear_dynamic``: the scheme of folders written before schemes existed),
per token (``per-token``), or kept float32 (``weight-only``); per token, some input channels of the LM head may
stay float32 (``head_channels``, LLM.int8()'s decomposition). A LM head tied to the input embedding is quantized
once: the embedding reads the same int8 rows and dequantizes them. Biases, layer norms and position embeddings stay
float32. An int8 folder holds ``model_int8.safetensors`` with ``<module>.weight_int8`` /
``<module>.weight_scale`` keys. This module knows nothing of folders or manifests.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kdcode.compression.int8_kernels import ACTIVATIONS, make_kernel, reduce_range
from kdcode.errors import KdcodeError

INT8_FILE = "model_int8.safetensors"
_WEIGHTS = (
    "weights int8 symmetric per output channel (scale = max|w|/127, w ~ q*scale), stored (out, in) as "
    "<module>.weight_int8 + float32 <module>.weight_scale; "
)
_REST = "; bias, norms, position embeddings float32"
ACTIVATION_TEXT = {
    "per-tensor": "activations quantized dynamically per tensor (uint8) by torch.ops.quantized.linear_dynamic",
    "per-token": "activations quantized dynamically per token (int8, scale = max|x_row|/127), int8 x int8 -> int32 "
    "by torch._int_mm, rescaled by token x channel scales",
    "weight-only": "activations float32: torch._weight_int8pack_mm up to 16 rows, dequantized weights and a "
    "float32 matmul for longer inputs",
}
INT8_SCHEME = _WEIGHTS + ACTIVATION_TEXT["per-tensor"] + _REST  # the text folders without 'activations' carry


def scheme_text(activations: str) -> str:
    return _WEIGHTS + ACTIVATION_TEXT[activations] + _REST


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 (rows, cols), scale float32 (rows,)) with |w - q*scale| <= scale/2."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # an all-zero row: any scale is exact
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def _check_activations(activations: str) -> str:
    if activations not in ACTIVATIONS:
        raise KdcodeError(f"unknown int8 activations {activations!r}; expected one of {', '.join(ACTIVATIONS)}")
    return activations


def _check_channels(channels: list[int] | None, activations: str, in_features: int) -> list[int] | None:
    if not channels:
        return None
    if activations != "per-token":
        raise KdcodeError(f"float32 input channels are for per-token activations, not {activations}")
    integers = all(isinstance(c, int) and not isinstance(c, bool) for c in channels)
    if not integers or len(set(channels)) != len(channels) or not all(0 <= c < in_features for c in channels):
        raise KdcodeError(f"float32 input channels must be distinct and within 0-{in_features - 1}")
    return sorted(channels)


def _channels(channels: list[int] | None) -> torch.Tensor | None:
    return None if channels is None else torch.tensor(channels, dtype=torch.long)


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T + bias`` on the int8 kernel of ``activations``; holds only what the kernel needs.

    Its state dict is ``weight_int8`` (out, in) int8, ``weight_scale`` (out,) float32 and ``bias``, whatever the
    kernel. ``float_channels`` (per-token only): input channels kept float32 (:class:`~kdcode.compression.
    int8_kernels.PerToken`); the layout records them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: str = "per-tensor",
                 float_channels: list[int] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.activations = _check_activations(activations)
        self.float_channels = _check_channels(float_channels, activations, in_features)
        self.set_weight(
            torch.zeros(out_features, in_features, dtype=torch.int8),
            torch.ones(out_features),
            torch.zeros(out_features) if bias else None,
        )

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._kernel = make_kernel(self.activations, q, scale, bias, _channels(self.float_channels))

    @classmethod
    def from_float(cls, module: nn.Module, activations: str = "per-tensor",
                   float_channels: list[int] | None = None) -> Int8Linear:
        w = module.weight.detach()
        w = w.t() if isinstance(module, Conv1D) else w  # Conv1D stores (in, out)
        new = cls(w.size(1), w.size(0), module.bias is not None, activations, float_channels)
        new.set_weight(*quantize_int8(w), module.bias)
        return new

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self._kernel.unpacked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise KdcodeError("int8 models run on CPU only (torch's dynamic int8 kernels); use --device cpu")
        return self._kernel(x)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        q, scale, bias = self.unpacked()
        destination[prefix + "weight_int8"] = q
        destination[prefix + "weight_scale"] = scale
        if bias is not None:
            destination[prefix + "bias"] = bias

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing: Any,
        unexpected: Any,
        errors: Any,
    ) -> None:
        names = ["weight_int8", "weight_scale"] + (["bias"] if self.has_bias else [])
        absent = [prefix + n for n in names if prefix + n not in state_dict]
        if absent:
            missing.extend(absent)
            return
        q, scale = state_dict[prefix + "weight_int8"], state_dict[prefix + "weight_scale"]
        if tuple(q.shape) != (self.out_features, self.in_features) or q.dtype != torch.int8:
            errors.append(
                f"{prefix}weight_int8: {q.dtype} {tuple(q.shape)}, expected int8 "
                f"{(self.out_features, self.in_features)}"
            )
            return
        self.set_weight(q, scale, state_dict.get(prefix + "bias"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, int8, "
                f"activations {self.activations}")


class Int8Embedding(nn.Module):
    """An embedding whose rows are int8 with one scale per row (the tied LM head reads the same rows)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))
        self.version = 0  # bumped on every load, so that a tied head repacks

    @classmethod
    def from_float(cls, module: nn.Embedding) -> Int8Embedding:
        new = cls(*module.weight.shape)
        new.weight_int8, new.weight_scale = quantize_int8(module.weight)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].float() * self.weight_scale[ids].unsqueeze(-1)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.version += 1


class Int8TiedHead(nn.Module):
    """The LM head tied to an :class:`Int8Embedding`: packs its int8 rows once; stores nothing of its own."""

    def __init__(self, embedding: Int8Embedding, activations: str = "per-tensor",
                 float_channels: list[int] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: its tensors are saved once
        self.activations = _check_activations(activations)
        self.float_channels = _check_channels(float_channels, activations, embedding.weight_int8.size(1))
        self._kernel: Any = None
        self._version = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise KdcodeError("int8 models run on CPU only (torch's dynamic int8 kernels); use --device cpu")
        emb = self.embedding
        if self._kernel is None or self._version != emb.version:
            self._kernel = make_kernel(self.activations, emb.weight_int8, emb.weight_scale, None,
                                       _channels(self.float_channels))
            self._version = emb.version
        return self._kernel(x)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def tied_names(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding, LM head) module names when the head's weight is the embedding's."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or not isinstance(inp, nn.Embedding) or out.weight is not inp.weight:
        return None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return names[id(inp)], names[id(out)]


def head_name(model: nn.Module) -> str | None:
    """The module name of the LM head (the output embeddings), None when the model has none."""
    out = model.get_output_embeddings()
    return next((n for n, m in model.named_modules(remove_duplicate=False) if m is out), None) if out else None


def quantize_model(model: nn.Module, activations: str = "per-tensor",
                   head_channels: list[int] | None = None) -> dict[str, Any]:
    """Replace every Linear / Conv1D by :class:`Int8Linear` (in place); ``head_channels``: input channels of the LM
    head kept float32 (per-token only). Returns the int8 layout."""
    _check_activations(activations)
    tied = tied_names(model)
    if tied and getattr(model.get_submodule(tied[1]), "bias", None) is not None:
        raise KdcodeError("a tied LM head with a bias is not supported by --int8")
    out_name = head_name(model)
    targets = [n for n, m in model.named_modules() if _is_linear(m) and (not tied or n != tied[1])]
    for name in targets:
        model.set_submodule(name, Int8Linear.from_float(model.get_submodule(name), activations,
                                                        head_channels if name == out_name else None))
    if tied:
        emb = Int8Embedding.from_float(model.get_submodule(tied[0]))
        model.set_submodule(tied[0], emb)
        model.set_submodule(tied[1], Int8TiedHead(emb, activations, head_channels))
    head_float = model.get_output_embeddings().float_channels if head_channels else None  # checked and sorted
    return {
        "scheme": scheme_text(activations) + (f"; the LM head's {len(head_float)} input channels of largest "
                                              "calibration values kept float32" if head_float else ""),
        "activations": activations,
        "head_float_channels": head_float,
        "file": INT8_FILE,
        "modules": targets,
        "tied": {"embedding": tied[0], "head": tied[1]} if tied else None,
        "reduce_range": reduce_range() if activations == "per-tensor" else None,
    }


def apply_int8_layout(model: nn.Module, layout: dict[str, Any]) -> None:
    """Put empty int8 modules where ``layout`` says (shapes from the float skeleton); load fills them. A layout
    without ``activations`` (written before schemes existed) is per-tensor."""
    activations = layout.get("activations") or "per-tensor"
    head_channels = layout.get("head_float_channels")
    out_name = head_name(model)
    for name in layout["modules"]:
        m = model.get_submodule(name)
        if not _is_linear(m):
            raise KdcodeError(f"int8 layout names {name}, which is not a Linear/Conv1D in this architecture")
        in_f, out_f = (m.weight.shape[0], m.weight.shape[1]) if isinstance(m, Conv1D) else m.weight.shape[::-1]
        model.set_submodule(name, Int8Linear(int(in_f), int(out_f), m.bias is not None, activations,
                                             head_channels if name == out_name else None))
    tied = layout.get("tied")
    if tied:
        emb = Int8Embedding(*model.get_submodule(tied["embedding"]).weight.shape)
        model.set_submodule(tied["embedding"], emb)
        model.set_submodule(tied["head"], Int8TiedHead(emb, activations, head_channels))


def memory_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory: parameters and buffers (once each), packed int8 weights."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.in_features * m.out_features + 4 * m.out_features * (2 if m.has_bias else 1)
        elif isinstance(m, Int8TiedHead):  # a packed or transposed copy of the rows; weight-only reads them as is
            total += m.embedding.weight_int8.numel() if m.activations != "weight-only" else 0
    return total


def int8_param_count(model: nn.Module) -> int:
    """Weights held as int8 (not in ``model.parameters()``), the tied head's counted once."""
    return sum(
        m.in_features * m.out_features + (m.out_features if m.has_bias else 0)
        for m in model.modules()
        if isinstance(m, Int8Linear)
    ) + sum(m.weight_int8.numel() for m in model.modules() if isinstance(m, Int8Embedding))
