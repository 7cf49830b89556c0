"""Completion sets: line-completion samples drawn from held-out files, and CodeXGLUE's file layouts.

Line-level completion on raw code: each sample cuts a held-out file at the start of a non-blank line;
the input is the file up to there, the ground truth is that line without its indentation. On py150
text (CodeXGLUE format) the cut falls at a random token inside a line and the ground truth is the rest
of that line, ``<EOL>`` excluded. Each sample keeps the previous non-blank line, for the trivial baseline.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcode.data.corpus import Document, load_corpus, to_py150
from kdcode.data.records import load_records
from kdcode.errors import KdcodeError
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
    if fmt != "py150":
        return [LineSample(f"{d.key}@{offset}", d.text[:offset], gt, prev) for d, offset, gt, prev in
                draw_raw_lines(docs, n, rng)]
    pool: list[LineSample] = []
    for doc in docs:
        for j, (inp, gt, prev) in enumerate(_py150_candidates(doc, rng)):
            pool.append(LineSample(f"{doc.key}#{j}", inp, gt, prev))
    if not pool:
        raise KdcodeError("the evaluation files hold no non-blank line after the first; nothing to complete")
    return rng.sample(pool, min(n, len(pool)))


def draw_raw_lines(docs: list[Document], n: int, rng: random.Random) -> list[tuple[Document, int, str, str]]:
    """Up to ``n`` (document, offset of the line's start, stripped line, previous non-blank line) of raw code,
    a file first, then a line in it (CodeXGLUE takes one line per file): a uniform draw over all lines would
    let one huge file (the stdlib's pydoc_data/topics.py) dominate the set. The text before a line is cut only
    for drawn samples: one copy per line of every file would take gigabytes on the stdlib's test split."""
    pool = [(doc, offset, gt, prev) for doc in docs for offset, gt, prev in _raw_candidates(doc)]
    if not pool:
        raise KdcodeError("the evaluation files hold no non-blank line after the first; nothing to complete")
    by_file: dict[str, list] = {}
    for item in pool:
        by_file.setdefault(item[0].key, []).append(item)
    files = sorted(by_file)
    for key in files:
        rng.shuffle(by_file[key])
    drawn: list[tuple[Document, int, str, str]] = []
    while len(drawn) < min(n, len(pool)):
        key = rng.choice(files)
        if by_file[key]:
            drawn.append(by_file[key].pop())
        else:
            files.remove(key)
    return drawn


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


def eval_docs(spec: EvalSpec) -> tuple[list[Document], dict[str, Any]]:
    corpus = load_corpus(spec.data)
    splits = list(corpus.splits) if spec.split == "all" else [spec.split]
    docs = [d for s in splits for d in corpus.splits[s]]
    if not docs:
        raise KdcodeError(f"the {spec.split} split of {spec.data.source} is empty; use --split all or more files")
    return docs, corpus.summary()
