"""One GGUF file from a transformers model, written with the ``gguf`` package (llama.cpp's own writer), and read
back: the architecture (:mod:`kdcode.export.gguf_arch`), the tokenizer (:mod:`kdcode.export.gguf_vocab`) and
kdcode's provenance under ``kdcode.manifest`` (a JSON string: the source folder's sha256, the export settings).

Weight types (``quant``): ``f32``, ``f16``, ``q8_0`` or ``q4_0`` for the 2-D matrices (token embedding and
projections); 1-D tensors (norms, biases) and GPT-2's position embedding stay float32, as llama.cpp's converter
keeps them. A matrix whose rows do not split into the type's 32-value blocks is stored f16 (and counted).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from kdcode.errors import KdcodeError
from kdcode.export.gguf_arch import arch_of, gguf_tensors
from kdcode.export.gguf_vocab import add_tokenizer

MANIFEST_KEY = "kdcode.manifest"
_KEEP_F32 = ("position_embd.weight",)


def _types() -> tuple[dict[str, Any], dict[str, Any]]:
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return ({"f32": q.F32, "f16": q.F16, "q8_0": q.Q8_0, "q4_0": q.Q4_0},
            {"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "q8_0": f.MOSTLY_Q8_0, "q4_0": f.MOSTLY_Q4_0})


def tensor_type(name: str, shape: tuple[int, ...], quant: str) -> Any:
    """The GGML type a tensor is stored in for ``quant`` (see the module doc)."""
    import gguf

    qtypes, _ = _types()
    if len(shape) < 2 or quant == "f32" or name in _KEEP_F32:
        return qtypes["f32"]
    wanted = qtypes[quant]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else qtypes["f16"]


def _encode(data: Any, qtype: Any) -> Any:
    import gguf
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def write_gguf(path: Path, model: Any, tokenizer: Any, quant: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``model`` + ``tokenizer`` to ``path`` (a fresh file; the caller makes it atomic) with ``manifest``
    under ``kdcode.manifest``. Returns a summary: architecture, tensor types, tokenizer."""
    import gguf

    qtypes, ftypes = _types()
    if quant not in qtypes:
        raise KdcodeError(f"--quant {quant!r}: use {', '.join(qtypes)}")
    config = model.config
    arch = arch_of(config)
    writer = gguf.GGUFWriter(str(path), arch.name)
    writer.add_name(str(manifest.get("name") or Path(str(manifest.get("source", {}).get("path", "model"))).name))
    arch.hparams(writer, config)
    writer.add_file_type(int(ftypes[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_tokenizer(writer, tokenizer, int(config.vocab_size))
    writer.add_string(MANIFEST_KEY, json.dumps(manifest, sort_keys=True))
    counts: Counter[str] = Counter()
    for name, data in gguf_tensors(model, arch):
        qtype = tensor_type(name, data.shape, quant)
        counts[qtype.name] += 1
        writer.add_tensor(name, _encode(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch.name, "tensor_types": dict(counts), "tokenizer": vocab}


def read_fields(path: Path) -> dict[str, Any]:
    """A GGUF's metadata as plain values (strings, numbers, lists), without its tensor data."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - not a GGUF, truncated, another version: one line
        raise KdcodeError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            out[key] = len(field.data)  # long lists: their length is enough here
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - a value type this gguf version cannot read back: skip it
            continue
    out["tensors"] = {t.name: (t.tensor_type.name, [int(d) for d in t.shape]) for t in reader.tensors}
    return out


def gguf_manifest(fields: dict[str, Any]) -> dict[str, Any] | None:
    """kdcode's provenance in a GGUF's fields (None for a GGUF made elsewhere)."""
    text = fields.get(MANIFEST_KEY)
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise KdcodeError(f"the GGUF's {MANIFEST_KEY} is not JSON ({exc}); the file is damaged, re-export it") from exc
