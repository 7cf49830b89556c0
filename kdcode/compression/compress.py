"""`kdcode compress`: prune, then quantize or cast a model folder, keeping the manifest chain.

Steps run in a fixed order, each optional: **prune** (attention heads and/or MLP neurons of a GPT-2;
:mod:`kdcode.compression.prune`), then **store** (``--dtype fp16|bf16``, or ``--int8``;
:mod:`kdcode.compression.int8`). fp16/bf16 and FFN-pruned folders are plain Hugging Face folders;
head-pruned and int8 folders load through :func:`kdcode.models.load_model`, which rebuilds them from
``kdcode.json``'s ``compression.layout`` (:mod:`kdcode.compression.load`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcode.compression.int8 import INT8_FILE, INT8_SCHEME, quantize_model
from kdcode.compression.prune import (
    FFN_SCORE,
    HEAD_SCORE,
    gpt2_blocks,
    heads_per_layer,
    keep_top,
    prune_ffn,
    prune_heads,
    unit_importance,
)
from kdcode.errors import KdcodeError
from kdcode.spec import CompressSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def calibration_blocks(spec: CompressSpec, tokenizer: Any, n_positions: int) -> torch.Tensor:
    """The first ``calib_batches * calib_batch_size`` blocks of the corpus's train split (all files if empty)."""
    from kdcode.data import encode_documents, load_corpus, to_blocks

    corpus = load_corpus(spec.data)
    docs = corpus.splits.get("train") or [d for s in corpus.splits.values() for d in s]
    block = min(spec.calib_block_size or 256, n_positions)
    need = spec.calib_batches * spec.calib_batch_size
    stream: list[int] = []
    for i in range(0, len(docs), 16):
        stream += encode_documents(docs[i : i + 16], tokenizer)
        if len(stream) >= need * block:
            break
    return to_blocks(stream, block)[:need]


class _Int8Folder:
    """What :func:`kdcode.artifacts.save_model` writes for an int8 model: config + int8 safetensors."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def save_pretrained(self, path: Path, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        self.model.config.save_pretrained(path)
        gen = getattr(self.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(path)
        tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(Path(path) / INT8_FILE), metadata={"format": "pt", "kdcode": "int8"})


def run_compress(
    name: str, spec: CompressSpec, out: Path, overwrite: bool = False, verify: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Load ``name``, prune then quantize / cast it as ``spec`` says, and write ``out`` with the manifest chain."""
    from kdcode.artifacts import check_output, kdcode_layout, save_model, weights_sha256
    from kdcode.models import context_length, count_params, load_model, resolve_path, weights_bytes

    if spec.int8 and spec.dtype not in (None, "fp32"):
        raise KdcodeError(f"--int8 keeps the non-quantized tensors in fp32; drop --dtype {spec.dtype}")
    if not (spec.int8 or spec.dtype or spec.prune_heads or spec.prune_ffn):
        raise KdcodeError("nothing to do: pass --dtype, --int8, --prune-heads and/or --prune-ffn")
    inputs = {"MODEL": resolve_path(name), "--data": spec.data.source if spec.data.source != "stdlib" else None}
    check_output(out, overwrite, inputs, need_bytes=weights_bytes(name))
    lm = load_model(name, check=verify)
    model = lm.model
    if kdcode_layout(lm.manifest).get("int8"):
        raise KdcodeError(f"{name} is already int8; compress its float parent instead")
    params_before = count_params(model)
    steps: list[dict[str, Any]] = []
    if spec.prune_heads or spec.prune_ffn:
        first = gpt2_blocks(model)[0]  # check the fractions before the calibration pass
        if spec.prune_heads:
            keep_top(torch.zeros(first.attn.num_heads), spec.prune_heads, "heads")
        if spec.prune_ffn:
            keep_top(torch.zeros(first.mlp.c_fc.nf), spec.prune_ffn, "MLP neurons")
        n_pos = context_length(model.config, 1024)
        blocks = calibration_blocks(spec, lm.tokenizer, n_pos)
        scores = unit_importance(
            model, blocks, spec.calib_batch_size, heads=bool(spec.prune_heads), ffn=bool(spec.prune_ffn)
        )
        calib = {
            "data": spec.data.source,
            "split": "train",
            "blocks": len(blocks),
            "block_size": blocks.size(1),
            "batch_size": spec.calib_batch_size,
        }
        units = (
            ("prune-heads", spec.prune_heads, "heads", "heads", prune_heads, HEAD_SCORE),
            ("prune-ffn", spec.prune_ffn, "ffn", "MLP neurons", prune_ffn, FFN_SCORE),
        )
        for step, fraction, key, what, prune, score in units:
            if not fraction:
                continue
            keep = [keep_top(s, fraction, what) for s in scores[key]]
            prune(model, keep)
            steps.append({"step": step, "fraction": fraction, "score": score, "calibration": calib, "kept": keep})
    heads = heads_per_layer(model)
    int8_layout = None
    if spec.int8:
        model.float()
        int8_layout = quantize_model(model)
        steps.append(
            {"step": "int8", "scheme": INT8_SCHEME, "modules": len(int8_layout["modules"]), "tied": int8_layout["tied"]}
        )
    elif spec.dtype:
        model.to(DTYPES[spec.dtype])
        steps.append({"step": "dtype", "dtype": spec.dtype})
    custom = bool(heads or int8_layout)
    reasons = []
    if heads:
        reasons.append("layers have fewer attention heads than n_head (transformers 5 has no prune_heads)")
    if int8_layout:
        reasons.append(f"int8 weights in {INT8_FILE}")
    parent = {
        "path": str(lm.path.resolve()) if lm.path else name,
        "weights_sha256": weights_sha256(lm.folder) if lm.folder else {"hub": lm.fingerprint},
        "hub": lm.hub and {k: lm.hub[k] for k in ("id", "revision")},
    }
    manifest: dict[str, Any] = {
        "kind": "compressed",
        "model": {
            "n_layer": lm.n_layer,
            "params_m": round(count_params(model) / 1e6, 3),
            "params_m_before": round(params_before / 1e6, 3),
            "heads_per_layer": heads,
            "n_inner": getattr(model.config, "n_inner", None),
        },
        "compression": {
            "spec": spec.model_dump(mode="json"),
            "steps": steps,
            "layout": {"loader": "kdcode" if custom else "transformers", "heads_per_layer": heads, "int8": int8_layout},
            "loading": ("kdcode.models.load_model only: " + "; ".join(reasons))
            if custom
            else "plain transformers: AutoModelForCausalLM.from_pretrained",
            "parent": parent,
            "parent_manifest": lm.manifest,
        },
    }
    writer = _Int8Folder(model) if int8_layout else model
    save_model(out, writer, lm.tokenizer, manifest, overwrite=overwrite)
    from kdcode.artifacts import read_manifest

    return out, read_manifest(out) or manifest
