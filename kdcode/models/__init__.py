"""Model folders in and out: loading models and tokenizers (``load``: ``bundled``, a folder, a hub id, a GGUF
source), writing model folders (``artifacts``: atomic, with the manifest and the sha256 of every weight file), the
Hugging Face hub and its cache (``hub``), GGUF teachers dequantized into kdcode's cache (``gguf``), and the FIM token
formats of the model families (``fim_tokens``).

``kdcode.models.load_model`` stays importable from here: the model cards and manifests of compressed folders name it.
It is resolved on first use, so that importing ``kdcode.models.artifacts`` does not import the loader.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load_model":  # the documented public import (model cards, manifests, docs/compression-and-export.md)
        from kdcode.models.load import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
