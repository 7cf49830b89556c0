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
    pool: list[LineSample] = []
    for doc in docs:
        if fmt == "py150":
            for j, (inp, gt, prev) in enumerate(_py150_candidates(doc, rng)):
                pool.append(LineSample(f"{doc.key}#{j}", inp, gt, prev))
        else:
            for offset, gt, prev in _raw_candidates(doc):
                pool.append(LineSample(f"{doc.key}@{offset}", doc.text[:offset], gt, prev))
    if not pool:
        raise KdcodeError("the evaluation files hold no non-blank line after the first; nothing to complete")
    return rng.sample(pool, min(n, len(pool)))


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
    name: str, spec: EvalSpec, verify: bool = True, predictions: Path | None = None, loaded: Any = None
) -> dict[str, Any]:
    """Evaluate a model folder / id on line completion and perplexity; returns the metrics dict."""
    from kdcode.generate import Completer
    from kdcode.models import load_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    lm = loaded or load_model(name, check=verify)
    fmt = spec.data.format
    docs: list[Document] = []
    data_summary: dict[str, Any] = {}
    if spec.lines:
        samples = read_lines_file(Path(spec.lines))[: spec.samples]
        fmt = "py150" if any("<EOL>" in s.input for s in samples[:20]) else fmt
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
    baseline = line_metrics([s.prev for s in samples], [s.gt for s in samples]) if not spec.lines else None
    if predictions is not None:
        predictions.write_text("".join(t.replace("\n", " ") + "\n" for t in gen.texts), encoding="utf-8")
    ppl: dict[str, Any] = {"perplexity": None}
    if docs and spec.ppl_blocks:
        ppl = perplexity(lm.model, lm.tokenizer, docs, spec.ppl_blocks, completer.context_tokens + spec.max_new_tokens)
    return {
        "model": name,
        **metrics,
        **ppl,
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
