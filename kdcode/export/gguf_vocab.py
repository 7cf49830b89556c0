"""A tokenizer in a GGUF file, both ways, through llama.cpp's own keys only (``tokenizer.ggml.*``: the byte-level
BPE vocabulary, merges, token types, the pre-tokenizer's name, bos/eos/unk/pad ids).

Written so that llama.cpp and ollama tokenize as transformers does; read back by :func:`tokenizer_from_gguf`,
which rebuilds the Hugging Face tokenizer from those same keys, so that kdcode's decoder (token healing, stops)
runs on a GGUF as on the folder it came from, and any mistake in what llama.cpp reads shows up in kdcode's own
outputs. Only byte-level BPE tokenizers are exported, with a pre-tokenizer llama.cpp knows: GPT-2's regex
(``gpt-2``) or Llama 3's (``llama-bpe``). Anything else would load and tokenize differently there: it is refused.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from kdcode.errors import KdcodeError
from kdcode.models.fim_tokens import detect

# Split regexes of the pre-tokenizers llama.cpp names (its llama-vocab.cpp), as tokenizer.json spells them.
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """tokenizer.json, parsed, as save_pretrained writes it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise KdcodeError("cannot export the tokenizer to GGUF: it is not a fast (tokenizers) tokenizer")
    return json.loads(backend.to_str())


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (``gpt-2`` or ``llama-bpe``); an error for others."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise KdcodeError("cannot export the tokenizer to GGUF: its byte-level pre-tokenizer adds a prefix "
                              "space, which llama.cpp's gpt-2 pre-tokenizer does not")
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        if (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
            return "llama-bpe"
    raise KdcodeError(
        f"cannot export the tokenizer to GGUF: its pre-tokenizer ({json.dumps(pre)[:120]}) is not one llama.cpp "
        "knows (GPT-2's byte-level regex or Llama 3's); llama.cpp and ollama would tokenize differently"
    )


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Write the tokenizer keys; ``vocab_size`` is the model's (rows beyond the tokenizer are unused ``[PADn]``
    tokens). Returns what was written, for the manifest."""
    import gguf

    data = _tokenizer_json(tokenizer)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise KdcodeError("cannot export the tokenizer to GGUF: kdcode exports byte-level BPE tokenizers only "
                          f"(this one is {model.get('type')} with a {(data.get('decoder') or {}).get('type')} decoder)")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise KdcodeError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(_merges(model))
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[kind] is not None:
            add(int(ids[kind]))
    fim = _fim_ids(writer, tokenizer)
    with_special = tokenizer("x")["input_ids"]
    writer.add_add_bos_token(bool(with_special) and with_special[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(with_special) and with_special[-1] == tokenizer.eos_token_id)
    return {"model": "gpt2", "pre": pre, "tokens": len(vocab), "rows": vocab_size, "merges": len(_merges(model)),
            "special_ids": {k: v for k, v in ids.items() if v is not None}, **({"fim": fim} if fim else {})}


def _fim_ids(writer: Any, tokenizer: Any) -> dict[str, Any] | None:
    """llama.cpp's FIM token keys (its /infill builds the prompt from them), when the tokenizer has FIM tokens."""
    import gguf

    tokens = detect(tokenizer)
    if tokens is None:
        return None
    keys = gguf.Keys.Tokenizer
    for key, i in ((keys.FIM_PRE_ID, tokens.prefix_id), (keys.FIM_SUF_ID, tokens.suffix_id),
                   (keys.FIM_MID_ID, tokens.middle_id)):
        writer.add_uint32(key, int(i))
    return tokens.describe()


def _pre_tokenizer(pre: str) -> dict[str, Any]:
    if pre == "gpt-2":
        return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "llama-bpe":
        split = {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        return {"type": "Sequence", "pretokenizers": [split, byte_level]}
    raise KdcodeError(f"this GGUF's pre-tokenizer {pre!r} is not one kdcode reads (gpt-2, llama-bpe)")


def tokenizer_from_gguf(reader: Any) -> Any:
    """The Hugging Face tokenizer of a GGUF (a ``gguf.GGUFReader``) with a byte-level BPE vocabulary."""
    def value(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    if value("tokenizer.ggml.model") != "gpt2":
        raise KdcodeError(f"this GGUF's tokenizer is {value('tokenizer.ggml.model')!r}; kdcode reads byte-level BPE "
                          "(gpt2) vocabularies")
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    pre = value("tokenizer.ggml.pre", "gpt-2")
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": pre == "llama-bpe",
             "vocab": {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != 5},  # 5: UNUSED rows
             "merges": value("tokenizer.ggml.merges", [])}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": k == 3} for i, (t, k) in enumerate(zip(tokens, types)) if k in (3, 4)]  # CONTROL, USER
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": _pre_tokenizer(pre), "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": model}
    keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    names = {kind: tokens[i] for kind, key in keys.items()
             if (i := value(f"tokenizer.ggml.{key}_token_id")) is not None and 0 <= i < len(tokens)}
    specials = [a["content"] for a in added if a["special"] and a["content"] not in names.values()]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                  **{f"{k}_token": v for k, v in names.items()})
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    tok.model_max_length = 1_000_000_000
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
