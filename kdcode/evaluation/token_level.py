"""Token-level completion accuracy, as CodeXGLUE's CodeCompletion-token ``eval_acc`` computes it."""

from __future__ import annotations

from typing import Any

import torch

from kdcode.data.corpus import Document
from kdcode.device import model_device

# Code tokens CodeXGLUE's eval_acc leaves out of token-level accuracy.
NOT_COUNTED = frozenset({"<s>", "</s>", "<EOL>", "<pad>"})
_WORD_START = ("\u0120", "\u2581")  # byte-level BPE's 'Ġ' (a leading space), SentencePiece's '▁'


def _boundary_ids(tokenizer: Any) -> set[int]:
    """Ids that are code tokens of their own: bos, eos, sep, pad and ``<EOL>`` (CodeGPT's sep token)."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    eol = tokenizer.convert_tokens_to_ids("<EOL>")
    if eol != tokenizer.unk_token_id:
        ids.add(eol)
    return {i for i in ids if i is not None}


def _eval_blocks(stream: list[int], block_size: int, starts: list[bool], boundary: set[int], bos: int | None):
    """CodeXGLUE's EvalDataset.split: blocks of at most ``block_size`` tokens, each full one cut back so that
    it ends at a code-token boundary (before the last word-start token or bos, after the last eos/sep)."""
    blocks: list[list[int]] = []
    i = 0
    while i < len(stream):
        block = stream[i : i + block_size]
        if len(block) == block_size:
            for k in range(block_size - 1, 0, -1):
                tok = block[k]
                if starts[tok]:
                    block = block[:k]
                    break
                if tok in boundary:
                    block = block[: k if tok == bos else k + 1]
                    break
        blocks.append(block)
        i += len(block)
    return blocks


def _code_tokens(block: list[int], preds: list[int], starts: list[bool], boundary: set[int]):
    """(ground-truth ids, predicted ids) per code token; ``preds[i]`` is the argmax at position ``i``.

    A code token starts at a word-start sub-token, at a boundary token (which is a code token alone) and after
    one. The block's first sub-token has no prediction (``None``), as in CodeXGLUE, where it is never right.
    """
    groups: list[tuple[list[int], list[int | None]]] = []
    gt: list[int] = []
    pred: list[int | None] = []
    for i, y in enumerate(block):
        p = preds[i - 1] if i else None
        if y in boundary:
            if gt:
                groups.append((gt, pred))
            groups.append(([y], [p]))
            gt, pred = [], []
            continue
        if gt and starts[y]:
            groups.append((gt, pred))
            gt, pred = [], []
        gt.append(y)
        pred.append(p)
    if gt:
        groups.append((gt, pred))
    return groups


@torch.no_grad()
def token_accuracy(model: Any, tokenizer: Any, docs: list[Document], max_blocks: int, block_size: int) -> dict:
    """Token-level completion accuracy as CodeXGLUE's CodeCompletion-token ``eval_acc`` computes it, on py150 text.

    The documents (``<s> ... </s>`` lines; others are wrapped so) are tokenized into one stream, cut into
    blocks that end at code-token boundaries (CodeXGLUE's ``EvalDataset.split``), and the model predicts every
    sub-token teacher-forced (argmax). The sub-tokens are grouped into code tokens: a new code token starts at a
    sub-token beginning with 'Ġ' (byte-level BPE's space), and bos/eos/sep/pad/``<EOL>`` are code tokens alone.
    A code token is right when the decoded predicted sub-tokens, stripped, give the ground truth as their first
    whitespace-separated word; so it counts only if all its sub-tokens are predicted right (up to sub-token
    splits that decode to the same text). ``<s>``, ``</s>``, ``<EOL>`` and ``<pad>`` are not counted, and
    neither are whitespace-only pieces (CodeXGLUE counts them, always wrong). The first code token of each block
    has no context and counts as wrong, as in CodeXGLUE. Returns accuracy in percent (2 decimals).
    """
    bos = tokenizer.bos_token_id
    boundary = _boundary_ids(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    starts = [bool(p) and p.startswith(_WORD_START) for p in pieces]
    texts = [d.text.strip() for d in docs]
    texts = [t if t.startswith("<s>") and t.endswith("</s>") else f"<s> {t} </s>" for t in texts]
    stream: list[int] = []
    for i in range(0, len(texts), 256):
        for ids in tokenizer(texts[i : i + 256], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
    blocks = _eval_blocks(stream, block_size, starts, boundary, bos)[:max_blocks]
    device = model_device(model)
    vocab = int(getattr(model.config, "vocab_size", len(tokenizer)) or len(tokenizer))
    batch = max(1, min(8, 2**25 // max(1, block_size * vocab)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    decoded: dict[tuple[int, ...], str] = {}

    def decode(ids: list[int]) -> str:
        key = tuple(ids)
        if key not in decoded:
            decoded[key] = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return decoded[key]

    correct = total = 0
    for b in range(0, len(blocks), batch):
        chunk = blocks[b : b + batch]
        width = max(len(x) for x in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            x[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        preds = model(x.to(device), attention_mask=mask.to(device)).logits.argmax(-1).tolist()
        for ids, pred in zip(chunk, preds):
            for gt_ids, pred_ids in _code_tokens(ids, pred, starts, boundary):
                gt = decode(gt_ids).strip()
                if not gt or gt in NOT_COUNTED:
                    continue
                total += 1
                if None in pred_ids:
                    continue
                if pred_ids == gt_ids:
                    correct += 1
                else:
                    words = decode(pred_ids).strip().split()  # type: ignore[arg-type]
                    correct += bool(words) and words[0] == gt
    return {
        "token_accuracy": round(100 * correct / total, 2) if total else None,
        "token_correct": correct,
        "token_total": total,
        "token_blocks": len(blocks),
    }
