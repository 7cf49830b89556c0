"""The decoder with past key values as one ONNX graph, through ``torch.onnx`` (the dynamo exporter), and its
optional int8 form through ONNX Runtime's dynamic quantizer.

The graph is the transformers model itself, traced around a flat signature that ONNX Runtime can feed:

- inputs: ``input_ids`` (batch, seq), ``attention_mask`` (batch, past + seq), ``position_ids`` (batch, seq),
  ``logits_index`` (keep,): the positions of ``seq`` whose logits are computed (the last one while decoding,
  several for a draft's proposals), and ``past.{i}.key`` / ``past.{i}.value`` (batch, kv_heads, past, head_dim)
  per layer (``past`` = 0 for a prompt);
- outputs: ``logits`` (batch, keep, vocab) and ``present.{i}.key`` / ``present.{i}.value`` (the grown cache).

Computing the logits of the kept positions only matters: for a 128-wide model with an 8k vocabulary the LM head
over a whole prompt costs about as much as the rest of the model.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from kdcode.errors import KdcodeError

BASE_INPUTS = ("input_ids", "attention_mask", "position_ids", "logits_index")


def cache_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head size) of a decoder's KV cache, from its config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv, head_dim


def past_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def _step_module(model: Any, head_as_matmul: bool) -> Any:
    """The model behind the flat signature of the module doc, as an ``nn.Module`` for the exporter.
    ``head_as_matmul``: the LM head as a plain (hidden, vocab) weight of its own, which the int8 quantizer can
    take (a head tied to the embedding reaches the graph through a Transpose it leaves float)."""
    base, head = model.base_model, model.get_output_embeddings()
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    layers = int(model.config.num_hidden_layers)

    class MatMulHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight_t = torch.nn.Parameter(head.weight.detach().t().contiguous(), requires_grad=False)
            self.bias = head.bias

        def forward(self, x: Any) -> Any:
            y = x @ self.weight_t
            return y if self.bias is None else y + self.bias

    class DecoderStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base, self.head = base, MatMulHead() if head_as_matmul else head

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, logits_index: Any, *past: Any) -> Any:
            cache = DynamicCache(config=model.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.base(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                            **{cache_kw: cache})
            logits = self.head(out.last_hidden_state.index_select(1, logits_index))
            grown = getattr(out, "cache", None) or out.past_key_values
            return (logits, *[t for layer in grown.layers for t in (layer.keys, layer.values)])

    return DecoderStep().eval()


def export_onnx(model: Any, path: Path, opset: int, head_as_matmul: bool = False) -> dict[str, Any]:
    """Write ``model`` (float32, eval) as ``path``; returns the graph's input and output names, and the name of
    the input embedding's initializer when the LM head is tied to it."""
    layers, kv, head_dim = cache_shape(model.config)
    batch, seq, past = 2, 3, 4  # example sizes (not 0 or 1, which the exporter would take for constants)
    ids = torch.zeros((batch, seq), dtype=torch.long)
    args = (ids, torch.ones((batch, past + seq), dtype=torch.long), torch.arange(past, past + seq).repeat(batch, 1),
            torch.tensor([seq - 1]), *[torch.zeros((batch, kv, past, head_dim)) for _ in range(2 * layers)])
    b, s, p, t, k = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total", "keep"))
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
              "logits_index": {0: k}, "past": tuple({0: b, 2: p} for _ in range(2 * layers))}
    inputs = [*BASE_INPUTS, *past_names(layers, "past")]
    outputs = ["logits", *past_names(layers, "present")]
    try:
        program = torch.onnx.export(_step_module(model, head_as_matmul), args, None, input_names=inputs,
                                    output_names=outputs, dynamic_shapes=shapes, opset_version=opset, dynamo=True,
                                    optimize=True, verbose=False)
        program.save(str(path))
    except ImportError as exc:
        raise KdcodeError(f"ONNX export needs onnx and onnxscript ({exc}): pip install 'kdcode[onnx]'") from exc
    _strip_debug_info(path)
    tied = head_as_matmul and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = next(n for n, p in model.base_model.named_parameters() if p is model.get_input_embeddings().weight)
    return {"inputs": inputs, "outputs": outputs, "tied_embedding": f"base.{embedding}" if tied else None}


def _strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node debugging metadata (Python stack traces, module paths: ~1 KB a node, a tenth
    of a small model's file), which nothing reads at run time."""
    import onnx

    graph = onnx.load(str(path))
    for node in graph.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(graph, str(path))


def quantize_int8(src: Path, dst: Path, tied_embedding: str | None) -> dict[str, Any]:
    """``src`` with its MatMul/Gemm weights int8 (per output channel, symmetric, 7-bit range) and activations
    quantized at run time (ONNX Runtime's ``quantize_dynamic``). ``tied_embedding``: the float input embedding's
    initializer, which a tied LM head shares: it is then read from the head's int8 weights (one int8 table for
    both, as the torch model has one float table) instead of kept float beside them."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"]
    # 7-bit weights (reduce_range): without AVX-512 VNNI, ONNX Runtime multiplies uint8 activations by int8 weights
    # with vpmaddubsw, whose int16 pair sums saturate on 8-bit values (the bundled teacher lost 1.3 ES points on
    # 300 samples with 8-bit weights, 0.2 with 7-bit), as torch's fbgemm path does (kdcode.compression.int8).
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=ops,
                     reduce_range=True)
    shared = False
    if tied_embedding:
        graph = onnx.load(str(dst))
        shared = _embedding_from_head(graph, tied_embedding, "head.weight_t")
        if shared:
            onnx.save(graph, str(dst))
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8 (7-bit range)",
            "per_channel": True, "op_types": ops, "activations": "uint8, quantized per tensor at run time",
            "embedding": "int8, shared with the LM head" if shared else "float32"}


def _embedding_from_head(model: Any, embedding: str, head: str) -> bool:
    """Rewrite the lookup ``Gather(embedding, ids)`` as ``(Gather(head_q, ids, axis=1) * head_scale[ids])``
    (the head's int8 columns are the embedding's rows) and drop the float table. False when the head is not
    stored as symmetric int8 columns or the lookup is not there (the graph is left as it was)."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    q, scale, zero = (f"{head}_quantized", f"{head}_scale", f"{head}_zero_point")
    lookups = [n for n in g.node if n.op_type == "Gather" and n.input[0] == embedding]
    if not (q in inits and scale in inits and zero in inits and embedding in inits and len(lookups) == 1):
        return False
    if numpy_helper.to_array(inits[zero]).any() or list(inits[q].dims)[::-1] != list(inits[embedding].dims):
        return False
    node = lookups[0]
    ids, out, tag = node.input[1], node.output[0], "kdcode_tied_embedding"
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{tag}_axes")
    new = [
        helper.make_node("Gather", [q, ids], [f"{tag}_q"], axis=1),  # (hidden, *ids)
        helper.make_node("Cast", [f"{tag}_q"], [f"{tag}_f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", [f"{tag}_f"], [f"{tag}_t"], perm=[1, 2, 0]),  # (batch, seq, hidden)
        helper.make_node("Gather", [scale, ids], [f"{tag}_s"], axis=0),
        helper.make_node("Unsqueeze", [f"{tag}_s", axes.name], [f"{tag}_s1"]),
        helper.make_node("Mul", [f"{tag}_t", f"{tag}_s1"], [out]),
    ]
    at = list(g.node).index(node)
    g.node.remove(node)
    for k, n in enumerate(new):
        g.node.insert(at + k, n)
    g.initializer.remove(inits[embedding])
    g.initializer.append(axes)
    return True
