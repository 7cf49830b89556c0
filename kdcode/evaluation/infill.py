"""`kdcode eval --task infill`: single-line infilling (SantaCoder / HumanEval-infilling style) on held-out files.

A sample is a held-out file with one whole non-blank line (not its first) removed. The prefix is the text before
the line's start, the middle (the ground truth) is the line with its indentation but without its line break, and
the suffix is everything from that line break on. The lines are drawn as line completion draws them
(:func:`kdcode.evaluation.completion_sets.draw_raw_lines`: same files, seed and ids for every model), so teacher
and student are compared on the same holes, and prefix-only completion of the same holes (the line completion
samples of the same draw) is scored beside the infill figures: the difference is what the suffix adds. Since the
suffix takes part of the window, prefix-only completion is also scored from as many prefix tokens as each infill
prompt held (``prefix_only_same_window``): the difference from the infill figures is what the suffix adds at an
equal prefix. ES and EM are computed as for line completion (the prediction stripped, against the stripped line);
decoding stops at the end of the line. The model's window is cut as :mod:`kdcode.inference.infill` says: the
prefix keeps its end and the suffix its start, and the suffix takes at most a quarter of the window when the
prefix fills the rest.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcode.data.corpus import Document
from kdcode.evaluation.completion_sets import _LINE_BREAKS, draw_raw_lines
from kdcode.evaluation.metrics import line_metrics, mean
from kdcode.inference.decode import DecodeOptions, VocabIndex, beam_search, encode_prompt, greedy, n_positions
from kdcode.inference.infill import encode_infill
from kdcode.models import fim_tokens
from kdcode.progress import make_progress
from kdcode.spec import EvalSpec


@dataclass(frozen=True)
class InfillSample:
    id: str
    prefix: str  # the file up to the line's start
    middle: str  # the removed line: indentation included, line break excluded
    suffix: str  # the rest of the file, from the line break on
    prev: str = ""  # the previous non-blank line, stripped (the trivial baseline)

    @property
    def gt(self) -> str:
        return self.middle.strip()


def build_infill_samples(docs: list[Document], n: int, seed: int) -> list[InfillSample]:
    """Up to ``n`` holes, one whole non-blank line each: the lines line completion draws with ``seed``, same ids."""
    out = []
    for doc, offset, _, prev in draw_raw_lines(docs, n, random.Random(seed)):
        brk = _LINE_BREAKS.search(doc.text, offset)
        end = brk.start() if brk else len(doc.text)
        out.append(InfillSample(f"{doc.key}@{offset}", doc.text[:offset], doc.text[offset:end], doc.text[end:], prev))
    return out


def _decode(lm: Any, index: Any, prompts: list[Any], opts: Any, spec: EvalSpec, progress: Any, label: str) -> Any:
    task = progress.add_task(label, total=len(prompts), info="")
    advance = lambda k: progress.update(task, advance=k)  # noqa: E731
    if spec.beams > 1:
        return beam_search(lm.model, index, prompts, opts, spec.beams, on_batch=advance)
    return greedy(lm.model, index, prompts, opts, spec.batch_size, on_batch=advance)


def run_infill(name: str, lm: Any, spec: EvalSpec, docs: list[Document], data_summary: dict[str, Any],
               predictions: Path | None = None) -> dict[str, Any]:
    """Infill ES/EM of a loaded model on holes of ``docs``, prefix-only ES/EM of the same holes beside them."""
    tokens = fim_tokens.require(lm.tokenizer, spec.fim_format, name)
    samples = build_infill_samples(docs, spec.samples, spec.seed)
    opts = DecodeOptions(max_new_tokens=spec.max_new_tokens, context_tokens=spec.context_tokens, heal=False)
    context = opts.context_for(n_positions(lm.model))
    index = VocabIndex.for_model(lm.model, lm.tokenizer)
    heal = spec.heal if spec.heal is not None else True
    order = fim_tokens.infill_order(spec.fim_order, lm.manifest)
    encoded = [encode_infill(index, tokens, s.prefix, s.suffix, context, heal, order) for s in samples]
    start = time.perf_counter()
    with make_progress() as progress:
        gen = _decode(lm, index, [p for p, _ in encoded], opts, spec, progress, f"infill {name}")
        infill_s = time.perf_counter() - start
        plain_opts = DecodeOptions(max_new_tokens=spec.max_new_tokens, context_tokens=spec.context_tokens, heal=heal)
        plain = _decode(lm, index, [s.prefix for s in samples], plain_opts, spec, progress, f"prefix only {name}")
        # prefix-only from the prefix tokens each infill prompt held (healed as line completion heals)
        same = [encode_prompt(index, s.prefix, plain_opts, max(w.prefix_tokens, 1))
                for s, (_, w) in zip(samples, encoded)]
        matched = _decode(lm, index, same, plain_opts, spec, progress, f"prefix only, infill window {name}")
    gts = [s.gt for s in samples]
    if predictions is not None:
        predictions.write_text("".join(_LINE_BREAKS.sub(" ", t) + "\n" for t in gen.texts), encoding="utf-8")
    windows = [w for _, w in encoded]
    return {
        "model": name,
        "task": "infill",
        **line_metrics(gen.texts, gts),
        "prefix_only": {"name": "the same holes, no suffix", **line_metrics(plain.texts, gts)},
        "prefix_only_same_window": {"name": "the same holes, no suffix, the infill prompt's prefix tokens",
                                    **line_metrics(matched.texts, gts)},
        "baseline": {"name": "repeat previous line", **line_metrics([s.prev for s in samples], gts)},
        "perplexity": None,
        "token_accuracy": None,
        "fim": {**tokens.describe(), "order": order},
        "window": {
            "context_tokens": context,
            "how": "prefix keeps its last tokens, suffix its first; the suffix at most 1/4 when the prefix fills "
                   "the rest; 3 FIM tokens",
            "mean_prefix_tokens": round(mean(w.prefix_tokens for w in windows), 1),
            "mean_suffix_tokens": round(mean(w.suffix_tokens for w in windows), 1),
            "prefix_cut": sum(w.cut_prefix for w in windows),
            "suffix_cut": sum(w.cut_suffix for w in windows),
        },
        "decoding": {"beams": spec.beams, "max_new_tokens": spec.max_new_tokens, "context_tokens": context,
                     "heal": heal, "prefix_only_heal": heal, "format": "raw"},
        "seconds": round(infill_s, 2),
        "samples_per_s": round(len(samples) / infill_s, 2),
        "data": data_summary,
        "split": spec.split,
        "seed": spec.seed,
        "verified": lm.verified,
        "runtime": lm.runtime,
        "examples": [
            {"id": s.id, "prefix_tail": s.prefix[-80:], "suffix_head": s.suffix[:80], "gt": s.gt, "pred": p,
             "prefix_only": q}
            for s, p, q in list(zip(samples, gen.texts, plain.texts))[:5]
        ],
    }
