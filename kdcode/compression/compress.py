"""`kdcode compress`: prune, then quantize or cast a model folder, keeping the manifest chain.

Steps run in a fixed order, each optional: **prune** (attention heads and/or MLP neurons of a GPT-2,
:mod:`kdcode.compression.prune`, or of Llama-style blocks, :mod:`kdcode.compression.prune_llama`), then **store**
(``--dtype fp16|bf16``, or ``--int8`` with its ``--int8-scheme``: :mod:`kdcode.compression.int8`, smoothquant
first migrating activation outliers into the weights, :mod:`kdcode.compression.smooth`). Before it reports
success it measures the model before and after on held-out code (:mod:`kdcode.compression.quality`).

fp16/bf16, FFN-pruned and pruned Llama-style folders are plain Hugging Face folders; head-pruned GPT-2 and int8
folders load through :func:`kdcode.models.load_model`, which rebuilds them from ``kdcode.json``'s
``compression.layout`` (:mod:`kdcode.compression.load`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from kdcode.compression.int8 import INT8_FILE, quantize_model
from kdcode.compression.prune import GPT2Pruner, heads_per_layer
from kdcode.compression.prune_llama import LlamaPruner
from kdcode.compression.quality import check_spec, compare, in_memory, measure
from kdcode.compression.smooth import int8_scheme_for, largest_channels, smooth_model
from kdcode.data.corpus import encode_documents, load_corpus, to_blocks
from kdcode.device import torch_dtype
from kdcode.errors import KdcodeError
from kdcode.models.artifacts import check_output, kdcode_layout, read_manifest, save_model, weights_sha256
from kdcode.models.load import context_length, count_params, load_model, resolve_path, weights_bytes
from kdcode.spec_compress import INT8_SCHEMES, CompressSpec


def calibration_blocks(spec: CompressSpec, tokenizer: Any, n_positions: int) -> torch.Tensor:
    """The first ``calib_batches * calib_batch_size`` blocks of the corpus's train split (all files if empty)."""
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


def prune_model(model: nn.Module, spec: CompressSpec, tokenizer: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Score every head and MLP unit on calibration batches, cut the lowest ``spec.prune_*`` fraction of each
    layer's: GPT-2 in place (layers may keep different heads), Llama-style blocks rebuilt from a smaller config.
    Returns the pruned model and the steps for the manifest."""
    check_prunable(model, spec.prune_heads, spec.prune_ffn)  # the fractions, before the calibration pass
    blocks = calibration_blocks(spec, tokenizer, context_length(model.config, 1024))
    calib = {"data": spec.data.source, "split": "train"}
    return prune_with(model, spec.prune_heads, spec.prune_ffn, blocks, spec.calib_batch_size, calib)


def pruner_for(model: nn.Module, heads: float, ffn: float) -> Any:
    """The family's pruner (GPT-2 or Llama-style blocks); one line for a family kdcode cannot prune."""
    kind = GPT2Pruner if getattr(model.config, "model_type", None) == "gpt2" else LlamaPruner
    return kind(model, bool(heads), bool(ffn))


def check_prunable(model: nn.Module, heads: float, ffn: float) -> None:
    """The fractions leave every layer at least one head / channel (raises the pruner's one line)."""
    pruner = pruner_for(model, heads, ffn)
    units = pruner.units()
    if heads:
        pruner.keep_heads(torch.zeros(units["heads"]), heads)
    if ffn:
        pruner.keep_ffn(torch.zeros(units["ffn"]), ffn)


def prune_with(model: nn.Module, heads: float, ffn: float, blocks: torch.Tensor, batch_size: int,
               calib: dict[str, Any]) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Prune ``heads`` / ``ffn`` fractions of each layer by importance measured on ``blocks``; the pruned model and
    the manifest steps (``calib`` says where the blocks came from)."""
    pruner = pruner_for(model, heads, ffn)
    scores = pruner.importance(blocks, batch_size, bool(heads), bool(ffn))
    calib = {**calib, "blocks": len(blocks), "block_size": blocks.size(1), "batch_size": batch_size}
    keep_heads = [pruner.keep_heads(s, heads) for s in scores["heads"]] if heads else None
    keep_ffn = [pruner.keep_ffn(s, ffn) for s in scores["ffn"]] if ffn else None
    steps = [{"step": step, "fraction": fraction, "score": score, "calibration": calib, "kept": keep}
             for step, fraction, score, keep in (("prune-heads", heads, pruner.head_score, keep_heads),
                                                 ("prune-ffn", ffn, pruner.ffn_score, keep_ffn))
             if fraction]
    return pruner.apply(keep_heads, keep_ffn), steps


PRUNE_AT_INIT = {"blocks": 8, "batch_size": 4}  # what a student's init-time pruning scores units on


def prune_at_init(student: nn.Module, heads: float, ffn: float, calibration: torch.Tensor) -> tuple[nn.Module, list]:
    """A student's heads / MLP channels pruned by importance right after its init (distil, and the plan's finalists:
    the same blocks, so the same units)."""
    if not (heads or ffn):
        return student, []
    device = next(student.parameters()).device
    blocks = calibration[: PRUNE_AT_INIT["blocks"]].to(device)
    return prune_with(student, heads, ffn, blocks, PRUNE_AT_INIT["batch_size"],
                      {"data": "training blocks (the init's calibration sample)", "split": "train"})


class _Int8Folder:
    """What :func:`kdcode.models.artifacts.save_model` writes for an int8 model: config + int8 safetensors."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def save_pretrained(self, path: Path, safe_serialization: bool = True) -> None:
        self.model.config.save_pretrained(path)
        gen = getattr(self.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(path)
        tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(Path(path) / INT8_FILE), metadata={"format": "pt", "kdcode": "int8"})


def int8_in_place(model: nn.Module, requested: str, calibration: Callable[[], torch.Tensor], batch_size: int,
                  alpha: float, source: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Quantize ``model`` (float32, in place) with the int8 scheme ``requested`` (``auto`` chosen here for this CPU
    and family): the manifest's steps and the int8 layout. ``calibration`` gives the blocks the migration and the
    LM head's float channels are measured on (asked for only when the scheme needs them); ``source`` names them."""
    scheme, why = int8_scheme_for(model, requested)
    smooth, activations, head_float = INT8_SCHEMES[scheme]
    head = model.get_output_embeddings() if head_float else None
    blocks = calibration() if smooth or head else None
    steps: list[dict[str, Any]] = []
    if smooth:
        done = smooth_model(model, blocks, batch_size, alpha)
        where = {**source, "blocks": len(blocks), "block_size": blocks.size(1)}
        steps.append({"step": "smooth", **done, "calibration": where})
    channels = largest_channels(model, head, blocks, batch_size, head_float) if head else None
    layout = quantize_model(model, activations, channels)
    steps.append({"step": "int8", "int8_scheme": scheme, "chosen_by": why, "scheme": layout["scheme"],
                  "modules": len(layout["modules"]), "tied": layout["tied"]})
    return steps, layout


def _step_name(step: dict[str, Any]) -> str:
    if step["step"] == "int8":
        return f"int8 ({step['int8_scheme']})"
    if step["step"] == "dtype":
        return step["dtype"]
    return step["step"] + (f" {step['fraction']:g}" if "fraction" in step else "")


def run_compress(
    name: str, spec: CompressSpec, out: Path, overwrite: bool = False, verify: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Load ``name``, prune then quantize / cast it as ``spec`` says, and write ``out`` with the manifest chain."""
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
    checking = check_spec(spec, spec.data)
    before = measure(name, checking, spec.check_samples, in_memory(model, lm.tokenizer, lm.verified)) if checking \
        else None
    params_before = count_params(model)
    steps: list[dict[str, Any]] = []
    if spec.prune_heads or spec.prune_ffn:
        model, steps = prune_model(model, spec, lm.tokenizer)
    heads = heads_per_layer(model)
    int8_layout = None
    if spec.int8:
        model.float()
        int8_steps, int8_layout = int8_in_place(
            model, spec.int8_scheme, lambda: calibration_blocks(spec, lm.tokenizer, context_length(model.config, 1024)),
            spec.calib_batch_size, spec.smooth_alpha, {"data": spec.data.source, "split": "train"})
        steps += int8_steps
    elif spec.dtype:
        model.to(torch_dtype(spec.dtype))
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
            "intermediate_size": getattr(model.config, "intermediate_size", None),
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
    if checking and before is not None:
        after = measure(str(out), checking, spec.check_samples, in_memory(model, lm.tokenizer))
        what = " + ".join(_step_name(s) for s in steps)
        manifest["compression"]["quality"] = compare(before, after, spec, what)
    writer = _Int8Folder(model) if int8_layout else model
    save_model(out, writer, lm.tokenizer, manifest, overwrite=overwrite)
    return out, read_manifest(out) or manifest
