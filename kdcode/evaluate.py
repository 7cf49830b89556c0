"""Code-completion evaluation: completion sets, predictions, ES/EM, perplexity.

Line-level completion on raw code: each sample cuts a held-out file at the start of a non-blank line;
the input is the file up to there, the ground truth is that line without its indentation. On py150
text (CodeXGLUE format) the cut falls at a random token inside a line and the ground truth is the rest
of that line, ``<EOL>`` excluded. A trivial baseline ("repeat the previous line") is scored on the same
samples so that every figure has a floor to beat.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcode.data import Document, load_corpus
from kdcode.errors import KdcodeError
from kdcode.metrics import line_metrics
from kdcode.progress import make_progress
from kdcode.spec import EvalSpec

# Whatever a reader of the predictions file could take for a line break (str.splitlines' set).
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


@dataclass(frozen=True)
class LineSample:
    id: str
    input: str
    gt: str
    prev: str = ""  # the previous non-blank line (for the trivial baseline)


def _raw_candidates(doc: Document) -> list[tuple[int, str, str]]:
    """(char offset of the line start, stripped line, previous non-blank stripped line) per non-blank line."""
    out = []
    offset = 0
    prev = ""
    for i, line in enumerate(doc.text.splitlines(keepends=True)):
        stripped = line.strip()
        if stripped and i > 0:
            out.append((offset, stripped, prev))
        if stripped:
            prev = stripped
        offset += len(line)
    return out


def _py150_candidates(doc: Document, rng: random.Random) -> list[tuple[str, str, str]]:
    """(input, gt, prev line) with a random cut inside each line of a py150-normalised file."""
    tokens = doc.text.split()
    out = []
    line_start = 1 if tokens and tokens[0] == "<s>" else 0
    prev = ""
    for i, tok in enumerate(tokens + ["<EOL>"]):
        if tok in ("<EOL>", "</s>") or i == len(tokens):
            line = tokens[line_start:i]
            if line and line_start > 1:
                cut = line_start + rng.randrange(len(line))
                out.append((" ".join(tokens[:cut]), " ".join(tokens[cut:i]), prev))
            if line:
                prev = " ".join(line)
            line_start = i + 1
            if tok == "</s>":
                break
    return out


def build_line_samples(docs: list[Document], n: int, seed: int, fmt: str = "raw") -> list[LineSample]:
    """Up to ``n`` samples drawn uniformly (seeded) from every candidate line of ``docs``."""
    rng = random.Random(seed)
    pool: list[LineSample | tuple[Document, int, str, str]] = []
    for doc in docs:
        if fmt == "py150":
            for j, (inp, gt, prev) in enumerate(_py150_candidates(doc, rng)):
                pool.append(LineSample(f"{doc.key}#{j}", inp, gt, prev))
        else:
            # the prefix is cut only for drawn samples: one copy per line of every file would take
            # gigabytes on the stdlib's test split
            pool += [(doc, offset, gt, prev) for offset, gt, prev in _raw_candidates(doc)]
    if not pool:
        raise KdcodeError("the evaluation files hold no non-blank line after the first; nothing to complete")
    if fmt == "py150":
        drawn = rng.sample(pool, min(n, len(pool)))
    else:
        # Files first, then a line in the file (CodeXGLUE takes one line per file): a uniform draw over
        # all lines would let one huge file (the stdlib's pydoc_data/topics.py) dominate the set.
        by_file: dict[str, list] = {}
        for item in pool:
            by_file.setdefault(item[0].key, []).append(item)  # type: ignore[index]
        files = sorted(by_file)
        for key in files:
            rng.shuffle(by_file[key])
        drawn = []
        while len(drawn) < min(n, len(pool)):
            key = rng.choice(files)
            if by_file[key]:
                drawn.append(by_file[key].pop())
            else:
                files.remove(key)
    return [
        s if isinstance(s, LineSample) else LineSample(f"{s[0].key}@{s[1]}", s[0].text[: s[1]], s[2], s[3])
        for s in drawn
    ]


def read_lines_file(path: Path) -> list[LineSample]:
    """A completion set in CodeXGLUE's line-level layout: one {"id"?, "input", "gt"} object per line."""
    if not path.is_file():
        raise KdcodeError(f"--lines {path} does not exist")
    samples = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            samples.append(LineSample(str(rec.get("id", lineno - 1)), rec["input"], rec["gt"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise KdcodeError(f"{path}:{lineno} is not a {{'input', 'gt'}} JSON object ({exc})") from exc
    if not samples:
        raise KdcodeError(f"--lines {path} holds no samples")
    return samples


def write_lines_file(path: Path, samples: list[LineSample]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps({"id": s.id, "input": s.input, "gt": s.gt}) + "\n")


def read_completion_set(source: str, split: str = "test") -> tuple[list[LineSample], list[Document]]:
    """A completion set in one of CodeXGLUE's layouts: a local .jsonl/.json file or a hub dataset id.

    Line-level records (``code_x_glue_cc_code_completion_line``: ``{"id"?, "input", "gt"}``) give the samples
    as they are, and no documents. Token-level records (``code_x_glue_cc_code_completion_token``: ``{"code":
    [tokens]}``, or ``code`` as one string) give py150 documents, and no samples: cut lines from them with
    :func:`build_line_samples` (``fmt="py150"``). A ``code`` string that is not normalised yet is normalised.
    """
    from collections import Counter

    from kdcode.data import load_records, to_py150

    records = load_records(source, split)
    if all("input" in r and "gt" in r for r in records):
        samples = []
        for i, r in enumerate(records):
            if not isinstance(r["input"], str) or not isinstance(r["gt"], str):
                raise KdcodeError(f"{source}: record {i} has a non-string 'input' or 'gt'")
            samples.append(LineSample(str(r.get("id", i)), r["input"], r["gt"]))
        return samples, []
    if all("code" in r for r in records):
        raw = []
        for i, r in enumerate(records):
            code = r["code"]
            text = " ".join(str(t) for t in code) if isinstance(code, list) else str(code)
            raw.append(Document(str(r.get("id", i)), text))
        docs = to_py150(raw, Counter())
        if not docs:
            raise KdcodeError(f"{source}: no record's 'code' is normalisable py150 code")
        return [], docs
    raise KdcodeError(
        f"{source}: every record needs 'input' and 'gt' (CodeXGLUE line-level layout) or 'code' (token-level layout)"
    )


def write_completion_set(spec: EvalSpec, out: Path) -> dict[str, Any]:
    """Draw line-completion samples from ``spec.split`` of ``spec.data`` and write them as {id, input, gt} lines."""
    docs, summary = eval_docs(spec)
    samples = [s for s in build_line_samples(docs, spec.samples, spec.seed, spec.data.format) if s.gt.strip()]
    if not samples:
        raise KdcodeError(f"the {spec.split} split of {spec.data.source} has no line to complete")
    write_lines_file(out, samples)
    return {
        "samples": len(samples),
        "files": len(docs),
        "split": spec.split,
        "format": spec.data.format,
        "data": summary,
        "out": str(out),
    }


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
    device = next(model.parameters()).device
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


def eval_docs(spec: EvalSpec) -> tuple[list[Document], dict[str, Any]]:
    corpus = load_corpus(spec.data)
    splits = list(corpus.splits) if spec.split == "all" else [spec.split]
    docs = [d for s in splits for d in corpus.splits[s]]
    if not docs:
        raise KdcodeError(f"the {spec.split} split of {spec.data.source} is empty; use --split all or more files")
    return docs, corpus.summary()


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, docs: list[Document], max_blocks: int, block_size: int) -> dict[str, Any]:
    """exp(mean next-token CE) over the first ``max_blocks`` blocks of the documents' token stream."""
    from kdcode.data import encode_documents

    stream = encode_documents(docs, tokenizer)
    n = min(max_blocks, len(stream) // block_size)
    if n == 0:
        return {"perplexity": None, "ppl_tokens": 0, "ppl_block_size": block_size}
    device = next(model.parameters()).device
    blocks = torch.tensor(stream[: n * block_size]).view(n, block_size)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        x = blocks[i : i + 8].to(device)
        logits = model(x).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
    return {"perplexity": round(math.exp(total / count), 3), "ppl_tokens": count, "ppl_block_size": block_size}


def run_eval(
    name: str,
    spec: EvalSpec,
    verify: bool = True,
    predictions: Path | None = None,
    loaded: Any = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate a model folder / id on line completion and perplexity; returns the metrics dict."""
    from kdcode.generate import Completer
    from kdcode.models import load_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    lm = loaded or load_model(name, check=verify, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    fmt = spec.data.format
    docs: list[Document] = []
    data_summary: dict[str, Any] = {}
    if spec.lines:
        samples, docs = read_completion_set(spec.lines, spec.split)
        if samples:
            samples = samples[: spec.samples]
            fmt = "py150" if any("<EOL>" in s.input for s in samples[:20]) else fmt
        else:  # token-level layout: cut lines from its py150 files
            fmt = "py150"
            samples = build_line_samples(docs, spec.samples, spec.seed, fmt)
            data_summary = {"lines": spec.lines, "files": len(docs)}
    else:
        docs, data_summary = eval_docs(spec)
        samples = build_line_samples(docs, spec.samples, spec.seed, fmt)
    heal = spec.heal if spec.heal is not None else fmt == "raw"
    completer = Completer(lm.model, lm.tokenizer, spec.max_new_tokens, spec.context_tokens, heal=heal)
    prompts = [s.input for s in samples]
    start = time.perf_counter()
    with make_progress() as progress:
        task = progress.add_task(f"eval {name}", total=len(prompts), info="")
        advance = lambda k: progress.update(task, advance=k)  # noqa: E731
        if spec.beams > 1:
            gen = completer.beam(prompts, spec.beams, on_batch=advance)
        else:
            gen = completer.greedy(prompts, spec.batch_size, on_batch=advance)
    gen_time = time.perf_counter() - start
    metrics = line_metrics(gen.texts, [s.gt for s in samples])
    baseline = line_metrics([s.prev for s in samples], [s.gt for s in samples]) if docs else None
    if predictions is not None:
        predictions.write_text("".join(_LINE_BREAKS.sub(" ", t) + "\n" for t in gen.texts), encoding="utf-8")
    ppl: dict[str, Any] = {"perplexity": None}
    if docs and spec.ppl_blocks:
        ppl = perplexity(lm.model, lm.tokenizer, docs, spec.ppl_blocks, completer.context_tokens + spec.max_new_tokens)
    acc: dict[str, Any] = {"token_accuracy": None}
    if docs and (spec.token_level if spec.token_level is not None else fmt == "py150"):
        block = completer.context_tokens + spec.max_new_tokens
        acc = token_accuracy(lm.model, lm.tokenizer, docs, spec.token_blocks, block)
    return {
        "model": name,
        **metrics,
        **ppl,
        **acc,
        "baseline": {"name": "repeat previous line", **baseline} if baseline else None,
        "decoding": {
            "beams": spec.beams,
            "max_new_tokens": spec.max_new_tokens,
            "context_tokens": completer.context_tokens,
            "heal": heal,
            "format": fmt,
        },
        "seconds": round(gen_time, 2),
        "samples_per_s": round(len(samples) / gen_time, 2),
        "data": data_summary or {"lines": spec.lines},
        "split": spec.split,
        "seed": spec.seed,
        "verified": lm.verified,
        "examples": [
            {"id": s.id, "input_tail": s.input[-120:], "gt": s.gt, "pred": p}
            for s, p in list(zip(samples, gen.texts))[:5]
        ],
    }
