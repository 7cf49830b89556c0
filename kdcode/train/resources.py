"""What a training run may use: its precision, the memory one step needs, the context its blocks fit in."""

from __future__ import annotations

import os
from typing import Any

import psutil
import torch

from kdcode.device import cpu_has_bf16
from kdcode.errors import KdcodeError
from kdcode.models.load import context_length

# Activation memory of one training step, per token, per unit of width, per layer, in bytes. A GPT-2
# block keeps about 34 bytes per token per hidden unit for the backward pass in 16-bit training
# (Korthikanti et al. 2022, "Reducing Activation Recomputation", without the attention-score term);
# fp32 keeps about twice that. Taking the lower figure and leaving out weights, optimiser state and
# attention scores keeps the estimate an underestimate: the guard only fires on runs that cannot fit.
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 34
# Logits are fp32 (4 bytes) and held about three times: the logits, their (log-)softmax, the gradient.
LOGIT_COPIES = 3


def pick_precision(requested: str, device: Any) -> str:
    """The autocast precision of a run: ``auto`` is bf16 where the hardware runs it natively, else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if requested == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise KdcodeError("precision bf16 was asked for, but this CPU has no native bf16; use fp32")
    if requested == "fp16" and device.type != "cuda":
        raise KdcodeError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return requested


def recompute_activations(model: Any, on: bool) -> None:
    """Turn activation (gradient) checkpointing of ``model``'s blocks on or off; a family without it is one line."""
    if not on:  # (transformers 5 renamed gradient checkpointing; its old names warn)
        new = hasattr(type(model), "is_activation_checkpointing")
        if getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False):
            (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise KdcodeError(f"{type(model).__name__} cannot recompute its activations (no gradient checkpointing in "
                          "transformers for it); drop activation_checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def launcher() -> str:
    """How this process was started: plain, ``torchrun`` or ``accelerate launch``."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION") is not None or os.environ.get("ACCELERATE_USE_CPU"):
        return "accelerate"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    return "none" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "distributed"


def estimate_step_bytes(batch: int, block: int, hidden: int, layers: int, vocab: int) -> int:
    """A conservative estimate of one training step's activation memory (see the constants above)."""
    tokens = batch * block
    return tokens * hidden * layers * ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER + tokens * vocab * 4 * LOGIT_COPIES


def available_memory(device: Any) -> int:
    """Free bytes where training runs: free CUDA memory on a GPU, available RAM on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(batch: int, block: int, hidden: int, layers: int, vocab: int, device: Any) -> int:
    """Fail before training when one step's estimated activations exceed the available memory.

    Returns the estimate in bytes. The message gives both numbers and the largest batch that would fit.
    """
    need = estimate_step_bytes(batch, block, hidden, layers, vocab)
    have = available_memory(device)
    if need > have:
        fits = have // max(estimate_step_bytes(1, block, hidden, layers, vocab), 1)
        hint = f"use --batch-size {fits} or lower --block-size" if fits >= 1 else "lower --block-size"
        raise KdcodeError(
            f"one training step needs about {_size(need)} of activation memory (batch {batch} x block {block}, "
            f"{layers} layers of width {hidden}, vocab {vocab}), but only {_size(have)} is free on {device.type}; "
            f"{hint}"
        )
    return need


def check_block_size(model: Any, block_size: int, what: str) -> None:
    """Refuse training blocks longer than ``model`` has positions for."""
    n_pos = context_length(model.config)
    if n_pos is not None and block_size > n_pos:
        raise KdcodeError(f"--block-size {block_size} exceeds {what}'s {n_pos} positions; use --block-size {n_pos}")
