"""Code-completion metrics, defined exactly as CodeXGLUE's line-level evaluator defines them.

- ``post_process``: ``<NUM_LIT>`` -> ``0``, ``<STR_LIT>`` / ``<CHAR_LIT>`` -> empty, ``<X_LIT:v>`` -> ``v``.
- Edit similarity: fuzzywuzzy's ``fuzz.ratio`` on (post-processed stripped prediction, post-processed
  ground truth): 100 when the strings are equal, 0 when one of them is empty, otherwise
  ``int(round(100 * indel-ratio))`` with Python's round; the mean over samples is rounded to 2 decimals.
- Exact match: ``pred.split() == gt.split()``, as a percentage rounded to 2 decimals.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from rapidfuzz.distance import Indel

_LIT = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def post_process(code: str) -> str:
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    # Replace each found literal in turn, as CodeXGLUE does (one replacement can expose another).
    for kind, value in _LIT.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def fuzzy_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` with python-Levenshtein: ``(lensum - indel distance) / lensum``.

    Computed in that order (not as 1 - d/lensum) so that exact .5 scores round as the original does.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    lensum = len(a) + len(b)
    return int(round(100 * ((lensum - Indel.distance(a, b)) / lensum)))


def sample_scores(pred: str, gt: str) -> tuple[int, bool]:
    """(edit similarity 0..100, exact match) of one prediction, CodeXGLUE's way."""
    p = post_process(pred.strip())
    g = post_process(gt)
    return fuzzy_ratio(p, g), p.split() == g.split()


def line_metrics(preds: Sequence[str], gts: Sequence[str]) -> dict[str, float]:
    """Mean ES and EM (%) over samples, each rounded to 2 decimals as CodeXGLUE prints them."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
    if not gts:
        return {"es": 0.0, "em": 0.0, "samples": 0}
    scores = [sample_scores(p, g) for p, g in zip(preds, gts)]
    es = sum(s for s, _ in scores) / len(scores)
    em = sum(1 for _, m in scores if m) / len(scores) * 100
    return {"es": round(es, 2), "em": round(em, 2), "samples": len(scores)}


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
