"""Rebuild a folder that plain transformers cannot load: head-pruned (layers with fewer heads than
``n_head``: transformers 5 has no ``prune_heads``) and/or int8 (``model_int8.safetensors``), from
``kdcode.json``'s ``compression.layout``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from kdcode.compression.int8 import apply_int8_layout, tied_names
from kdcode.compression.prune import resize_heads
from kdcode.errors import KdcodeError
from kdcode.models.artifacts import weight_files


def load_compressed(path: Path, manifest: dict[str, Any]) -> nn.Module:
    """Rebuild a head-pruned and/or int8 folder: float architecture from config, reshaped, then its weights."""
    layout = manifest["compression"]["layout"]
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config)
    if layout.get("heads_per_layer"):
        resize_heads(model, layout["heads_per_layer"])
    int8 = layout.get("int8")
    if int8:
        model.float()  # what is not int8 was saved as float32
        apply_int8_layout(model, int8)
    else:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        state.update(load_file(str(f)))
    tied = tied_names(model) if not int8 else None
    expected = set(model.state_dict()) - ({f"{tied[1]}.weight"} if tied else set())  # saved once, as the embedding
    bad = sorted(expected ^ set(state))
    if bad:
        raise KdcodeError(f"cannot rebuild the compressed model in {path}: weights do not fit its layout ({bad[:4]})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise KdcodeError(
            f"cannot rebuild the compressed model in {path}: {str(exc).splitlines()[-1].strip()}"
        ) from exc
    return model.eval()
