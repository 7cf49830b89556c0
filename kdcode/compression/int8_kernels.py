"""The matrix products behind an int8 Linear: one class per way of treating the activations.

Every kernel is built from the same stored weights, int8 ``q`` (out, in) with one float32 scale per output
channel (``w ~ q * scale``), and an optional float32 bias; it computes ``x @ w.T + bias`` for a float ``x`` of any
leading shape:

- ``per-tensor``: torch's fbgemm/x86 dynamic kernel (``torch.ops.quantized.linear_dynamic``) quantizes the
  whole input with one scale (uint8, 7 bits on fbgemm/x86). Fast and fused, but one outlier channel of one token
  sets the step for every token: Llama-style models lose most of their activations' precision.
- ``per-token``: every row of the input (a token) gets its own symmetric scale ``max|x_row| / 127`` (what
  torch.ao's ``per_token`` dynamic quantization and llama.cpp's q8_0 activations do, the latter per 32 values);
  ``torch._int_mm`` multiplies int8 by int8 into int32 (oneDNN, VNNI where the CPU has it), then the product is
  rescaled by the token's and the channel's scales.
- ``weight-only``: activations stay float32. Up to ``WEIGHT_ONLY_ROWS`` rows (decoding), ``torch.
  _weight_int8pack_mm`` reads the int8 weights and dequantizes them in registers (a memory-bound step reads a
  quarter of the bytes); longer inputs (a prompt) dequantize the weights once and run the float matmul.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

ACTIVATIONS = ("per-tensor", "per-token", "weight-only")
WEIGHT_ONLY_ROWS = 16


def reduce_range() -> bool:
    # fbgemm without VNNI adds u8*s8 pairs in int16 (vpmaddubsw), which saturates for 8-bit activations;
    # torch's own dynamic Linear uses 7-bit activations on fbgemm/x86 for that reason, and so do we.
    return torch.backends.quantized.engine in ("fbgemm", "x86")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a 2-D float tensor: (q int8, scale float32 (rows,)), ``x ~ q * scale[:, None]``."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=1).div_(127.0).clamp_min_(1e-12)
    q = torch.div(x, scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


class PerTensor:
    """fbgemm's packed weight; the input quantized with one scale per call."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        with warnings.catch_warnings():  # quantized tensor creation is deprecated in torch 2.13, still works
            warnings.simplefilter("ignore")
            zero = torch.zeros(q.size(0), dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(), zero, 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, reduce_range())

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        qw, bias = torch.ops.quantized.linear_unpack(self.packed)
        return qw.int_repr(), qw.q_per_channel_scales().float(), bias


class PerToken:
    """The weight kept transposed (in, out) for ``torch._int_mm``; each input row quantized with its own scale.

    ``channels`` (input channels, LLM.int8()'s mixed decomposition, Dettmers et al. 2022): those columns of the
    input stay float32 and meet their (dequantized) weight columns in a float32 matmul; the rest of the row is
    quantized without them, so its largest values no longer set every other value's step."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 channels: torch.Tensor | None = None) -> None:
        self.scale, self.bias, self.channels = scale.float(), bias, channels
        if channels is None:
            self.wt = q.t().contiguous()
            return
        self.rest = torch.ones(q.size(1), dtype=torch.bool)
        self.rest[channels] = False
        self.wt = q[:, self.rest].t().contiguous()
        self.w_float = (q[:, channels].float() * self.scale[:, None]).t().contiguous()  # (channels, out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        qx, sx = quantize_rows(x2 if self.channels is None else x2[:, self.rest].contiguous())
        y = torch._int_mm(qx, self.wt).mul(sx[:, None]).mul_(self.scale)
        if self.channels is not None:
            y.add_(x2[:, self.channels] @ self.w_float)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*shape[:-1], y.size(-1))

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.channels is None:
            return self.wt.t().contiguous(), self.scale, self.bias
        q = torch.empty(self.wt.size(1), self.rest.numel(), dtype=torch.int8)
        q[:, self.rest] = self.wt.t()
        q[:, self.channels] = torch.round(self.w_float.t() / self.scale[:, None]).to(torch.int8)
        return q, self.scale, self.bias


class WeightOnly:
    """int8 weights, float32 activations: the int8 kernel for short inputs, dequantize-then-matmul for long ones."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.q, self.scale, self.bias = q.contiguous(), scale.float(), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if x2.size(0) <= WEIGHT_ONLY_ROWS:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.q, self.scale)
            if self.bias is not None:
                y.add_(self.bias)
        else:
            y = torch.nn.functional.linear(x2, self.q.float().mul_(self.scale[:, None]), self.bias)
        return y.view(*shape[:-1], y.size(-1))

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.q, self.scale, self.bias


KERNELS: dict[str, Any] = {"per-tensor": PerTensor, "per-token": PerToken, "weight-only": WeightOnly}


def make_kernel(activations: str, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                channels: torch.Tensor | None = None) -> Any:
    """The kernel of ``activations``; ``channels`` (input channels kept float32) only for per-token."""
    bias = None if bias is None else bias.detach().float()
    if channels is not None:
        return PerToken(q, scale.float(), bias, channels)
    return KERNELS[activations](q, scale.float(), bias)
